#!/usr/bin/env bash
# Builds the abi3 wheel and the sdist, installs the wheel into a fresh virtual environment with no
# source tree at hand, and smoke-tests it: import, a native search checked against numpy, and a
# two-step training run of the tiny model through the `crl` command.
# The smoke venv sees the heavy dependencies (torch, transformers, ...) of the *active* interpreter
# (`python3` on PATH: a virtualenv's when one is active, else the system's), but crl itself comes
# only from the wheel.
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
# `python3 -m venv --system-site-packages` is not enough: inside a virtualenv it exposes the *base*
# interpreter's site-packages, which need not have numpy or torch (they live in the active venv).
# So the smoke venv is isolated, and a .pth file in its site-packages adds the active interpreter's
# site directories with site.addsitedir (their own .pth files apply, as for system site-packages).
# They come after the smoke venv's own site-packages, so `import crl` finds the wheel's copy (checked
# below), never an editable install or the source tree.
python3 -m venv "$work/venv"
venv_site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
python3 - "$venv_site/_crl_smoke_active_env.pth" <<'PY'
import os
import site
import sys

cands = list(site.getsitepackages())
if site.ENABLE_USER_SITE:
    cands.append(site.getusersitepackages())
dirs = [p for p in sys.path if p in cands]  # in the active interpreter's order
dirs += [p for p in cands if p not in dirs and os.path.isdir(p)]
dirs = list(dict.fromkeys(dirs))
with open(sys.argv[1], "w") as f:
    for d in dirs:
        f.write(f"import site; site.addsitedir({d!r})\n")
print("smoke venv sees the site-packages of", sys.executable + ":", ", ".join(dirs))
PY
"$work/venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
cd "$work"   # no source tree here
SMOKE_VENV="$work/venv" "$work/venv/bin/python" - <<'PY'
import os
import crl, crl._native as native, numpy as np
venv = os.path.realpath(os.environ["SMOKE_VENV"])
for f in (crl.__file__, native.__file__):  # the wheel's crl, not an editable install or the source tree
    assert os.path.realpath(f).startswith(venv + os.sep) and "site-packages" in f, f
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
