"""Evaluation records carry the settings they were made with; a resumed evaluation whose config
changed refuses (naming the field), or with regenerate sets the stale records aside and makes them
again; a judge change needs --rejudge (crl.evaluation.provenance)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from crl.config import ConfigError
from crl.evaluation import add_eval_arguments, run_eval_cli, run_evaluation
from crl.evaluation.config import AttackConfig, CapabilityConfig, EvalConfig, JudgeConfig, PromptSetConfig, ReportConfig
from crl.evaluation.provenance import STALE_FILE, adapter_identity


def _config(adapter_run: Path, **kw) -> EvalConfig:
    base = dict(
        base_model="tiny",
        adapters={"trained": str(adapter_run)},
        prompt_sets=[PromptSetConfig(name="harmful", source="demo:harmful:heldout", limit=2),
                     PromptSetConfig(name="benign", source="demo:benign:heldout", role="benign", limit=2)],
        attacks=[AttackConfig(name="direct"), AttackConfig(name="latent", kind="latent", steps=2, limit=1)],
        judge=JudgeConfig(use_semantic=False),
        capability=CapabilityConfig(benign_set="benign", over_refusal_set="benign", retention=False, harmful_nll=False),
        report=ReportConfig(plots=False, pca=False),
        max_new_tokens=6,
    )
    base.update(kw)
    return EvalConfig(**base)


def _records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]


def _latent(steps: int) -> list[AttackConfig]:
    return [AttackConfig(name="direct"), AttackConfig(name="latent", kind="latent", steps=steps, limit=1)]


@pytest.fixture(scope="module")
def evaluated(adapter_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    run_evaluation(_config(adapter_run), out, progress=False)
    return out


def _copy(evaluated: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(evaluated, out)
    return out


def test_records_carry_their_settings(evaluated, adapter_run):
    recs = _records(evaluated)
    latent = [r for r in recs if r["attack"] == "latent"]
    assert latent and all(r["settings"]["steps"] == 2 and r["settings"]["kind"] == "latent" for r in latent)
    assert all(r["settings"]["max_new_tokens"] == 6 for r in recs)
    trained = {r["settings"]["model"] for r in recs if r["model"] == "trained"}
    assert trained == {adapter_identity(adapter_run / "adapter")}
    assert {r["settings"]["model"] for r in recs if r["model"] == "base"} == {"base"}
    assert len({r["judge"] for r in recs}) == 1
    cap = json.loads((evaluated / "capability.json").read_text())
    assert all("settings" in entry for entry in cap.values())


def test_unchanged_config_resumes_without_work(evaluated, adapter_run, tmp_path, monkeypatch):
    out = _copy(evaluated, tmp_path)
    before = (out / "records.jsonl").read_bytes()
    from crl.attacks import latent, prompting

    monkeypatch.setattr(prompting.PromptAttack, "run", lambda *a, **k: pytest.fail("generation redone"))
    monkeypatch.setattr(latent.LatentAttack, "attack_one", lambda *a, **k: pytest.fail("latent attack redone"))
    run_evaluation(_config(adapter_run), out, progress=False)
    assert (out / "records.jsonl").read_bytes() == before


def test_changed_attack_setting_refuses_naming_the_field(evaluated, adapter_run, tmp_path):
    out = _copy(evaluated, tmp_path)
    before = (out / "records.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"attacks\.latent\.steps = 2 in the records, 3 now") as exc:
        run_evaluation(_config(adapter_run, attacks=_latent(3)), out, progress=False)
    assert "--regenerate" in str(exc.value) and "\n" not in str(exc.value)
    assert (out / "records.jsonl").read_bytes() == before  # nothing touched


def test_regenerate_sets_stale_records_aside_and_makes_them_again(evaluated, adapter_run, tmp_path):
    out = _copy(evaluated, tmp_path)
    old = _records(out)
    run_evaluation(_config(adapter_run, attacks=_latent(3)), out, progress=False, regenerate=True)
    new = _records(out)
    stale = [json.loads(l) for l in (out / STALE_FILE).read_text().splitlines()]
    assert sorted((r["model"], r["attack"]) for r in stale) == [("base", "latent"), ("trained", "latent")]
    assert all(r["settings"]["steps"] == 2 for r in stale)
    latent = [r for r in new if r["attack"] == "latent"]
    assert len(latent) == 2 and all(r["settings"]["steps"] == 3 for r in latent)
    # the direct records were not touched: same responses, same order of keys
    key = lambda r: (r["model"], r["purpose"], r["attack"], r["prompt_id"])  # noqa: E731
    kept = {key(r): r for r in old if r["attack"] != "latent"}
    assert {key(r): r for r in new if r["attack"] != "latent"} == kept


def test_generation_length_change_names_max_new_tokens(evaluated, adapter_run, tmp_path):
    out = _copy(evaluated, tmp_path)
    with pytest.raises(ConfigError, match=r"attacks\.direct\.max_new_tokens = 6 in the records, 9 now"):
        run_evaluation(_config(adapter_run, max_new_tokens=9), out, progress=False)


def test_retrained_adapter_refuses(evaluated, adapter_run, tmp_path):
    out = _copy(evaluated, tmp_path)
    run = tmp_path / "run"
    shutil.copytree(adapter_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    save_file({k: v * 1.5 for k, v in tensors.items()}, str(weights))
    with pytest.raises(ConfigError, match=r"adapters\.trained \(its weights\)"):
        run_evaluation(_config(run), out, progress=False)


def test_judge_change_needs_rejudge(evaluated, adapter_run, tmp_path):
    out = _copy(evaluated, tmp_path)
    changed = JudgeConfig(use_semantic=False, max_perplexity=80.0)
    with pytest.raises(ConfigError, match=r"judge\.max_perplexity.*--rejudge"):
        run_evaluation(_config(adapter_run, judge=changed), out, progress=False)
    run_evaluation(_config(adapter_run, judge=changed), out, progress=False, rejudge=True)
    recs = _records(out)
    assert len({r["judge"] for r in recs}) == 1 and recs[0]["judge"] != _records(evaluated)[0]["judge"]
    run_evaluation(_config(adapter_run, judge=changed), out, progress=False)  # now consistent: resumes


def test_records_without_settings_are_checked_against_the_previous_config(evaluated, adapter_run, tmp_path):
    """Folders written before settings were recorded: the old eval_config.json says what they were."""
    out = _copy(evaluated, tmp_path)
    legacy = []
    for rec in _records(out):
        rec.pop("settings"), rec.pop("judge")
        legacy.append(json.dumps(rec))
    (out / "records.jsonl").write_text("\n".join(legacy) + "\n")
    with pytest.raises(ConfigError, match=r"attacks\.latent\.steps = 2 in the records, 3 now"):
        run_evaluation(_config(adapter_run, attacks=_latent(3)), out, progress=False)
    run_evaluation(_config(adapter_run), out, progress=False)  # unchanged: accepted as they are
    (out / "eval_config.json").unlink()
    run_evaluation(_config(adapter_run, attacks=_latent(3)), out, progress=False, regenerate=False)


def test_changed_capability_settings_are_measured_again(evaluated, adapter_run, tmp_path):
    out = _copy(evaluated, tmp_path)
    cap = json.loads((out / "capability.json").read_text())
    cap["trained"]["kl"]["kl"] = 123.0  # a marker: a kept entry keeps it
    (out / "capability.json").write_text(json.dumps(cap))
    run_evaluation(_config(adapter_run), out, progress=False)
    assert json.loads((out / "capability.json").read_text())["trained"]["kl"]["kl"] == 123.0
    cfg = _config(adapter_run, capability=CapabilityConfig(benign_set="benign", over_refusal_set="benign",
                                                           retention=True, harmful_nll=False))
    run_evaluation(cfg, out, progress=False)
    entry = json.loads((out / "capability.json").read_text())["trained"]
    assert entry["kl"]["kl"] != 123.0 and "retention" in entry


def test_cli_regenerate_flag(evaluated, adapter_run, tmp_path):
    out = _copy(evaluated, tmp_path)
    cfg_path = tmp_path / "eval.toml"
    cfg_path.write_text(f'''base_model = "tiny"
max_new_tokens = 6
[adapters]
trained = "{adapter_run}"
[[prompt_sets]]
name = "harmful"
source = "demo:harmful:heldout"
limit = 2
[[prompt_sets]]
name = "benign"
source = "demo:benign:heldout"
role = "benign"
limit = 2
[[attacks]]
name = "direct"
[[attacks]]
name = "latent"
kind = "latent"
steps = 3
limit = 1
[judge]
use_semantic = false
[capability]
benign_set = "benign"
over_refusal_set = "benign"
retention = false
harmful_nll = false
[report]
plots = false
pca = false
''')
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    with pytest.raises(ConfigError, match="attacks.latent.steps"):
        run_eval_cli(parser.parse_args([str(cfg_path), "--output-dir", str(out), "--no-progress"]))
    assert run_eval_cli(parser.parse_args([str(cfg_path), "--output-dir", str(out), "--no-progress", "--regenerate"])) == 0
    assert (out / STALE_FILE).is_file()
