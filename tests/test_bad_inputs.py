"""Every user mistake is one line on stderr (`crl: error: ...`) naming the file or option and the field,
with exit code 2, and leaves an existing run folder byte for byte as it was (issue 19).

The commands run in-process (`crl.cli.main`); mistakes found after the model is loaded use the tiny
model, which is built in-process in well under a second."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from crl.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.toml"

EVAL_TOML = """base_model = "tiny"
max_new_tokens = 4

[[prompt_sets]]
name = "harmful"
source = "{source}"
role = "harmful"
limit = 2

[[attacks]]
name = "direct"
kind = "{kind}"
{attack}
"""


def snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, make_toy_pools) -> dict[str, Path]:
    """Pools (good and broken), a finished-for-now run folder, an evaluation folder, data files."""
    root = tmp_path_factory.mktemp("bad_inputs")
    pools = make_toy_pools(6, 6, 2)
    paths = {"root": root, "pools": pools}
    for name, damage in (("pools_bad_json", lambda t: t + '{"id": "h99", "prompt": "cut sh\n'),
                         ("pools_no_prompt", lambda t: t + '{"id": "h99", "response": "no prompt here"}\n'),
                         ("pools_torn", lambda t: t[: len(t) // 2])):
        folder = root / name
        shutil.copytree(pools, folder)
        harmful = folder / "harmful.jsonl"
        harmful.write_text(damage(harmful.read_text()))
        paths[name] = folder
    run = root / "run"
    rc = main(["train", str(TINY), "--output-dir", str(run), "--set", "optim.max_steps=2",
               "--set", f'data.pools="{pools}"', "--set", "run.checkpoint_every=1"])
    assert rc == 0 and (run / "checkpoints" / "step-000002").is_dir()
    paths["run"] = run
    evals = root / "eval"
    evals.mkdir()
    (evals / "records.jsonl").write_text('{"model": "base", "purpose": "attack", "attack": "direct", "prompt_id": "1"}\n')
    (evals / "capability.json").write_text('{"base": {"kl": 0.0}}\n')
    paths["eval"] = evals
    (root / "a_file").write_text("not a folder")
    (root / "adv.csv").write_text("foo,bar\nhello,world\n")
    (root / "prompts.jsonl").write_text('{"id": "1", "prompt": "hi"}\n{"id": "2", "prompt": \n')
    (root / "no_prompt.jsonl").write_text('{"id": "1", "response": "hi"}\n')
    (root / "bad_syntax.toml").write_text("[optim\nlr = 1\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "types.toml").write_text('[lora]\nr = "four"\n')
    return paths


def train(*sets: str, out: str = "run", resume: bool = True, extra: tuple[str, ...] = (), config: str | None = None):
    """argv of `crl train` on the existing run folder (with --resume) or another folder of `work`."""

    def argv(w: dict[str, Path]) -> list[str]:
        target = str(w[out]) if out in w else str(w["root"] / out)
        args = ["train", config.format(**{k: str(v) for k, v in w.items()}) if config else str(TINY),
                "--output-dir", target, "--set", f'data.pools="{w["pools"]}"', "--set", "optim.max_steps=2",
                "--set", "run.checkpoint_every=1"]
        args += [a for s in sets for a in ("--set", s.format(**{k: str(v) for k, v in w.items()}))]
        return args + (["--resume"] if resume else []) + list(extra)

    return argv


def evaluate(source: str = "demo:harmful:heldout", kind: str = "direct", attack: str = "", *, out: str = "eval",
             sets: tuple[str, ...] = (), top: str = ""):
    def argv(w: dict[str, Path]) -> list[str]:
        text = top + EVAL_TOML.format(source=source.format(**{k: str(v) for k, v in w.items()}), kind=kind, attack=attack)
        path = w["root"] / f"eval_{abs(hash(text))}.toml"
        path.write_text(text)
        target = str(w[out]) if out in w else str(w["root"] / out)
        return ["eval", str(path), "--output-dir", target, "--no-progress", *[a for s in sets for a in ("--set", s)]]

    return argv


#: id -> (argv builder, what the one line must name)
CASES: dict[str, tuple[Callable[[dict[str, Path]], list[str]], tuple[str, ...]]] = {
    # numbers that are not finite, or out of their range
    "margin nan": (train("loss.crl.harmful_margin=nan"), ("tiny.toml: loss.crl.harmful_margin", "finite")),
    "lr inf": (train("optim.lr=inf"), ("optim.lr", "finite")),
    "benign weight nan": (train("loss.crl.benign_weight=nan"), ("loss.crl.benign_weight", "finite")),
    "schedule end nan": (train("loss.crl.harmful_weight={{start = 0.5, end = nan}}"), ("loss.crl.harmful_weight.end",)),
    "max_grad_norm -1": (train("optim.max_grad_norm=-1"), ("optim.max_grad_norm", "> 0")),
    "max_grad_norm 0": (train("optim.max_grad_norm=0"), ("optim.max_grad_norm",)),
    "lr 0": (train("optim.lr=0"), ("optim.lr",)),
    "lr negative": (train("optim.lr=-1e-3"), ("optim.lr",)),
    "lr too large": (train("optim.lr=5"), ("optim.lr", "(0, 1]")),
    "weight_decay negative": (train("optim.weight_decay=-0.1"), ("optim.weight_decay",)),
    "weight_decay nan": (train("optim.weight_decay=nan"), ("optim.weight_decay",)),
    "margin negative": (train("loss.crl.benign_margin=-0.5"), ("loss.crl.benign_margin", ">= 0")),
    "mix weight -inf": (train("loss.crl.mix_weight=-inf"), ("loss.crl.mix_weight",)),
    "kl temperature 0": (train("loss.kl_temperature=0"), ("loss.kl_temperature",)),
    "kl temperature nan": (train("loss.kl_temperature=nan"), ("loss.kl_temperature",)),
    "schedule negative end": (train("loss.crl.harmful_weight={{start = 0.5, end = -1}}"), ("loss.crl.harmful_weight",)),
    "cb coefficient negative": (train("loss.circuit_breakers.coefficient=-1"), ("loss.circuit_breakers.coefficient",)),
    "repbend weight inf": (train("loss.repbend.retain_kl_weight=inf"), ("loss.repbend.retain_kl_weight",)),
    "dropout 1.5": (train("lora.dropout=1.5"), ("lora.dropout",)),
    "lora r 0": (train("lora.r=0"), ("lora.r",)),
    "lora layers negative": (train("lora.layers=[-1]"), ("lora.layers",)),
    "batch size 0": (train("data.batch_size=0"), ("data.batch_size",)),
    "max_length 2": (train("data.max_length=2"), ("data.max_length",)),
    "max_steps 0": (train("optim.max_steps=0"), ("optim.max_steps",)),
    "on_nonfinite unknown": (train('optim.on_nonfinite="ignore"'), ("optim.on_nonfinite", "'stop', 'skip'")),
    "checkpoint_every 0": (train("run.checkpoint_every=0"), ("run.checkpoint_every",)),
    "mining weight negative": (train("mining.weight=-1"), ("mining.weight",)),
    "refinement eps nan": (train("refinement.eps=nan"), ("refinement.eps",)),
    "refinement probability 1.5": (train("refinement.probability=1.5"), ("refinement.probability",)),
    "module stop loss inf": (train("refinement.module_stop_loss=inf"), ("refinement.module_stop_loss",)),
    "target layers empty": (train("loss.target_layers=[]"), ("loss.target_layers",)),
    "target layer 0": (train("loss.target_layers=[0]"), ("loss.target_layers",)),
    # wrong types and keys
    "grad_accumulation bool": (train("optim.grad_accumulation=true"), ("optim.grad_accumulation", "integer")),
    "lr a string": (train('optim.lr="fast"'), ("optim.lr", "a number")),
    "lr a table": (train("optim.lr={{x = 1}}"), ("optim.lr",)),
    "method unknown": (train('loss.method="magic"'), ("loss.method",)),
    "key misspelled": (train("loss.margn=1"), ("loss", "'margn'")),
    "moved key": (train("loss.alpha=1"), ("loss.alpha", "loss.crl.benign_weight")),
    "dtype unknown": (train('model.dtype="float8"'), ("model.dtype",)),
    "pools not a string": (train("data.pools=3"), ("data.pools",)),
    "lora r a string (file)": (train(config="{root}/types.toml"), ("types.toml: lora.r",)),
    # --set and the command line
    "--set without =": (train("optim.lr"), ("--set 'optim.lr'", "KEY=VALUE")),
    "--set into a value": (train("optim.lr.x=1"), ("--set", "'lr' is a value")),
    "--set empty key": (train("=3"), ("--set", "empty key")),
    "--max-steps 0": (train(extra=("--max-steps", "0")), ("--max-steps",)),
    # config files
    "config missing": (train(config="{root}/nothing.toml"), ("nothing.toml", "not found")),
    "config syntax": (train(config="{root}/bad_syntax.toml"), ("bad_syntax.toml", "cannot parse")),
    "config not a table": (train(config="{root}/list.yaml"), ("list.yaml", "top level")),
    # the run folder
    "another config on resume": (train("optim.lr=2e-3"), ("optim.lr: 0.001 there, 0.002 here",)),
    "checkpoints without --resume": (train(resume=False), ("--resume",)),
    "output dir is a file": (train(out="a_file", resume=False), ("--output-dir", "a_file", "is a file")),
    "output dir under a file": (train(out="a_file/run", resume=False), ("--output-dir", "is a file")),
    # found once the model is loaded (a fresh folder each)
    "model path missing": (train('model.name="{root}/no_such_model"', out="fresh_model", resume=False),
                           ("tiny.toml: model.name", "no_such_model", "not found")),
    "target layer beyond the model": (train("loss.target_layers=[99]", out="fresh_layers", resume=False),
                                      ("tiny.toml: loss.target_layers", "hidden states 1..4", "[99]")),
    "benign layer beyond the model": (train("loss.benign_layers=[2, 50]", out="fresh_benign", resume=False),
                                      ("loss.benign_layers", "[2, 50]")),
    "lora layer beyond the model": (train("lora.layers=[0, 12]", out="fresh_lora", resume=False),
                                    ("lora.layers", "decoder layers 0..3")),
    # data files
    "pools malformed line": (train('data.pools="{pools_bad_json}"', out="fresh_json", resume=False),
                             ("tiny.toml: data.pools", "harmful.jsonl", "line 7", "invalid JSON")),
    "pools missing field": (train('data.pools="{pools_no_prompt}"', out="fresh_field", resume=False),
                            ("data.pools", "harmful.jsonl", "line 7", "'prompt'")),
    "pools truncated": (train('data.pools="{pools_torn}"', out="fresh_torn", resume=False),
                        ("data.pools", "harmful.jsonl", "invalid JSON")),
    "pools folder missing": (train('data.pools="{root}/no_pools"', out="fresh_nopools", resume=False),
                             ("data.pools", "no_pools", "does not exist")),
    # evaluation configs
    "eval csv unknown columns": (evaluate("{root}/adv.csv"), ("prompt_sets.harmful.source", "adv.csv")),
    "eval jsonl malformed": (evaluate("{root}/prompts.jsonl"), ("prompt_sets.harmful.source", "prompts.jsonl", "line 2")),
    "eval jsonl missing field": (evaluate("{root}/no_prompt.jsonl"), ("prompt_sets.harmful.source", "'prompt'")),
    "eval file missing": (evaluate("{root}/nothing.csv"), ("prompt_sets.harmful.source", "nothing.csv")),
    "eval demo misspelled": (evaluate("demo:harmfull:heldout"), ("prompt_sets[0].source", "demo:harmfull:heldout")),
    "eval demo split misspelled": (evaluate("demo:harmful:held"), ("prompt_sets[0].source",)),
    "eval template unknown": (evaluate(kind="template", attack='template = "refusal_supression"'),
                              ("attacks[0].template", "refusal_supression")),
    "eval attack kind unknown": (evaluate(kind="jailbreak"), ("attacks[0].kind",)),
    "eval attack set unknown": (evaluate(attack='prompt_set = "harmfull"'), ("attacks.direct.prompt_set",)),
    "eval eps negative": (evaluate(kind="latent", attack="eps = -1.0"), ("attacks[0].eps",)),
    "eval perplexity nan": (evaluate(sets=("judge.max_perplexity=nan",)), ("judge.max_perplexity", "finite")),
    "eval max_new_tokens 0": (evaluate(sets=("max_new_tokens=0",)), ("max_new_tokens",)),
    "eval --set without =": (evaluate(sets=("judge.kind",)), ("--set", "KEY=VALUE")),
    "eval unknown key": (evaluate(top="max_new_token = 3\n"), ("unknown key", "'max_new_token'")),
    "eval output dir is a file": (evaluate(out="a_file"), ("--output-dir", "is a file")),
}


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_the_field(case: str, work: dict[str, Path], capsys) -> None:
    build, named = CASES[case]
    before = {name: snapshot(work[name]) for name in ("run", "eval", "pools")}
    capsys.readouterr()
    rc = main(build(work))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("crl: error: "), err
    for part in named:
        assert part in lines[0], (part, lines[0])
    assert "Traceback" not in out + err
    for name, files in before.items():
        assert snapshot(work[name]) == files, f"{name} changed"


def test_a_read_only_output_folder_is_one_line(work: dict[str, Path], capsys, tmp_path) -> None:
    """/sys refuses new folders even to root (a chmod does not stop root)."""
    if not Path("/sys").is_dir():
        pytest.skip("no /sys")
    rc = main(train(out="/sys/crl-test-run", resume=False)(work))
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "--output-dir /sys/crl-test-run: cannot write there" in lines[0], lines
    assert not Path("/sys/crl-test-run").exists()


def test_the_run_folder_still_resumes_afterwards(work: dict[str, Path], tmp_path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(work["run"], run)
    rc = main(["train", str(TINY), "--output-dir", str(run), "--resume", "--set", f'data.pools="{work["pools"]}"',
               "--set", "optim.max_steps=2", "--set", "run.checkpoint_every=1"])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
