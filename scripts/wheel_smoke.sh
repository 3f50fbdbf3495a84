#!/usr/bin/env bash
# Builds the abi3 wheel and the sdist, installs the wheel into a fresh virtual environment with no
# source tree at hand, and smoke-tests it: import, a native search checked against numpy, and a
# two-step training run of the tiny model through the `crl` command.
# The venv sees the system site-packages for the heavy dependencies (torch, transformers, ...), but
# crl itself comes only from the wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip install --quiet "maturin>=1.5,<2.0"
maturin build --release --out "$work/dist" --quiet 2>/dev/null || maturin build --release --out "$work/dist"
maturin sdist --out "$work/dist" >/dev/null
wheel=$(ls "$work"/dist/crl-*-abi3-*.whl)
ls "$work"/dist/crl-*.tar.gz >/dev/null
echo "built $(basename "$wheel") and $(basename "$(ls "$work"/dist/crl-*.tar.gz)")"
python3 -m venv --system-site-packages "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
cd "$work"   # no source tree here
"$work/venv/bin/python" - <<'PY'
import crl, crl._native as native, numpy as np
assert "site-packages" in crl.__file__, crl.__file__
rng = np.random.default_rng(0)
bank = rng.standard_normal((500, 67)).astype(np.float32)
queries = rng.standard_normal((3, 67)).astype(np.float32)
scores, ids = native.search(queries, bank, 5)
expected = np.argsort(-(queries @ bank.T), axis=1, kind="stable")[:, :5]
assert (ids == expected).all(), (ids, expected)
print("native search ok:", native.simd_path(), "from", crl.__file__)
from crl.demo import preset_path
from crl.data import load_demo
assert preset_path().is_file() and len(load_demo("harmful", "train")) > 50, "package data missing from the wheel"
PY
cat > "$work/smoke.toml" <<'TOML'
[model]
name = "tiny"
[lora]
r = 4
alpha = 8
dropout = 0.0
[data]
pools = "demo"
max_length = 192
batch_size = 2
generation_max_new_tokens = 4
[loss]
target_layers = [2, 3]
[optim]
lr = 1e-3
max_steps = 2
[run]
checkpoint_every = 1
progress = false
TOML
"$work/venv/bin/crl" train "$work/smoke.toml" --output-dir "$work/run"
test -f "$work/run/adapter/adapter_config.json"
test "$(wc -l < "$work/run/metrics.jsonl")" -eq 2
echo "wheel smoke test passed"
