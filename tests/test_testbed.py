"""`crl testbed build` on the tiny model: the refusal fine-tune learns the refusals (cross-entropy of
held-out harmful prompts' refusals falls, measured independently of the build), keeps the benign
answers, merges into a loadable folder, is cached by its settings; then the refuser's path end to end:
pools by elicitation, CRL training, evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from crl.cli import main as crl_main
from crl.config import ConfigError
from crl.testbed import RefuserConfig, build_refuser, response_loss, refuser_dir

CONFIG = dict(model="tiny", steps=40, batch_size=8, lr=1e-2, lora_r=8, lora_alpha=16, max_length=192, answer_tokens=6)


def _refusal_loss(spec: str) -> float:
    """Mean response cross-entropy of held-out harmful prompts answered with their refusals."""
    from crl.data.batching import collate
    from crl.data.demo import load_demo
    from crl.data.encoding import encode_example
    from crl.data.refusals import refusal_for
    from crl.models import load_model

    model, tok = load_model(spec)
    exs = [e.with_response(refusal_for(e.prompt)) for e in load_demo("harmful", "heldout")[:12]]
    batch = collate([encode_example(tok, e, max_length=192) for e in exs], tok.pad_token_id)
    with torch.no_grad():
        return float(response_loss(model, batch))


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tb") / "refuser"
    return build_refuser(RefuserConfig(**CONFIG), out, progress=False)


def test_the_testbed_learns_to_refuse_and_loads(testbed):
    record = json.loads((testbed / "testbed.json").read_text())
    assert record["settings"]["steps"] == 40 and len(record["losses"]) == 40
    losses = record["losses"]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    assert set(record["check"]) == {"harmful", "benign"} and record["check"]["harmful"]["n"] == 54
    before, after = _refusal_loss("tiny"), _refusal_loss(str(testbed))
    assert after < 0.7 * before, (before, after)  # held-out prompts: the refusal generalises (7.1 -> 4.0 here)
    assert not any(p.name.startswith(".") for p in testbed.parent.iterdir())  # no temporary folder left


def test_the_same_settings_reuse_the_folder_and_others_refuse_it(testbed):
    mtime = (testbed / "testbed.json").stat().st_mtime_ns
    assert build_refuser(RefuserConfig(**CONFIG), testbed, progress=False) == testbed
    assert (testbed / "testbed.json").stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="other settings"):
        build_refuser(RefuserConfig(**{**CONFIG, "steps": 41}), testbed, progress=False)
    assert refuser_dir(RefuserConfig(**CONFIG), "/c") != refuser_dir(RefuserConfig(**{**CONFIG, "seed": 1}), "/c")


@pytest.mark.parametrize("key,value", [("steps", 0), ("lr", 0.0), ("batch_size", 1), ("dtype", "float16")])
def test_bad_settings_name_the_field(key, value):
    with pytest.raises(ConfigError, match=f"testbed {key}"):
        RefuserConfig(**{**CONFIG, key: value}).validate()


def test_refuser_path_end_to_end(testbed, tmp_path, capsys):
    """Pools from the refuser by elicitation (prefill first), CRL on them, evaluation with the refuser
    as the base model. The tiny model's text is gibberish, judged here by refusal strings only (the
    combined judge calls it incoherent): the test checks the plumbing, not the numbers."""
    pools = tmp_path / "pools"
    code = crl_main(["data", "build", "--model", str(testbed), "--out", str(pools), "--limit", "4",
                     "--max-new-tokens", "4", "--no-progress", "--elicit", "prefill_target,direct",
                     "--judge", "refusal_string"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((pools / "summary.json").read_text())
    harmful = [json.loads(l) for l in (pools / "harmful.jsonl").read_text().splitlines()]
    assert len(harmful) == 4 and summary, summary  # every prompt yielded (prefilled) text that is not a refusal
    run = tmp_path / "run"
    code = crl_main(["train", "configs/tiny.toml", "--output-dir", str(run), "--set", f'model.name="{testbed}"',
                     "--set", f'data.pools="{pools}"', "--set", "optim.max_steps=2", "--set", "data.max_length=256"])
    assert code == 0, capsys.readouterr().err
    assert (run / "adapter" / "adapter_config.json").is_file()
    ev = tmp_path / "eval.toml"
    ev.write_text(f'base_model = "{testbed}"\nmax_new_tokens = 4\n[adapters]\ncrl = "{run}"\n'
                  '[[prompt_sets]]\nname = "harmful"\nsource = "demo:harmful:heldout"\nlimit = 2\n'
                  '[[attacks]]\nname = "prefill"\nkind = "prefill"\n[judge]\nuse_semantic = false\n'
                  '[capability]\nbenign_set = ""\nover_refusal_set = ""\nharmful_nll = false\n[report]\nplots = false\npca = false\n')
    assert crl_main(["eval", str(ev), "--output-dir", str(tmp_path / "eval"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["models"]["crl"]["attacks"]["prefill"]["n"] == 2
