"""Behaviour pinned by golden files (tests/golden/): refactors must leave these bit-identical.

- The tiny model's metrics.jsonl for each training method (tests/golden/record_training_metrics.py).
- The judges' verdicts on every labelled set (XSTest's 2 x 450 human-labelled completions when
  ../shared/data is present, and data/judge_labels/), recorded by tests/golden/record_judge_verdicts.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"


def _load(name: str):
    """A recorder script of tests/golden as a module."""
    spec = importlib.util.spec_from_file_location(name, GOLDEN / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("judge", ["combined", "combined_rules", "combined_no_semantic"])
def test_judge_verdicts_unchanged(judge):
    recorder = _load("record_judge_verdicts")
    xstest = recorder.REPO.parent / "shared" / "data" / "xstest"
    golden = json.loads((GOLDEN / "judge_verdicts.json").read_text())[judge]
    now = recorder.verdicts(judge, xstest if xstest.is_dir() else None)
    if not xstest.is_dir():
        golden = {k: v for k, v in golden.items() if not k.startswith("xstest/")}
    assert set(now) == set(golden)
    for name, expected in golden.items():
        changed = [(i, e, g) for i, (e, g) in enumerate(zip(expected, now[name])) if e != g]
        assert len(now[name]) == len(expected) and not changed, f"{judge} on {name}: {changed[:10]}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["crl", "circuit_breakers", "repbend", "crl_mining_refinement", "crl_adversary_module"])
def test_training_metrics_unchanged(name, tmp_path):
    """The tiny model's metrics at a fixed seed, for each method and CRL with mining and refinement:
    bit for bit on the machine that recorded them (CPU, torch version, one thread); elsewhere float
    rounding may differ, so a relative 1e-5 is allowed there."""
    recorder = _load("record_training_metrics")
    golden = json.loads((GOLDEN / f"metrics_{name}.json").read_text())
    rows = recorder.run(name, tmp_path)
    exact = golden["machine"] == recorder.machine()
    assert len(rows) == len(golden["rows"])
    for got, want in zip(rows, golden["rows"]):
        assert list(got) == list(want), f"step {want['step']}: keys {list(got)} != {list(want)}"
        for key, value in want.items():
            if exact or not isinstance(value, float):
                assert got[key] == value, f"step {want['step']} {key}: {got[key]!r} != {value!r}"
            else:
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"step {want['step']} {key}"
