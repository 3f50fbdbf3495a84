"""Compile the fused triplet kernel ahead of time for an H100/H200 (sm_90), without a GPU.

For every shape crl launches (d from 64 to 8192; per-row positives and negatives, a shared positive
or centroid with its gradient, k mined negatives; fp32, bf16 and fp16), it compiles the default
launch configuration (crl.kernels.launch_config.default_config) with the triton that runs this
script and reads the cubin's resource use with triton's own cuobjdump: registers, stack (spills)
and the compile time. Needs only triton: run it under any triton version from a bare venv, e.g.

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    /tmp/t36/bin/python scripts/kernel_aot_check.py --output results/aot_triton36.json

Exit status 1 if any configuration has a non-zero stack frame or compiles slower than
--max-seconds; the JSON lists every case either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "python" / "crl" / "kernels"
ARCH = 90  # H100 / H200

DIMS = (64, 576, 2048, 4096, 8192)
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# The launches crl makes (crl.losses.objectives and the benchmarks), by what carries a gradient:
# (name, k, positive shared by index, per-sample negatives [S, k, d], need gp, need gn, distances).
MODES = (
    ("rows", 1, False, False, False, False, ("l2", "cosine")),                 # per-row p and n (bench)
    ("benign_centroid", 1, False, True, False, True, ("l2", "cosine")),        # n = centroid [L, 1, d] (grad)
    ("harmful_centroid", 1, True, False, True, False, ("cosine", "cosine")),   # p = centroid [L, d] (grad)
    ("benign_mined_k16", 16, False, True, False, False, ("l2", "cosine")),     # k mined negatives (no grad)
    ("harmful_mined_k4", 4, True, True, True, False, ("cosine", "cosine")),    # centroid + mined negatives
    ("all_grads_mix_k1", 1, True, True, True, True, ("mix", "mix")),           # every gradient, heaviest distances
    ("all_grads_mix_k4", 4, True, True, True, True, ("mix", "mix")),
    ("all_grads_mix_k8", 8, True, True, True, True, ("mix", "mix")),
    ("all_grads_mix_k32", 32, True, True, True, True, ("mix", "mix")),
    ("all_grads_mix_k128", 128, True, True, True, True, ("mix", "mix")),       # the kernel's largest k
)


# The benchmark's sweep (crl.kernels.launch_config.SWEEP_CONFIGS), at its width and in its mode.
SWEEP_MODES = {"rows": "rows", "centroid_k4": "harmful_mined_k4"}


def cases(quick: bool, dims: tuple[int, ...] = DIMS, sweeps: dict | None = None) -> list[dict]:
    out = []
    for sweep, configs in (sweeps or {}).items():
        mode = next(m for m in MODES if m[0] == SWEEP_MODES[sweep])
        name, k, shared_p, per_sample_n, gp, gn, (dist_p, dist_n) = mode
        for cfg in configs:
            out.append(dict(d=4096, mode=f"sweep_{sweep}", k=k, shared_p=shared_p, per_sample_n=per_sample_n,
                            need_gp=gp, need_gn=gn, dist_p=dist_p, dist_n=dist_n, dtype="bf16", config=cfg))
    for d in dims:
        for mode, k, shared_p, per_sample_n, gp, gn, (dist_p, dist_n) in MODES:
            for dtype in DTYPES:
                if quick and dtype != "bf16" and d not in (576, 4096):
                    continue
                out.append(dict(d=d, mode=mode, k=k, shared_p=shared_p, per_sample_n=per_sample_n, need_gp=gp,
                                need_gn=gn, dist_p=dist_p, dist_n=dist_n, dtype=dtype))
    return out


def _signature(case: dict) -> dict[str, str]:
    t = "*" + DTYPES[case["dtype"]]
    sig = dict(a_ptr=t, p_ptr=t, n_ptr=t, pidx_ptr="*i64", nidx_ptr="*i64", w_ptr="*fp32", scale_ptr="*fp32",
               ga_ptr=t, gp_ptr="*fp32" if case["shared_p"] else t, gn_ptr="*fp32" if case["per_sample_n"] else t,
               part_ptr="*fp32")
    sig.update({name: "i32" for name in ("R", "D", "K", "ITERS", "stride_a", "stride_p", "stride_ns", "stride_nk",
                                         "stride_ga", "stride_gp", "stride_gns", "stride_gnk")})
    sig.update(margin="fp32", mix_weight="fp32")
    return sig


def _resource_usage(cubin: bytes, cuobjdump: Path, workdir: Path) -> dict[str, int]:
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    usage = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if "reg" not in usage or "stack" not in usage:
        raise RuntimeError(f"cuobjdump -res-usage: unexpected output:\n{text}")
    return usage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, help="write the results as JSON here")
    ap.add_argument("--quick", action="store_true", help="bf16 only except at d = 576 and 4096")
    ap.add_argument("--dims", type=lambda s: tuple(int(x) for x in s.split(",")), default=DIMS,
                    help="comma-separated widths d (default: %(default)s)")
    ap.add_argument("--no-sweep", action="store_true", help="leave out the benchmark's sweep configurations")
    ap.add_argument("--max-seconds", type=float, default=5.0, help="slowest compile allowed per configuration")
    ap.add_argument("--max-stack", type=int, default=0, help="largest stack frame allowed (bytes per thread)")
    args = ap.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="crl-aot-"))
    os.environ["TRITON_CACHE_DIR"] = str(workdir / "cache")  # every compile is a real one
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = _load("crl_launch_config", KERNELS / "launch_config.py")
    jit = _load("crl_triplet_jit", KERNELS / "_triplet_jit.py")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.is_file():
        print(f"no cuobjdump in this triton install ({cuobjdump})", file=sys.stderr)
        return 2

    results, failures = [], []
    started = time.perf_counter()
    for case in cases(args.quick, args.dims, None if args.no_sweep else launch.SWEEP_CONFIGS):
        cfg = case.pop("config", None) or launch.default_config(
            case["d"], case["k"], case["shared_p"] and case["need_gp"], case["per_sample_n"] and case["need_gn"])
        const = launch.kernel_constexprs(
            d=case["d"], k=case["k"], distance_positive=case["dist_p"], distance_negative=case["dist_n"],
            has_positive_index=case["shared_p"], has_negative_index=case["per_sample_n"], has_weights=False,
            need_ga=True, need_gp=case["need_gp"], need_gn=case["need_gn"],
            per_sample_negatives=case["per_sample_n"], config=cfg,
        )
        sig = _signature(case)
        sig.update({name: "constexpr" for name in const})
        t0 = time.perf_counter()
        compiled = triton.compile(ASTSource(fn=jit.triplet_fwd_kernel, signature=sig, constexprs=const),
                                  target=GPUTarget("cuda", ARCH, 32), options=dict(num_warps=cfg.num_warps))
        seconds = time.perf_counter() - t0
        usage = _resource_usage(compiled.asm["cubin"], cuobjdump, workdir)
        row = dict(case, config=cfg.describe(), seconds=round(seconds, 3), **usage)
        results.append(row)
        bad = usage["stack"] > args.max_stack or seconds > args.max_seconds
        if bad:
            failures.append(row)
        print(f"{'FAIL' if bad else 'ok  '} d={case['d']:5d} {case['mode']:18s} {case['dtype']:4s} "
              f"{cfg.describe():48s} reg {usage['reg']:3d} stack {usage['stack']:6d} {seconds:6.2f} s", flush=True)
    summary = dict(triton=triton.__version__, arch=f"sm_{ARCH}", cases=len(results), failures=len(failures),
                   max_reg=max(r["reg"] for r in results), max_stack=max(r["stack"] for r in results),
                   max_seconds=max(r["seconds"] for r in results), total_seconds=round(time.perf_counter() - started, 1),
                   limits=dict(max_seconds=args.max_seconds, max_stack=args.max_stack), results=results)
    print(f"triton {triton.__version__} sm_{ARCH}: {len(results)} configurations, {len(failures)} over the limits; "
          f"max {summary['max_reg']} registers, max stack {summary['max_stack']} B, slowest compile "
          f"{summary['max_seconds']:.2f} s, {summary['total_seconds']:.0f} s in all")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
