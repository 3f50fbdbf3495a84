"""The fused triplet kernel compiles for an H100/H200 (sm_90) without spills, ahead of time.

The Triton interpreter accepts code the compiler spills or rejects, and a lent GPU's time is short,
so every launch configuration crl uses is compiled here, without a GPU, by scripts/kernel_aot_check.py:
under the installed triton and under Triton 3.6 (the lent H200's version, in a venv of its own that
holds only triton; built once and cached). Each must have a zero stack frame and compile in a few
seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "kernel_aot_check.py"
GPU_TRITON = "3.6.0"
MAX_SECONDS = 5.0
# widths x launch kinds x dtypes, and the benchmark's sweep (scripts/kernel_aot_check.py)
EXPECTED_CASES = 5 * 10 * 3 + 13


def _triton_venv(version: str) -> Path:
    """A venv with only triton==version, cached under ~/.cache/crl (or CRL_AOT_VENV_ROOT)."""
    root = Path(os.environ.get("CRL_AOT_VENV_ROOT", Path.home() / ".cache" / "crl"))
    env_dir = root / f"venv-triton-{version}"
    python = env_dir / "bin" / "python"
    marker = env_dir / ".crl-complete"
    if marker.is_file() and python.is_file():
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"triton=={version}"],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        message = f"could not install triton=={version} into {env_dir}: {proc.stderr[-1500:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    marker.write_text(version)
    return python


def _check(python: str | Path, tmp_path: Path) -> dict:
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([str(python), str(SCRIPT), "--output", str(out), "--max-seconds", str(MAX_SECONDS)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode == 2 and "no cuobjdump" in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    spilled = [r for r in summary["results"] if r["stack"] > 0]
    slow = [r for r in summary["results"] if r["seconds"] > MAX_SECONDS]
    assert not spilled, f"triton {summary['triton']}: stack frames (spills): " + json.dumps(spilled[:5])
    assert not slow, f"triton {summary['triton']}: compiles over {MAX_SECONDS} s: " + json.dumps(slow[:5])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["cases"] == EXPECTED_CASES
    assert {r["d"] for r in summary["results"]} == {64, 576, 2048, 4096, 8192}
    assert {r["dtype"] for r in summary["results"]} == {"fp32", "bf16", "fp16"}
    assert all(not r["config"].startswith("single-pass") for r in summary["results"])
    assert sum(r["mode"].startswith("sweep_") for r in summary["results"]) == 13
    return summary


@pytest.mark.slow
def test_compiles_for_sm90_under_the_installed_triton(tmp_path):
    pytest.importorskip("triton")
    summary = _check(sys.executable, tmp_path)
    print(f"triton {summary['triton']}: max {summary['max_reg']} registers, slowest {summary['max_seconds']} s")


@pytest.mark.slow
def test_compiles_for_sm90_under_the_gpus_triton(tmp_path):
    summary = _check(_triton_venv(GPU_TRITON), tmp_path)
    assert summary["triton"] == GPU_TRITON
    print(f"triton {summary['triton']}: max {summary['max_reg']} registers, slowest {summary['max_seconds']} s")
