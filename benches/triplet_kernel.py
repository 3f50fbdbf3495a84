"""Benchmark: the fused Triton triplet loss against torch eager and torch.compile of the reference.

Forward plus backward (the kernel computes the gradients in forward; backward only scales them), on
bf16 hidden states:

- rows (R, d) = (45056, 4096): 8 sequences x 512 tokens x 11 layers, per-row positives and negatives;
- (8192, 4096), per-row;
- realistic: (45056, 4096) with one centroid per layer as the shared positive (positive_index, the
  centroid requires grad) and k=4 mined negatives per sample and layer (negative_index).

Reported per case and method: median milliseconds (CUDA events, after warmup), achieved GB/s over
the bytes that must move (read anchors + positives + negatives once, write the gradients) against
the measured device copy bandwidth, peak extra memory (max_memory_allocated minus the baseline with
the inputs allocated) against the size of the gradients, and the maximum error of the fused loss
and gradients against eager. Then, in the time left, a sweep of kernel launch configurations.

    python benches/triplet_kernel.py [--output results/triplet_kernel.json] [--quick] [--no-compile]
    python benches/triplet_kernel.py --smoke    # tiny correctness run; CPU interpreter without a GPU

Without CUDA (and without --smoke) it says so and exits 0. One python invocation, no network; the
whole run is bounded by --budget seconds (default 150): whatever does not fit is marked skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TARGETS = {"copy_bandwidth_fraction": 0.80, "speedup_vs_eager": 5.0, "speedup_vs_compile": 1.5,
           "extra_memory_over_gradient": 1.0}


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=str(REPO / "results" / "triplet_kernel.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny correctness run (CPU interpreter without CUDA)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations, no configuration sweep")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compilation takes a while)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the whole run (soft)")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="run the GPU benchmark's code path on tiny CPU inputs in the interpreter (measures nothing)")
    return ap.parse_args(argv)


def _import_crl():
    try:
        import crl  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "python"))


# ----------------------------------------------------------------------------------------------
# cases


FULL_SHAPE = dict(layers=11, seqs=8, tokens=512, d=4096, small_rows=8192)
# --dry-run-cpu: the same cases, scaled down, through the same code on the CPU interpreter
DRY_SHAPE = dict(layers=3, seqs=2, tokens=8, d=40, small_rows=20)


def _make_case(torch, name, device, dtype, gen_seed=0, shape=FULL_SHAPE):
    """Inputs of one case: dict with tensors, kwargs, which inputs need grad, and the bytes to move."""
    g = torch.Generator(device=device).manual_seed(gen_seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    layers, seqs, tokens, d = shape["layers"], shape["seqs"], shape["tokens"], shape["d"]
    if name == "rows45056_d4096":
        R = layers * seqs * tokens
        a, p, n = randn(R, d), randn(R, d), randn(R, d)
        kwargs = dict(distance_positive="l2", distance_negative="cosine", margin=2.0)
        grads = (True, False, False)
    elif name == "rows8192_d4096":
        R = shape["small_rows"]
        a, p, n = randn(R, d), randn(R, d), randn(R, d)
        kwargs = dict(distance_positive="l2", distance_negative="cosine", margin=2.0)
        grads = (True, False, False)
    elif name == "realistic_centroid_k4":
        # rows laid out [layer, sequence, token]; centroid per layer; k=4 mined negatives per (layer, sequence)
        R, k = layers * seqs * tokens, 4
        a = randn(R, d)
        p = randn(layers, d)
        n = randn(layers * seqs, k, d)
        row = torch.arange(R, device=device)
        kwargs = dict(positive_index=row // (seqs * tokens), negative_index=row // tokens,
                      distance_positive="cosine", distance_negative="cosine", margin=0.5)
        grads = (True, True, False)
    elif name.startswith("smoke"):
        R, d, k = 37, 48, 3
        a, p, n = randn(R, d), randn(5, d), randn(6, k, d)
        kwargs = dict(positive_index=torch.randint(0, 5, (R,), generator=g, device=device).sort().values,
                      negative_index=torch.randint(0, 6, (R,), generator=g, device=device),
                      distance_positive="mix", distance_negative="cosine", margin=1.0)
        grads = (True, True, True)
        if name == "smoke_rows":
            p, n = randn(R, d), randn(R, d)
            kwargs = dict(distance_positive="l2", distance_negative="l2_normalized", margin=0.5, reduction="sum")
    else:
        raise ValueError(name)
    el = a.element_size()
    moved = (a.numel() + p.numel() + n.numel()) * el + a.numel() * el  # read a, p, n; write grad a
    if grads[1]:
        moved += p.numel() * p.element_size()
    if grads[2]:
        moved += n.numel() * n.element_size()
    grad_bytes = sum(t.numel() * t.element_size() for t, need in zip((a, p, n), grads) if need)
    return dict(name=name, tensors=(a, p, n), kwargs=kwargs, grads=grads, bytes=moved, grad_bytes=grad_bytes,
                rows=a.shape[0], d=a.shape[1], dtype=str(dtype).replace("torch.", ""))


def _leaves(case):
    return [t.detach().requires_grad_(need) for t, need in zip(case["tensors"], case["grads"])]


def _step(fn, leaves, kwargs):
    for t in leaves:
        t.grad = None
    out = fn(*leaves, **kwargs)
    out.loss.backward()
    return out


# ----------------------------------------------------------------------------------------------
# measurement


class _Cuda:
    """Timing and memory on the GPU (CUDA events, the caching allocator's statistics)."""

    def __init__(self, torch):
        self.torch = torch

    def sync(self):
        self.torch.cuda.synchronize()

    def empty_cache(self):
        self.torch.cuda.empty_cache()

    def time_ms(self, fn, iters, warmup):
        torch = self.torch
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), min(times)

    def peak_extra_bytes(self, fn, leaves, kwargs):
        torch = self.torch
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = _step(fn, leaves, kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)

    def copy_tensor_elements(self):
        return 1 << 30  # a 2 GiB bf16 tensor


class _CpuDry(_Cuda):
    """--dry-run-cpu: wall-clock timing, no memory statistics (exercises the script, measures nothing)."""

    def sync(self):
        pass

    def empty_cache(self):
        pass

    def time_ms(self, fn, iters, warmup):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), min(times)

    def peak_extra_bytes(self, fn, leaves, kwargs):
        _step(fn, leaves, kwargs)
        return 0

    def copy_tensor_elements(self):
        return 1 << 20


def _copy_bandwidth(torch, dev, device):
    """Device copy bandwidth in GB/s: copying a large bf16 tensor (bytes read + bytes written)."""
    src = torch.empty(dev.copy_tensor_elements(), device=device, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms, _ = dev.time_ms(lambda: dst.copy_(src), iters=20, warmup=3)
    gbs = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    dev.empty_cache()
    return gbs


def _errors(torch, case, fn_a, fn_b):
    """Max relative error of loss and every gradient of fn_a against fn_b (one run each)."""
    la, lb = _leaves(case), _leaves(case)
    oa, ob = _step(fn_a, la, case["kwargs"]), _step(fn_b, lb, case["kwargs"])
    res = {"loss_rel_error": abs(oa.loss.item() - ob.loss.item()) / max(abs(ob.loss.item()), 1e-30),
           "active_fraction": oa.active_fraction.item(), "reference_active_fraction": ob.active_fraction.item()}
    worst_abs = 0.0
    for name, ta, tb in zip(("anchors", "positives", "negatives"), la, lb):
        if tb.grad is None:
            continue
        diff = (ta.grad.float() - tb.grad.float()).abs().max().item()
        scale = tb.grad.float().abs().max().item()
        res[f"{name}_grad_rel_error"] = diff / max(scale, 1e-30)
        worst_abs = max(worst_abs, diff)
    res["max_abs_grad_error"] = worst_abs
    return res


# ----------------------------------------------------------------------------------------------
# runs


def run_smoke(args):
    import torch

    _import_crl()
    from crl.kernels.triplet import triplet_loss_triton, triton_interpreted
    from crl.losses.triplet import triplet_loss_reference

    device = "cuda" if torch.cuda.is_available() and not triton_interpreted() else "cpu"
    if device == "cpu" and not triton_interpreted():
        print("smoke: triton was imported without TRITON_INTERPRET=1 and there is no GPU; nothing to run")
        return 0
    cases = []
    for name in ("smoke_shared", "smoke_rows"):
        case = _make_case(torch, name, device, torch.float32)
        t0 = time.perf_counter()
        err = _errors(torch, case, triplet_loss_triton, triplet_loss_reference)
        err.update(name=name, device=device, seconds=time.perf_counter() - t0, rows=case["rows"], d=case["d"])
        cases.append(err)
    ok = all(c["max_abs_grad_error"] < 1e-4 and c["loss_rel_error"] < 1e-5 for c in cases)
    result = {"mode": "smoke", "device": device, "interpreted": device == "cpu", "ok": ok, "cases": cases}
    _write(args.output, result)
    for c in cases:
        print(f"smoke {c['name']}: loss rel err {c['loss_rel_error']:.2e}, max abs grad err "
              f"{c['max_abs_grad_error']:.2e} ({c['device']}, {c['seconds']:.1f} s)")
    print("smoke:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


def _sweep_configs(case, dry=False):
    """Configurations timed against the default: crl.kernels.launch_config.SWEEP_CONFIGS, each of
    which scripts/kernel_aot_check.py compiles for sm_90 without spills (none takes minutes)."""
    from crl.kernels.launch_config import SWEEP_CONFIGS, KernelConfig

    if dry:
        return [KernelConfig(4, 64, True, 4), KernelConfig(4, 16, False, 4)]
    return list(SWEEP_CONFIGS["centroid_k4" if case["name"] == "realistic_centroid_k4" else "rows"])


def run_gpu(args):
    import torch

    _import_crl()
    import triton

    from crl.kernels.triplet import default_config, triplet_loss_triton
    from crl.losses.triplet import triplet_loss_reference

    t_start = time.perf_counter()

    def left():
        return args.budget - (time.perf_counter() - t_start)

    dry = args.dry_run_cpu
    if dry:
        device, dev, shape, dev_name, sms = torch.device("cpu"), _CpuDry(torch), DRY_SHAPE, "cpu (dry run)", 0
    else:
        device, dev, shape = torch.device("cuda"), _Cuda(torch), FULL_SHAPE
        props = torch.cuda.get_device_properties(device)
        dev_name, sms = props.name, props.multi_processor_count
    iters, warmup = (5, 2) if args.quick else (args.iters, args.warmup)
    result = {
        "mode": "dry-run-cpu (nothing measured)" if dry else "gpu", "device": dev_name, "sms": sms,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "targets": TARGETS, "iters": iters, "warmup": warmup, "cases": [], "sweep": [], "notes": [],
    }
    copy_gbs = _copy_bandwidth(torch, dev, device)
    result["copy_bandwidth_gbs"] = copy_gbs
    print(f"{dev_name}: copy bandwidth {copy_gbs:.0f} GB/s")

    compiled = None
    if not args.no_compile and not dry:
        compiled = torch.compile(triplet_loss_reference)

    methods = [("fused", triplet_loss_triton), ("eager", triplet_loss_reference)]
    if compiled is not None:
        methods.append(("compile", compiled))

    case_names = ["rows45056_d4096", "rows8192_d4096", "realistic_centroid_k4"]
    cases = {}
    for name in case_names:
        if left() < 20:
            result["notes"].append(f"case {name} skipped (time budget)")
            continue
        case = _make_case(torch, name, device, torch.bfloat16, shape=shape)
        cases[name] = case
        entry = {k: case[k] for k in ("name", "rows", "d", "dtype", "bytes", "grad_bytes")}
        entry["kwargs"] = {k: v for k, v in case["kwargs"].items() if not torch.is_tensor(v)}
        entry["grads"] = dict(zip(("anchors", "positives", "negatives"), case["grads"]))
        k = case["tensors"][2].shape[1] if case["tensors"][2].dim() == 3 else 1
        entry["default_config"] = default_config(
            case["d"], k, "positive_index" in case["kwargs"] and case["grads"][1],
            "negative_index" in case["kwargs"] and case["grads"][2]).describe()
        try:
            entry["accuracy_vs_eager"] = _errors(torch, case, triplet_loss_triton, triplet_loss_reference)
        except Exception as exc:  # keep going: record the failure
            entry["accuracy_vs_eager"] = {"error": repr(exc), "traceback": traceback.format_exc()}
        entry["methods"] = {}
        for mname, fn in methods:
            if mname == "compile" and left() < 45:
                entry["methods"][mname] = {"skipped": "time budget"}
                continue
            leaves = _leaves(case)
            try:
                t0 = time.perf_counter()
                _step(fn, leaves, case["kwargs"])  # first call: compilation / autotuning
                dev.sync()
                first_s = time.perf_counter() - t0
                extra = dev.peak_extra_bytes(fn, leaves, case["kwargs"])
                ms, best = dev.time_ms(lambda: _step(fn, leaves, case["kwargs"]), iters, warmup)
                entry["methods"][mname] = {
                    "ms": ms, "min_ms": best, "gbs": case["bytes"] / (ms * 1e-3) / 1e9,
                    "copy_fraction": case["bytes"] / (ms * 1e-3) / 1e9 / copy_gbs,
                    "peak_extra_bytes": extra, "extra_over_gradient": extra / case["grad_bytes"],
                    "first_call_s": first_s,
                }
            except Exception as exc:
                entry["methods"][mname] = {"error": repr(exc), "traceback": traceback.format_exc()}
            del leaves
            dev.empty_cache()
        fused = entry["methods"].get("fused", {})
        checks = {}
        if "ms" in fused:
            checks["copy_bandwidth_fraction"] = fused["copy_fraction"]
            checks["extra_memory_over_gradient"] = fused["extra_over_gradient"]
            for other, key in (("eager", "speedup_vs_eager"), ("compile", "speedup_vs_compile")):
                if "ms" in entry["methods"].get(other, {}):
                    checks[key] = entry["methods"][other]["ms"] / fused["ms"]
        entry["targets_met"] = {
            key: (value >= TARGETS[key] if key != "extra_memory_over_gradient" else value <= TARGETS[key])
            for key, value in checks.items()
        }
        entry["measured"] = checks
        result["cases"].append(entry)
        _print_case(entry)
        _write(args.output, result)  # partial results survive a crash or a kill

    if not (args.quick or args.no_sweep):
        for name in ("rows45056_d4096", "realistic_centroid_k4"):
            if name not in cases:
                continue
            case = cases[name]
            for cfg in _sweep_configs(case, dry):
                if left() < 8:
                    result["notes"].append(f"sweep stopped early (time budget) before {name} {cfg.describe()}")
                    break
                leaves = _leaves(case)
                row = {"case": name, "config": cfg.describe()}
                try:
                    def fn(*ts, cfg=cfg, **kw):
                        return triplet_loss_triton(*ts, config=cfg, **kw)
                    _step(fn, leaves, case["kwargs"])
                    ms, best = dev.time_ms(lambda: _step(fn, leaves, case["kwargs"]), max(5, iters // 2), 2)
                    row.update(ms=ms, gbs=case["bytes"] / (ms * 1e-3) / 1e9,
                               copy_fraction=case["bytes"] / (ms * 1e-3) / 1e9 / copy_gbs)
                    print(f"  sweep {name:24s} {cfg.describe():60s} {ms:8.3f} ms "
                          f"{row['copy_fraction'] * 100:5.1f}% of copy")
                except Exception as exc:
                    row["error"] = repr(exc)
                    print(f"  sweep {name} {cfg.describe()}: {exc!r}")
                result["sweep"].append(row)
                del leaves
            _write(args.output, result)
    result["seconds"] = time.perf_counter() - t_start
    _write(args.output, result)
    print(f"wrote {args.output} ({result['seconds']:.0f} s)")
    return 0


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _print_case(entry):
    print(f"\n{entry['name']}  R={entry['rows']} d={entry['d']} {entry['dtype']}  "
          f"moved {entry['bytes'] / 1e9:.2f} GB  gradient {entry['grad_bytes'] / 1e9:.2f} GB  "
          f"[{entry['default_config']}]")
    acc = entry.get("accuracy_vs_eager", {})
    if "error" in acc:
        print(f"  accuracy check FAILED to run: {acc['error']}")
    else:
        grads = ", ".join(f"{k.split('_')[0]} {v:.1e}" for k, v in acc.items() if k.endswith("grad_rel_error"))
        print(f"  fused vs eager: loss rel {acc.get('loss_rel_error', float('nan')):.1e}; grads rel {grads}")
    print(f"  {'method':8s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} {'extra mem GB':>13s} {'x grad':>7s}")
    for mname, m in entry["methods"].items():
        if "ms" not in m:
            print(f"  {mname:8s} {m.get('skipped') or m.get('error')}")
            continue
        print(f"  {mname:8s} {m['ms']:9.3f} {m['gbs']:8.0f} {m['copy_fraction'] * 100:6.1f} "
              f"{m['peak_extra_bytes'] / 1e9:13.3f} {m['extra_over_gradient']:7.2f}")
    meas = entry.get("measured", {})
    met = entry.get("targets_met", {})
    parts = [f"{k}={_fmt(v, '.2f')} ({'ok' if met.get(k) else 'MISSED'})" for k, v in meas.items()]
    print("  targets: " + ("; ".join(parts) if parts else "n/a"))


def _write(path, result):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))


def main(argv=None):
    args = _parse(argv)
    import torch

    if args.smoke or args.dry_run_cpu:
        if not torch.cuda.is_available() or args.dry_run_cpu:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
        return run_smoke(args) if args.smoke else run_gpu(args)
    if not torch.cuda.is_available():
        print("triplet_kernel bench: no CUDA device on this machine, nothing was timed. "
              "Run it on a GPU (or use --smoke for a tiny CPU-interpreter correctness check).")
        return 0
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
