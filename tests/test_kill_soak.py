"""Kill soak (issue 19): `crl train` on the tiny model, killed again and again at random moments and
resumed each time, ends with the metrics.jsonl of an uninterrupted run, no step twice, and nothing
temporary left behind.

The kills are deterministic (seeded): each attempt runs in a child process in which one write
function calls `os._exit(9)` at its Nth call, after writing half of what it was asked to (a metrics
line, a checkpoint's safetensors file, the final adapter), or around a rename (`os.replace`: a
temporary folder complete but unpublished, or a checkpoint published with `latest` still naming the
previous one), or part-way through deleting a folder (pruning); some attempts are SIGKILLed after a
random delay instead. The first kill comes before the first checkpoint and its rerun has no
`--resume`. The attempts are forked from a driver process (this file run as a script) that imports
crl once and never computes anything itself, so every attempt starts in well under a second.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SETS = ["optim.max_steps=24", "run.checkpoint_every=2", "run.keep_checkpoints=2", "lora.dropout=0.1"]
KILLED = 9
FALLBACK = 10


# --- the driver (a separate process) ---------------------------------------------------------------


def _counter(n: int):
    calls = [0]

    def hit() -> bool:
        calls[0] += 1
        return calls[0] == n

    return hit


def _torn_metrics(hit, code: int = KILLED) -> None:
    """The Nth append to metrics.jsonl writes half its line, then the process dies."""
    import builtins

    import crl.training.trainer as trainer_module

    real_open = builtins.open

    class Torn:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            os._exit(code)

    def opening(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if mode == "a" and str(path).endswith("metrics.jsonl") and hit():
            return Torn(handle)
        return handle

    trainer_module.open = opening  # the module's global shadows the builtin


def _torn_tensors(hit, module, name: str) -> None:
    """The Nth safetensors file written through `module.name` is half written, then the process dies."""
    from safetensors.torch import save

    real = getattr(module, name)

    def torn(tensors, filename, *args, **kwargs):
        if hit():
            data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
            with open(filename, "wb") as handle:
                handle.write(data[: len(data) // 2])
            os._exit(KILLED)
        return real(tensors, filename, *args, **kwargs)

    setattr(module, name, torn)


def _killed_rename(hit, after: bool) -> None:
    """The Nth os.replace: the process dies just before it, or just after it."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if hit():
            if after:
                real(src, dst, *args, **kwargs)
            os._exit(KILLED)
        return real(src, dst, *args, **kwargs)

    os.replace = replace


def _killed_adapter_swap() -> None:
    """A finished run's adapter rewritten: the process dies once the old adapter/ is set aside, before
    the new one is renamed in (no adapter/ at all until the next start)."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        if ".adapter.old-" in str(dst):
            os._exit(KILLED)

    os.replace = replace


def _partial_rmtree(hit) -> None:
    """The Nth folder removal (pruning, clearing) deletes half of its files, then the process dies."""
    import shutil

    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if hit():
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files[: max(1, len(files) // 2)]:
                f.unlink()
            os._exit(KILLED)
        return real(path, *args, **kwargs)

    shutil.rmtree = rmtree


def _install(kill: dict) -> None:
    import crl.training.checkpoint as checkpoint_module

    kind, hit = kill["kind"], _counter(kill["n"])
    if kind == "metrics":
        _torn_metrics(hit)
    elif kind == "tensors":
        _torn_tensors(hit, checkpoint_module, "save_file")
    elif kind == "adapter":
        import peft.peft_model

        _torn_tensors(hit, peft.peft_model, "safe_save_file")
    elif kind in ("rename_before", "rename_after"):
        _killed_rename(hit, after=kind == "rename_after")
    elif kind == "rmtree":
        _partial_rmtree(hit)
    elif kind == "adapter_swap":
        _killed_adapter_swap()
    if kill.get("fallback") and kind != "metrics":  # it dies in this metrics write at the latest (two steps on)
        _torn_metrics(_counter(kill["fallback"]), FALLBACK)


def _attempt(argv: list[str], kill: dict | None) -> int:
    """Fork a child that runs `crl train` (with its kill installed); SIGKILL it after kill["delay"]
    seconds for kind "sigkill". Returns its exit code (-9 for SIGKILL)."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            import torch

            from crl.cli import main

            torch.set_num_threads(1)
            if kill is not None:
                _install(kill)
            code = main(argv)
        except BaseException:  # noqa: BLE001 - report, never return into the driver
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if kill is not None and kill["kind"] == "sigkill":
        deadline = time.monotonic() + kill["delay"]
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _steps_logged(run: Path) -> list[int]:
    """The steps of metrics.jsonl's complete lines (a torn last line left out)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            continue
    return steps


def _plan(rng: random.Random) -> list[dict | None]:
    """The attempts: the first dies in its first metrics write (before any checkpoint); ten at random
    (every kind at least once), each with a fallback kill in its third metrics write, so that no
    attempt gets more than two steps further and the run is not finished before the adapter kills;
    one dies in the final adapter write; one finishes; one resumes the finished run and dies while
    its adapter is being swapped in; None: an attempt without a kill."""
    plan: list[dict | None] = [{"kind": "metrics", "n": 1}]
    kinds = ["metrics", "tensors", "rename_before", "rename_after", "rmtree", "sigkill"]
    kinds += [rng.choice(kinds) for _ in range(4)]
    rng.shuffle(kinds)
    for kind in kinds:
        n = {"metrics": rng.randint(1, 2), "tensors": rng.randint(1, 4), "rename_before": rng.randint(1, 3),
             "rename_after": rng.randint(1, 3), "rmtree": 1, "sigkill": 0}[kind]
        kill = {"kind": kind, "n": n, "fallback": 3}  # a metrics kill comes first anyway (n <= 2)
        if kind == "sigkill":
            kill["delay"] = round(rng.uniform(0.3, 3.0), 2)
        plan.append(kill)
    return plan + [{"kind": "adapter", "n": 1}, None, {"kind": "adapter_swap", "n": 1}]


def drive(work: Path, pools: Path, seed: int) -> dict:
    """Run the reference and the killed run in `work`; return what happened."""
    base = ["train", str(REPO / "configs" / "tiny.toml"), "--set", f'data.pools="{pools}"']
    base += [a for s in SETS for a in ("--set", s)]
    assert _attempt(base + ["--output-dir", str(work / "reference")], None) == 0
    run = work / "run"
    history = []
    for i, kill in enumerate(_plan(random.Random(seed)) + [None]):
        if i == 1:  # the rerun after a kill before the first checkpoint: without --resume
            assert not any((run / "checkpoints").glob("step-*"))
        argv = base + ["--output-dir", str(run)] + (["--resume"] if i >= 2 else [])
        code = _attempt(argv, kill)
        steps = _steps_logged(run)
        history.append({"kill": kill, "code": code, "resume": i >= 2, "steps": steps})
        assert steps == list(range(1, len(steps) + 1)), history  # never a step twice, never a gap
    return {"history": history}


# --- the test ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kills_at_random_moments_end_in_the_uninterrupted_run(tmp_path: Path, make_toy_pools) -> None:
    pools = make_toy_pools(8, 8, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), str(pools), "19", str(report)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    history = json.loads(report.read_text())["history"]
    kills = [h for h in history if h["code"] in (KILLED, FALLBACK, -signal.SIGKILL)]
    assert len(kills) >= 12, history
    kinds = {h["kill"]["kind"] for h in kills if h["code"] == KILLED}
    assert {"metrics", "tensors", "adapter", "adapter_swap"} <= kinds, history
    assert history[0]["code"] == KILLED and history[0]["steps"] == [] and not history[1]["resume"]
    assert history[-1]["code"] == 0 and all(h["code"] in (0, KILLED, FALLBACK, -signal.SIGKILL) for h in history), history
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]

    run, reference = tmp_path / "run", tmp_path / "reference"
    got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("seconds_")} for r in rows]  # noqa: E731
    assert [r["step"] for r in got] == list(range(1, 25))
    assert strip(got) == strip(want)

    from crl.training.checkpoint import list_checkpoints, verify_checkpoint, verify_safetensors

    left = [p for p in run.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not left, left
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000022", "step-000024"]
    for path in list_checkpoints(run / "checkpoints"):
        verify_checkpoint(path)
    verify_safetensors(run / "adapter" / "adapter_model.safetensors")
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference / "adapter" / "adapter_model.safetensors").read_bytes()


if __name__ == "__main__":  # the driver: python tests/test_kill_soak.py WORK POOLS SEED REPORT
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # noqa: F401 - imported once here; the attempts are forked from this process

    import crl.cli  # noqa: F401
    import peft.peft_model  # noqa: F401

    result = drive(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    Path(sys.argv[4]).write_text(json.dumps(result, indent=1))
