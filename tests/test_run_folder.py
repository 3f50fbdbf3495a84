"""A run folder survives interruptions, damaged files and bad numbers (issue 19): resumption from the
newest complete checkpoint, metrics without repeated steps, orphan cleanup, pruning by step number,
non-finite losses, and the atomic writes of the evaluation folder."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from crl.models import build_tiny_llama
from crl.training.checkpoint import (
    DamagedCheckpoint,
    atomic_directory,
    list_checkpoints,
    prune_checkpoints,
    remove_orphans,
    verify_checkpoint,
    verify_safetensors,
)
from crl.training.config import TrainConfig, load_train_config
from crl.training.step import LossComputer
from crl.training.trainer import Trainer, TrainingDiverged, truncate_metrics

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("loss", "loss_benign", "loss_harmful", "loss_kl", "grad_norm", "lr")


@pytest.fixture(scope="module")
def pools_dir(make_toy_pools) -> Path:
    return make_toy_pools(8, 8, 2)


def tiny_config(pools: Path, *sets: str) -> TrainConfig:
    base = [f'data.pools="{pools}"', "optim.max_steps=6", "run.checkpoint_every=2", "run.keep_checkpoints=3",
            "lora.dropout=0.1"]
    return load_train_config(REPO / "configs" / "tiny.toml", [*base, *sets])


def run(config: TrainConfig, out: Path, *, resume: bool = False, max_steps: int | None = None) -> Trainer:
    torch.set_num_threads(1)
    model, tokenizer = build_tiny_llama(seed=0)
    trainer = Trainer(config, out, resume=resume, model=model, tokenizer=tokenizer)
    trainer.train(max_steps=max_steps)
    return trainer


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in COMPARED:
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)


@pytest.fixture(scope="module")
def straight(pools_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The metrics of an uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    run(tiny_config(pools_dir), out)
    return metrics(out)


# --- repeated steps ----------------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [False, True])
def test_rerun_before_the_first_checkpoint_logs_every_step_once(tmp_path, pools_dir, straight, resume, capsys) -> None:
    config = tiny_config(pools_dir, "run.checkpoint_every=3")
    run(config, tmp_path, max_steps=2)  # killed before its first checkpoint
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2] and not list_checkpoints(tmp_path / "checkpoints")
    run(config, tmp_path, resume=resume)
    assert_same_run(metrics(tmp_path), straight)
    if resume:
        assert "from step 0 (no complete checkpoint yet)" in capsys.readouterr().err


def test_metrics_with_repeated_and_torn_lines_are_repaired(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(i)} for i, s in enumerate([1, 2, 1, 2, 3, 4])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "loss": 0.')
    truncate_metrics(path, 3)
    assert [json.loads(l) for l in path.read_text().splitlines()] == [rows[2], rows[3], rows[4]]
    truncate_metrics(path, 0)
    assert path.read_text() == ""


def test_a_torn_last_metrics_line_does_not_stop_resume(tmp_path, pools_dir, straight) -> None:
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=3)  # checkpoint at 2, metrics up to 3
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 0.12')  # the disk filled up mid-write
    run(config, tmp_path, resume=True)
    assert_same_run(metrics(tmp_path), straight)


# --- which checkpoint a resumed run takes ------------------------------------------------------------


@pytest.mark.parametrize("latest", ["stale", "missing", "garbage"])
def test_resume_takes_the_newest_checkpoint_whatever_latest_says(tmp_path, pools_dir, straight, latest, capsys) -> None:
    config = tiny_config(pools_dir, "run.keep_checkpoints=2")
    run(config, tmp_path, max_steps=4)  # checkpoints 2 and 4
    pointer = tmp_path / "checkpoints" / "latest"
    {"stale": lambda: pointer.write_text("step-000002\n"), "missing": pointer.unlink,
     "garbage": lambda: pointer.write_bytes(b"\x00\xff")}[latest]()
    capsys.readouterr()
    trainer = run(config, tmp_path, resume=True)
    assert "crl: resuming" in capsys.readouterr().err and trainer.step == 6
    assert_same_run(metrics(tmp_path), straight)
    # pruning by step number kept the newest two, with the one just written
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000004", "step-000006"]


def test_without_latest_a_rerun_still_needs_resume(tmp_path, pools_dir) -> None:
    from crl.config import ConfigError

    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=2)
    (tmp_path / "checkpoints" / "latest").unlink()
    with pytest.raises(ConfigError, match="--resume"):
        run(config, tmp_path)
    with pytest.raises(ConfigError, match="optim.lr: 0.001 there, 0.002 here"):  # and the config is checked
        run(tiny_config(pools_dir, "optim.lr=2e-3"), tmp_path, resume=True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated adapter.safetensors": lambda c: _truncate(c / "adapter.safetensors"),
    "truncated optimizer.safetensors": lambda c: _truncate(c / "optimizer.safetensors"),
    "truncated optimizer.json": lambda c: _truncate(c / "optimizer.json"),
    "missing rng.safetensors": lambda c: (c / "rng.safetensors").unlink(),
    "empty scheduler.json": lambda c: (c / "scheduler.json").write_text(""),
    "truncated trainer_state.json": lambda c: _truncate(c / "trainer_state.json"),
    "garbage safetensors header": lambda c: (c / "adapter.safetensors").write_bytes(struct.pack("<Q", 5) + b"{oops"),
    "missing folder contents": lambda c: [p.unlink() for p in c.iterdir()],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, pools_dir, straight, damage, capsys) -> None:
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=4)  # checkpoints 2 and 4
    newest = tmp_path / "checkpoints" / "step-000004"
    DAMAGE[damage](newest)
    with pytest.raises(DamagedCheckpoint):
        verify_checkpoint(newest)
    capsys.readouterr()
    run(config, tmp_path, resume=True)
    err = capsys.readouterr().err
    assert "checkpoint step-000004 is damaged, passed over" in err
    assert "step-000002 (step 2)" in err
    assert_same_run(metrics(tmp_path), straight)
    for path in list_checkpoints(tmp_path / "checkpoints"):
        verify_checkpoint(path)  # the damaged one was replaced when the run got there again


def test_a_checkpoint_unreadable_despite_its_headers_falls_back(tmp_path, pools_dir, straight, capsys) -> None:
    """A tensor the optimizer state refers to is absent (the JSON parses, the headers fit): reading
    fails, and the run takes the previous checkpoint instead of a traceback."""
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=4)
    state = tmp_path / "checkpoints" / "step-000004" / "optimizer.json"
    state.write_text(state.read_text().replace('"t0"', '"t999"', 1))
    verify_checkpoint(state.parent)
    run(config, tmp_path, resume=True)
    assert "cannot be read" in capsys.readouterr().err
    assert_same_run(metrics(tmp_path), straight)


def test_every_checkpoint_damaged_starts_again_from_step_0(tmp_path, pools_dir, straight, capsys) -> None:
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=4)
    for path in list_checkpoints(tmp_path / "checkpoints"):
        _truncate(path / "adapter.safetensors")
    run(config, tmp_path, resume=True)
    assert "from step 0" in capsys.readouterr().err
    assert_same_run(metrics(tmp_path), straight)


def test_orphans_of_a_killed_run_are_removed(tmp_path, pools_dir) -> None:
    config = tiny_config(pools_dir)
    run(config, tmp_path, max_steps=2)
    leftovers = [tmp_path / "checkpoints" / ".step-000004.x1", tmp_path / ".adapter.x2",
                 tmp_path / ".adapter.old-x3"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "adapter.safetensors").write_bytes(b"partial")
    files = [tmp_path / ".metrics.jsonl.x4.tmp", tmp_path / "checkpoints" / ".latest.x5.tmp"]
    for f in files:
        f.write_text("partial")
    (tmp_path / ".keep-me").write_text("not ours")
    run(config, tmp_path, resume=True)
    assert not any(p.exists() for p in leftovers + files)
    assert (tmp_path / ".keep-me").exists() and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_remove_orphans_touches_only_temporary_names(tmp_path) -> None:
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-000004.abc").mkdir()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    removed = remove_orphans(tmp_path)
    assert [p.name for p in removed] == [".step-000004.abc"]
    assert (tmp_path / "checkpoints" / "step-000002").is_dir() and (tmp_path / "adapter").is_dir()


def test_pruning_orders_by_step_number_and_keeps_the_one_written(tmp_path) -> None:
    for name in ("step-8", "step-99", "step-100", "step-000005", "notes"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005", "step-8", "step-99", "step-100"]
    removed = prune_checkpoints(tmp_path, 1, written=tmp_path / "step-000005")
    assert sorted(p.name for p in removed) == ["step-8", "step-99"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step-000005", "step-100"]


# --- safetensors verification -------------------------------------------------------------------------


def test_verify_safetensors(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(0), "i": torch.arange(3)}, str(path))
    verify_safetensors(path)
    whole = path.read_bytes()
    for cut in (1, 8, len(whole) // 2, len(whole) - 1):
        path.write_bytes(whole[:cut])
        with pytest.raises(DamagedCheckpoint, match="a.safetensors"):
            verify_safetensors(path)
    path.write_bytes(whole + b"\x00")
    with pytest.raises(DamagedCheckpoint, match="bytes where the header describes"):
        verify_safetensors(path)
    save_file({}, str(path))
    verify_safetensors(path)


# --- non-finite losses ---------------------------------------------------------------------------------


@pytest.fixture
def nan_at_step_2(monkeypatch):
    """The loss of optimizer step 2 (0-based step 1) becomes NaN."""
    real = LossComputer.__call__

    def poisoned(self, batches, progress):
        out = real(self, batches, progress)
        if batches.step == 1:
            out.loss = out.loss * float("nan")
            out.values["loss"] = out.values["loss"] * float("nan")
        return out

    monkeypatch.setattr(LossComputer, "__call__", poisoned)


def test_a_nonfinite_loss_stops_before_the_update(tmp_path, pools_dir, straight, nan_at_step_2, monkeypatch) -> None:
    config = tiny_config(pools_dir, "run.checkpoint_every=1")
    with pytest.raises(TrainingDiverged, match=r"step 2: loss = nan, grad_norm = nan .*step-000001 holds the last good state"):
        run(config, tmp_path)
    assert [m["step"] for m in metrics(tmp_path)] == [1]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000001"]
    assert not (tmp_path / "adapter").exists()
    monkeypatch.undo()  # the cause fixed: the run resumes from its last good checkpoint
    run(config, tmp_path, resume=True)
    assert_same_run(metrics(tmp_path), straight)


def test_the_cli_reports_a_diverged_run_in_one_line(tmp_path, pools_dir, nan_at_step_2, capsys) -> None:
    from crl.cli import main

    sets = [f'data.pools="{pools_dir}"', "optim.max_steps=3"]
    rc = main(["train", str(REPO / "configs" / "tiny.toml"), "--output-dir", str(tmp_path / "run"),
               *[a for s in sets for a in ("--set", s)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("crl: error: step 2: loss = nan"), err


def test_skip_drops_the_update_logs_it_and_continues(tmp_path, pools_dir, nan_at_step_2, capsys) -> None:
    config = tiny_config(pools_dir, 'optim.on_nonfinite="skip"')
    trainer = run(config, tmp_path)
    rows = metrics(tmp_path)
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[1]["nonfinite"] == ["loss", "grad_norm"] and rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    assert all("nonfinite" not in m and math.isfinite(m["loss"]) for i, m in enumerate(rows) if i != 1)
    assert "step 2: loss = nan" in capsys.readouterr().err
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.isfinite(p).all() for p in unwrapped.parameters())
    # an Adam moment never saw the NaN gradient
    assert all(torch.isfinite(v).all() for s in trainer.optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def test_skipped_update_leaves_the_weights_as_they_were(tmp_path, pools_dir, nan_at_step_2) -> None:
    config = tiny_config(pools_dir, 'optim.on_nonfinite="skip"')
    trainer = run(config, tmp_path, max_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train(max_steps=2)
    assert trainer.step == 2
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_on_nonfinite_may_change_on_resume(tmp_path, pools_dir) -> None:
    run(tiny_config(pools_dir), tmp_path, max_steps=2)
    assert run(tiny_config(pools_dir, 'optim.on_nonfinite="skip"'), tmp_path, resume=True).step == 6


# --- atomic writes -------------------------------------------------------------------------------------


def test_a_failed_adapter_write_leaves_the_old_adapter(tmp_path) -> None:
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "adapter_config.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert [p.name for p in final.iterdir()] == ["adapter_config.json"]
    with atomic_directory(final) as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    assert [p.name for p in final.iterdir()] == ["adapter_model.safetensors"]


def test_record_store_repair_is_atomic(tmp_path, monkeypatch) -> None:
    from crl.evaluation.runner import RecordStore

    path = tmp_path / "records.jsonl"
    recs = [{"model": "base", "purpose": "attack", "attack": "direct", "prompt_id": str(i), "response": "x"}
            for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"model": "base", "att'
    path.write_text(text)

    def killed(*args):
        raise KeyboardInterrupt  # the process dies at the rename

    monkeypatch.setattr("crl.training.checkpoint.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        RecordStore(path)
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["records.jsonl"]
    monkeypatch.undo()
    store = RecordStore(path)
    assert len(store.records) == 3 and path.read_text() == text[: text.rindex("\n") + 1]
    path.write_text(path.read_text() + "[1, 2]\n" + json.dumps({"model": "base"}) + "\n")  # not records
    assert len(RecordStore(path).records) == 3


def test_damaged_capability_and_hidden_states_are_measured_again(tmp_path, capsys) -> None:
    import numpy as np

    from crl.config import ConfigError
    from crl.evaluation.report import write_report
    from crl.evaluation.runner import read_capability, read_hidden_states

    cap = tmp_path / "capability.json"
    cap.write_text('{"base": {"kl": 0.1}, "crl": {"kl"')
    assert read_capability(cap) == {}
    with pytest.raises(ConfigError, match="capability.json: damaged"):
        write_report(tmp_path, plots=False)
    hs = tmp_path / "hidden_states.npz"
    np.savez(hs, **{"base|harmful|2": np.ones((3, 4))})
    assert list(read_hidden_states(hs)) == ["base|harmful|2"]
    _truncate(hs)
    assert read_hidden_states(hs) == {}
    assert "damaged" in capsys.readouterr().err


def test_a_damaged_demo_build_json_is_one_line(tmp_path, capsys) -> None:
    """`data.pools = "demo"` keeps its pools in the run folder; crl.data.build writes build.json in
    place, so a kill can leave it cut short: a clear error, not a JSONDecodeError."""
    from crl.cli import main

    (tmp_path / "run" / "pools").mkdir(parents=True)
    (tmp_path / "run" / "pools" / "build.json").write_text('{"format": 1, "mod')
    rc = main(["train", str(REPO / "configs" / "tiny.toml"), "--output-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "data.pools:" in lines[0] and "build.json is damaged" in lines[0], lines
