#!/usr/bin/env bash
# Prepares what scripts/gpu_check.sh installs on a lent GPU machine, which has no network: the crl
# abi3 wheel and a wheelhouse of the pure-Python (or cp312 manylinux) packages it may lack there
# (peft, accelerate, pytest, ...; installed only where missing, never over the machine's torch,
# triton or transformers). Everything goes to dist/gpu/ (git-ignored): pass it to the device run
# with carry=["dist/gpu"]. Then, on the GPU: bash scripts/gpu_check.sh --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
out=dist/gpu
rm -rf "$out"
mkdir -p "$out/wheelhouse"
python3 -m pip install --quiet "maturin>=1.5,<2.0"
maturin build --release --out "$out" --quiet 2>/dev/null || maturin build --release --out "$out"
# The GPU machine runs CPython 3.12 on x86_64 Linux.
fetch() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --implementation cp --abi cp312 --abi abi3 --abi none -d "$out/wheelhouse" "$@"
}
fetch peft accelerate safetensors tqdm rich markdown-it-py mdurl pygments pyyaml \
  psutil packaging numpy "pytest>=7.4" pluggy iniconfig
ls "$out" "$out/wheelhouse"
du -sh "$out"
