"""Behaviour pinned by golden files (tests/golden/): refactors must leave these bit-identical.

- The judges' verdicts on every labelled set (XSTest's 2 x 450 human-labelled completions when
  ../shared/data is present, and data/judge_labels/), recorded by tests/golden/record_judge_verdicts.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"


def _recorder():
    spec = importlib.util.spec_from_file_location("record_judge_verdicts", GOLDEN / "record_judge_verdicts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("judge", ["combined", "combined_no_semantic"])
def test_judge_verdicts_unchanged(judge):
    recorder = _recorder()
    xstest = recorder.REPO.parent / "shared" / "data" / "xstest"
    golden = json.loads((GOLDEN / "judge_verdicts.json").read_text())[judge]
    now = recorder.verdicts(judge, xstest if xstest.is_dir() else None)
    if not xstest.is_dir():
        golden = {k: v for k, v in golden.items() if not k.startswith("xstest/")}
    assert set(now) == set(golden)
    for name, expected in golden.items():
        changed = [(i, e, g) for i, (e, g) in enumerate(zip(expected, now[name])) if e != g]
        assert len(now[name]) == len(expected) and not changed, f"{judge} on {name}: {changed[:10]}"
