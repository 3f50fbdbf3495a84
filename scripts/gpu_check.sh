#!/usr/bin/env bash
# The first-GPU-run check, in one prepared script (under 8 minutes on an H200, a timeout per stage).
#
# Prepare on a machine with network (builds the abi3 wheel, fetches the pure-Python wheels the GPU
# machine may lack):   bash scripts/gpu_prepare.sh        -> dist/gpu/ (carry it to the GPU machine)
# Then on the GPU:     bash scripts/gpu_check.sh --out "$OUT"
#
# Stages (each writes its log under OUT/logs and its results as JSON under OUT):
#   env           versions of python, torch, CUDA, triton, transformers, peft, accelerate; the GPU
#   install       the crl wheel with --no-deps, and from dist/gpu/wheelhouse only what is missing
#   kernel_tests  tests/test_triplet_kernel.py on CUDA tensors: the compiled kernel, no interpreter
#   kernel_bench  benches/triplet_kernel.py: the fused kernel against torch eager and torch.compile
#   step_bench    benches/gpu_step.py: a shrunk Llama-3-8B-shaped training step, kernel vs torch
#   tiny_train    the tiny model trained on CUDA with mining (native miner) and refinement, counting
#                 the host synchronisations inside the training step (torch.cuda sync debug mode)
# Options: --stages a,b,...  (default: all; a rerun can skip the stages that passed)
#          --full (gpu_step at the paper's size: may not fit; give it its own run)
#          --cpu-dry-run (the same stages on the CPU, in the interpreter: checks the script only)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results/gpu_check}"
stages="env,install,kernel_tests,kernel_bench,step_bench,tiny_train"
full=0
dry=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --stages) stages="$2"; shift 2 ;;
    --full) full=1; shift ;;
    --cpu-dry-run) dry=1; shift ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1
if [ "$dry" = 1 ]; then export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""; else unset TRITON_INTERPRET; fi
: > "$out/stages.jsonl"
started_all=$(date +%s)

# run_stage NAME TIMEOUT_SECONDS COMMAND...: runs it with a timeout, logs it, records its status.
run_stage() {
  local name="$1" limit="$2"; shift 2
  case ",$stages," in *",$name,"*) ;; *) return 0 ;; esac
  echo "=== $name (timeout ${limit}s)"
  local t0 t1 rc
  t0=$(date +%s.%N)
  # A shell function cannot be exec'd by timeout: run it in a child bash (the functions are exported).
  timeout --kill-after=10 "$limit" bash -c "$1" > "$out/logs/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  tail -n 25 "$out/logs/$name.log"
  "$py" - "$name" "$rc" "$t0" "$t1" "$limit" >> "$out/stages.jsonl" <<'PY'
import json, sys
name, rc, t0, t1, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
status = "ok" if rc == 0 else ("timed out" if rc in (124, 137) else "failed")
print(json.dumps({"stage": name, "status": status, "exit_code": rc, "seconds": round(t1 - t0, 1), "timeout_s": limit}))
PY
  echo "=== $name: exit $rc"
}

stage_env() {
  "$py" - "$out/env.json" <<'PY'
import importlib, json, platform, subprocess, sys
info = {"python": platform.python_version(), "platform": platform.platform()}
for name in ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "numpy", "pytest", "faiss"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as exc:
        info[name] = f"missing ({type(exc).__name__})"
import torch
info["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                sms=p.multi_processor_count, cuda=torch.version.cuda)
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.used,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception as exc:
    info["nvidia_smi"] = repr(exc)
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
print(json.dumps(info, indent=2))
PY
}

stage_install() {
  if [ "$dry" = 1 ]; then echo "dry run: the current environment's crl is used"; "$py" -c "import crl, crl._native as n; print(crl.__file__, n.simd_path())"; return; fi
  local wheel
  wheel=$(ls dist/gpu/crl-*-abi3-*.whl 2>/dev/null | head -n 1)
  if [ -z "$wheel" ]; then echo "no wheel under dist/gpu: run scripts/gpu_prepare.sh first and carry dist/gpu" >&2; return 1; fi
  local pipi=("$py" -m pip install --no-deps --no-index --quiet)
  "${pipi[@]}" --force-reinstall "$wheel" || "${pipi[@]}" --force-reinstall --break-system-packages "$wheel" || return 1
  # Only what is missing: never replace the machine's own torch, triton or transformers.
  for pair in peft:peft accelerate:accelerate safetensors:safetensors tqdm:tqdm rich:rich markdown_it:markdown_it_py \
              mdurl:mdurl pygments:pygments yaml:pyyaml psutil:psutil packaging:packaging numpy:numpy \
              pytest:pytest pluggy:pluggy iniconfig:iniconfig; do
    module=${pair%%:*}; dist=${pair##*:}
    if ! "$py" -c "import $module" 2>/dev/null; then
      file=$(ls dist/gpu/wheelhouse/${dist}-*.whl 2>/dev/null | head -n 1)
      echo "installing $dist (missing) from ${file:-nowhere}"
      [ -n "$file" ] && { "${pipi[@]}" "$file" || "${pipi[@]}" --break-system-packages "$file"; }
    fi
  done
  cd /tmp && "$py" -c "import crl, crl._native as n; print('crl from', crl.__file__, '| native SIMD path', n.simd_path())"
}

stage_kernel_tests() {
  "$py" -m pytest tests/test_triplet_kernel.py -q -p no:cacheprovider --junitxml="$out/kernel_tests.xml"
}

stage_kernel_bench() {
  if [ "$dry" = 1 ]; then "$py" benches/triplet_kernel.py --dry-run-cpu --output "$out/triplet_kernel.json"; return; fi
  "$py" benches/triplet_kernel.py --budget 85 --output "$out/triplet_kernel.json"
}

stage_step_bench() {
  local extra=()
  [ "$full" = 1 ] && extra+=(--full)
  [ "$dry" = 1 ] && extra+=(--dry-run-cpu)
  "$py" benches/gpu_step.py --output "$out/gpu_step.json" "${extra[@]}"
}

stage_tiny_train() {
  rm -rf "$out/tiny_run"
  "$py" - "$out" <<'PY'
"""crl train on the tiny model, with the native miner and refinement, counting host syncs per step."""
import collections, json, sys, warnings
from pathlib import Path

import torch

out = Path(sys.argv[1])
from crl.training import step as step_module

cuda = torch.cuda.is_available()
syncs = collections.Counter()
original = step_module.LossComputer.__call__


def counted(self, *args, **kwargs):
    # torch warns on every synchronising CUDA call while the mode is "warn"; only the step is counted.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            return original(self, *args, **kwargs)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
            for w in caught:
                if "synchroniz" in str(w.message):
                    syncs[f"{Path(w.filename).name}:{w.lineno}"] += 1


step_module.LossComputer.__call__ = counted
from crl.cli import main

steps = 6
rc = main(["train", "configs/tiny.toml", "--output-dir", str(out / "tiny_run"),
           "--set", "mining.enabled=true", "--set", 'mining.backend="native"', "--set", "mining.k=2",
           "--set", f'mining.cache_dir="{out / "tiny_banks"}"',
           "--set", "refinement.enabled=true", "--set", "refinement.layers=[1, 2]", "--set", "refinement.steps=1",
           "--set", f"optim.max_steps={steps}", "--set", "run.checkpoint_every=3"])
metrics = [json.loads(l) for l in (out / "tiny_run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
report = {"exit_code": rc, "device": "cuda" if cuda else "cpu", "steps": len(metrics),
          "sync_warnings_in_step_total": sum(syncs.values()), "sync_warnings_per_step": sum(syncs.values()) / max(1, len(metrics)),
          "sync_warnings_by_location": dict(syncs.most_common()),
          "final_metrics": metrics[-1] if metrics else None,
          "adapter_written": (out / "tiny_run" / "adapter" / "adapter_config.json").is_file()}
(out / "tiny_train.json").write_text(json.dumps(report, indent=2))
print(json.dumps({k: v for k, v in report.items() if k != "final_metrics"}, indent=2))
sys.exit(0 if rc == 0 and len(metrics) == steps and report["adapter_written"] else 1)
PY
}

export out py dry full
export -f stage_env stage_install stage_kernel_tests stage_kernel_bench stage_step_bench stage_tiny_train

# Timeouts (seconds): 15 + 45 + 110 + 115 + 110 + 80 = 475, under 8 minutes even if every stage hangs
# (the kernel bench stops itself at 85 s).
run_stage env 15 stage_env
run_stage install 45 stage_install
run_stage kernel_tests 110 stage_kernel_tests
run_stage kernel_bench 115 stage_kernel_bench
run_stage step_bench 110 stage_step_bench
run_stage tiny_train 80 stage_tiny_train

"$py" - "$out" "$started_all" <<'PY'
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "stages.jsonl").read_text().splitlines() if l.strip()]
summary = {"seconds": round(time.time() - int(sys.argv[2]), 1), "stages": rows,
           "ok": all(r["status"] == "ok" for r in rows)}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(f"{'stage':14s} {'status':10s} {'seconds':>8s}")
for r in rows:
    print(f"{r['stage']:14s} {r['status']:10s} {r['seconds']:8.1f}")
print(f"gpu_check: {'all stages ok' if summary['ok'] else 'SOME STAGES FAILED'} in {summary['seconds']:.0f} s; results in {out}")
sys.exit(0 if summary["ok"] else 1)
PY
