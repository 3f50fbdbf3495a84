"""Benchmark of exact top-k mining: crl's native search against FAISS, numpy and torch.

Everything runs in one process with the same thread count; repetitions are interleaved across
backends (one call of each backend per round) and the median is reported. Results go to a JSON file
(``--output``, default ``results/mining.json``) and a table on stdout.

Backends (skipped when the library is missing):

* ``crl-fp32``, ``crl-bf16``: ``crl._native.search`` / ``search_many`` (bf16 as int16 bits);
* ``faiss``: ``IndexFlatIP`` with default settings; ``faiss-blas``: the same with
  ``faiss.cvar.distance_compute_blas_threshold`` lowered to 1 (so small query batches use BLAS);
* ``numpy``: ``q @ b.T`` + ``argpartition`` + sort of the k;
* ``torch-fp32``, ``torch-bf16``: ``torch.mm`` + ``topk``.

The per-layer mining shape searches 11 banks (16 queries each) in one ``search_many`` call, against
a Python loop over 11 FAISS indexes (and over numpy/torch).

Beside each time, ``recall_at_k``: the share of the returned ids whose exact score (float64, on the
inputs the backend was given: the bf16-rounded values for the bf16 backends) is at least the query's
exact k-th best score. An exact top-k has 1.0; torch's bf16 matmul rounds the scores to bf16 before
its top-k, and misses some.

The memory read bandwidth is measured with the benchmark's thread count: numpy reductions over one
part of a 1 GiB array per thread, the best of several (a single-threaded sum under-reads a
multi-core machine); for each result the roofline fraction is (bank bytes / bandwidth) / time, which
is meaningful where the search is memory-bound (few queries).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_SHAPES: list[tuple[int, int, int, int]] = [
    # (banks, Q, N, d)
    (1, 1, 100_000, 4096),
    (1, 16, 65_536, 4096),
    (1, 256, 65_536, 4096),
    (1, 1024, 16_384, 2048),
    (11, 16, 20_000, 4096),
]
QUICK_SHAPES: list[tuple[int, int, int, int]] = [
    (1, 1, 20_000, 256),
    (1, 16, 8_192, 256),
    (1, 128, 8_192, 256),
    (3, 8, 4_000, 256),
]


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as int16."""
    u = x.view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return r.view(np.int16)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5, threads: int = 1) -> float:
    """Memory read bandwidth in GB/s with `threads` threads: the best over a few numpy reductions
    (max, sum, bitwise or; numpy releases the GIL in them) of one contiguous part of a large array per
    thread, best of `repeats`. The best, not the median: it is the ceiling a streaming kernel is held to."""
    from concurrent.futures import ThreadPoolExecutor

    x = np.ones(nbytes // 4, dtype=np.float32)
    parts = np.array_split(x, max(1, threads))
    ops = (lambda a: a.max(), lambda a: a.sum(), lambda a: np.bitwise_or.reduce(a.view(np.uint32)))
    best = float("inf")
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for op in ops:
            list(pool.map(op, parts))  # warm-up: page faults, thread start
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(op, parts))
                best = min(best, time.perf_counter() - t0)
    del x, parts
    return nbytes / best / 1e9


@dataclass
class Case:
    banks: int
    q: int
    n: int
    d: int

    @property
    def label(self) -> str:
        s = f"Q={self.q} N={self.n} d={self.d}"
        return f"{self.banks}x[{s}]" if self.banks > 1 else s

    @property
    def flops(self) -> float:
        return 2.0 * self.banks * self.q * self.n * self.d


def _versions() -> dict:
    v = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import crl

        v["crl"] = crl.__version__
    except Exception:  # pragma: no cover
        pass
    for mod in ["faiss", "torch"]:
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "?")
        except Exception:
            v[mod] = None
    return v


def _set_numpy_threads(threads: int):
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(threads)
    except Exception:
        return None


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (int16) -> the float32 values they stand for."""
    return (bits.astype(np.int32) << 16).view(np.float32)


def exact_kth_scores(qs: list[np.ndarray], bs: list[np.ndarray], k: int, chunk: int = 8192) -> list[np.ndarray]:
    """Per bank, [Q, N] reference scores in float64 and each query's k-th best score: the reference a
    backend's answer is checked against (bf16 backends against the bf16-rounded inputs, whose exact
    products they are asked for)."""
    out = []
    for q, b in zip(qs, bs):
        q64 = q.astype(np.float64)
        scores = np.concatenate([q64 @ b[i:i + chunk].astype(np.float64).T for i in range(0, b.shape[0], chunk)], axis=1)
        kk = min(k, b.shape[0])
        kth = -np.partition(-scores, kk - 1, axis=1)[:, kk - 1]
        out.append((scores, kth))
    return out


def recall_at_k(ids: list[np.ndarray], reference: list[tuple[np.ndarray, np.ndarray]], k: int) -> float:
    """Share of returned ids (k per query, distinct) whose exact score is at least the query's exact
    k-th best: 1.0 for an exact top-k (ties at the k-th score count as right)."""
    hits = total = 0
    for got, (scores, kth) in zip(ids, reference):
        got = np.asarray(got, dtype=np.int64).reshape(scores.shape[0], -1)[:, :k]
        for row, s, t in zip(got, scores, kth):
            valid = np.unique(row[row >= 0])
            hits += int((s[valid] >= t).sum())
            total += min(k, s.shape[0])
    return hits / total if total else 1.0


def result_ids(out) -> list[np.ndarray]:
    """The ids of any backend's output, one [Q, k] array per bank (native: (scores, ids) of 2 or 3
    dims; FAISS / numpy: a list of (scores, ids); torch: a list of topk results)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], np.ndarray):
        ids = out[1]
        return [ids] if ids.ndim == 2 else list(ids)
    return [np.asarray(x[1] if isinstance(x, tuple) else x.indices) for x in out]


def build_backends(case: Case, k: int, threads: int, want: set[str] | None, rng: np.random.Generator):
    """Data and one callable per backend (each returns (scores, ids)), the bytes per bank element
    each one reads, and the function that gives each backend's recall@k against the exact top-k of
    the inputs it was given."""
    from crl import _native

    L, Q, N, d = case.banks, case.q, case.n, case.d
    qs = [rng.standard_normal((Q, d), dtype=np.float32) for _ in range(L)]
    bs = [rng.standard_normal((N, d), dtype=np.float32) for _ in range(L)]
    qb = [_bf16_bits(x) for x in qs]
    bb = [_bf16_bits(x) for x in bs]
    candidates: list[tuple[str, Callable, int]] = []
    if L == 1:
        candidates += [("crl-fp32", lambda: _native.search(qs[0], bs[0], k, threads=threads), 4),
                       ("crl-bf16", lambda: _native.search(qb[0], bb[0], k, threads=threads), 2)]
    else:
        candidates += [("crl-fp32", lambda: _native.search_many(qs, bs, k, threads=threads), 4),
                       ("crl-bf16", lambda: _native.search_many(qb, bb, k, threads=threads), 2)]
    candidates += _faiss_backends(qs, bs, k, threads)
    candidates.append(("numpy", _numpy_backend(qs, bs, k), 4))
    candidates += _torch_backends(qs, bs, k, threads, bf16=want is None or "torch-bf16" in want)
    chosen = [(name, fn, size) for name, fn, size in candidates if want is None or name in want]
    references: dict[int, list] = {}

    def recall(name: str, out) -> float:
        size = dict((n, sz) for n, _, sz in chosen)[name]
        if size not in references:  # bf16 backends are checked against the bf16-rounded inputs
            inputs = (qs, bs) if size == 4 else ([_bf16_values(x) for x in qb], [_bf16_values(x) for x in bb])
            references[size] = exact_kth_scores(*inputs, k)
        return recall_at_k(result_ids(out), references[size], k)

    return {name: fn for name, fn, _ in chosen}, {name: size for name, _, size in chosen}, recall


def _faiss_backends(qs: list[np.ndarray], bs: list[np.ndarray], k: int, threads: int) -> list[tuple[str, Callable, int]]:
    """FAISS's exact inner-product index, with its own kernel and with BLAS forced (none if FAISS is
    not installed)."""
    try:
        import faiss
    except ImportError:
        return []
    faiss.omp_set_num_threads(threads)
    indexes = []
    for b in bs:
        ix = faiss.IndexFlatIP(b.shape[1])
        ix.add(b)
        indexes.append(ix)
    default_thr = faiss.cvar.distance_compute_blas_threshold

    def faiss_run(blas: bool):
        def run():
            faiss.cvar.distance_compute_blas_threshold = 1 if blas else default_thr
            try:
                return [ix.search(q, k) for ix, q in zip(indexes, qs)]
            finally:
                faiss.cvar.distance_compute_blas_threshold = default_thr

        return run

    return [("faiss", faiss_run(False), 4), ("faiss-blas", faiss_run(True), 4)]


def _numpy_backend(qs: list[np.ndarray], bs: list[np.ndarray], k: int) -> Callable:
    def run():
        out = []
        for q, b in zip(qs, bs):
            s = q @ b.T
            kk = min(k, b.shape[0])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            ps = np.take_along_axis(s, part, 1)
            o = np.argsort(-ps, axis=1)
            out.append((np.take_along_axis(ps, o, 1), np.take_along_axis(part, o, 1)))
        return out

    return run


def _torch_backends(qs: list[np.ndarray], bs: list[np.ndarray], k: int, threads: int, *,
                    bf16: bool) -> list[tuple[str, Callable, int]]:
    """What a PyTorch user types first: matmul + topk, in fp32 and in bf16 (the bf16 scores are
    rounded to bf16 before the top-k, so it is not exact)."""
    try:
        import torch
    except ImportError:
        return []
    torch.set_num_threads(threads)
    tq = [torch.from_numpy(x) for x in qs]
    tb = [torch.from_numpy(x) for x in bs]
    tqb = [x.to(torch.bfloat16) for x in tq] if bf16 else []
    tbb = [x.to(torch.bfloat16) for x in tb] if bf16 else []

    def torch_run(a, b):
        def run():
            with torch.inference_mode():
                return [torch.mm(x, y.T).topk(min(k, y.shape[0]), dim=1) for x, y in zip(a, b)]

        return run

    return [("torch-fp32", torch_run(tq, tb), 4), ("torch-bf16", torch_run(tqb, tbb), 2)]


def run_case(case: Case, k: int, threads: int, repeats: int, want, rng, bw: float) -> list[dict]:
    fns, bytes_per, recall = build_backends(case, k, threads, want, rng)
    times: dict[str, list[float]] = {name: [] for name in fns}
    recalls = {name: recall(name, fn()) for name, fn in fns.items()}  # also the warm-up (page faults, pools, init)
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = []
    for name, t in med.items():
        bank_bytes = case.banks * case.n * case.d * bytes_per[name]
        rows.append(
            {
                "shape": {"banks": case.banks, "Q": case.q, "N": case.n, "d": case.d, "k": k},
                "label": case.label,
                "backend": name,
                "seconds": t,
                "recall_at_k": recalls[name],
                "all_seconds": times[name],
                "gflops": case.flops / t / 1e9,
                "gbps": bank_bytes / t / 1e9,
                "roofline_fraction": (bank_bytes / (bw * 1e9)) / t if bw > 0 else None,
                "ratio_to_torch_bf16": (med["torch-bf16"] / t) if "torch-bf16" in med else None,
                "ratio_to_faiss": (med["faiss"] / t) if "faiss" in med else None,
                "ratio_to_faiss_blas": (med["faiss-blas"] / t) if "faiss-blas" in med else None,
            }
        )
    del fns
    gc.collect()
    return rows


def evaluate_targets(results: list[dict], peak_gflops_bf16: float | None = None) -> list[dict]:
    """The performance targets, checked on the measured medians. peak_gflops_bf16: the measured
    arithmetic peak of the bf16 multiply-add on the benchmark's threads (crl._native.peak_gflops)."""

    def get(backend, pred):
        return [r for r in results if r["backend"] == backend and pred(r["shape"])]

    out = []

    def target(name, rows, key, need):
        for r in rows:
            v = r.get(key)
            if v is None:
                continue
            out.append({"target": name, "shape": r["label"], "value": v, "required": need, "met": v >= need})

    single = lambda s: s["banks"] == 1  # noqa: E731
    target("fp32 >= 1.0x FAISS at Q >= 256", get("crl-fp32", lambda s: single(s) and s["Q"] >= 256), "ratio_to_faiss", 1.0)
    target("fp32 >= 4x FAISS default at Q = 16", get("crl-fp32", lambda s: single(s) and s["Q"] == 16), "ratio_to_faiss", 4.0)
    target("bf16 >= 1.6x FAISS fp32 at Q >= 256", get("crl-bf16", lambda s: single(s) and s["Q"] >= 256), "ratio_to_faiss", 1.6)
    target("bf16 >= 70% memory roofline at Q <= 16", get("crl-bf16", lambda s: single(s) and s["Q"] <= 16), "roofline_fraction", 0.7)
    target("11-bank call >= 3x Python loop over FAISS", get("crl-fp32", lambda s: s["banks"] > 1), "ratio_to_faiss", 3.0)
    target("bf16 >= torch bf16 matmul + topk (and exact)", get("crl-bf16", lambda s: True), "ratio_to_torch_bf16", 1.0)
    target("bf16 exact (recall@k 1.0)", get("crl-bf16", lambda s: True), "recall_at_k", 1.0)
    target("bf16 >= 80% memory read bandwidth at Q <= 16", get("crl-bf16", lambda s: single(s) and s["Q"] <= 16),
           "roofline_fraction", 0.8)
    if peak_gflops_bf16:
        rows = [dict(r, peak_fraction=r["gflops"] / peak_gflops_bf16) for r in get("crl-bf16", lambda s: single(s) and s["Q"] >= 256)]
        target("bf16 >= 80% of the measured bf16 multiply-add peak at Q >= 256", rows, "peak_fraction", 0.8)
    return out


def _print_table(results: list[dict], targets: list[dict], meta: dict) -> None:
    header = ["shape", "backend", "ms", "recall@k", "GFLOP/s", "GB/s", "roofline", "x torch-bf16", "x FAISS", "x FAISS-BLAS"]
    rows = []
    for r in results:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        rows.append(
            [r["label"], r["backend"], f(r["seconds"] * 1e3, ".1f"), f(r["recall_at_k"], ".4f"), f(r["gflops"], ".1f"), f(r["gbps"], ".1f"),
             f(r["roofline_fraction"], ".0%"), f(r["ratio_to_torch_bf16"], ".2f"), f(r["ratio_to_faiss"], ".2f"), f(r["ratio_to_faiss_blas"], ".2f")]
        )
    m = meta
    title = (f"exact top-{m['k']} mining - {m['cpu']} - {m['threads']} threads - read {m['read_gbps']:.1f} GB/s - "
             f"peak bf16 {m['peak_gflops']['bf16']:.0f} / fp32 {m['peak_gflops']['fp32']:.0f} GFLOP/s - "
             f"load {m['load_before'][0]:.2f}/{m['load_after'][0]:.2f}")
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="left" if h in ("shape", "backend") else "right", no_wrap=True)
        for row in rows:
            t.add_row(*row)
        c = Console(width=max(140, Console().width))
        c.print(t)
        if targets:
            tt = Table(title="targets")
            for h in ["target", "shape", "value", "required", "met"]:
                tt.add_column(h)
            for x in targets:
                tt.add_row(x["target"], x["shape"], f"{x['value']:.2f}", f"{x['required']:.2f}", "yes" if x["met"] else "NO")
            c.print(tt)
        return
    except ImportError:
        pass
    print(title)
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    print("  ".join(h.ljust(w[i]) for i, h in enumerate(header)))
    for row in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(row)))
    for x in targets:
        print(f"{'ok ' if x['met'] else 'MISS'} {x['target']} [{x['shape']}]: {x['value']:.2f} (need {x['required']:.2f})")


def parse_shape(s: str) -> tuple[int, int, int, int]:
    """'Q,N,d' or 'LxQ,N,d' (L banks)."""
    banks = 1
    if "x" in s:
        b, s = s.split("x", 1)
        banks = int(b)
    q, n, d = (int(v) for v in s.split(","))
    return banks, q, n, d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="crl bench mining", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test, seconds)")
    p.add_argument("--output", default="results/mining.json", help="JSON output path (default %(default)s)")
    p.add_argument("--k", type=int, default=10, help="results per query (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="threads for every backend (default: all cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per backend (default 7, quick 3)")
    p.add_argument("--shape", action="append", type=parse_shape, default=None,
                   help="'Q,N,d' or 'LxQ,N,d' (L banks); repeatable; replaces the default shapes")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of crl-fp32,crl-bf16,faiss,faiss-blas,numpy,torch-fp32,torch-bf16")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from crl import _native

    threads = a.threads or _native.default_threads()
    repeats = a.repeats or (3 if a.quick else 7)
    shapes = a.shape or (QUICK_SHAPES if a.quick else DEFAULT_SHAPES)
    want = set(a.backends.split(",")) if a.backends else None
    limiter = _set_numpy_threads(threads)
    rng = np.random.default_rng(a.seed)

    load_before = os.getloadavg()
    bw = read_bandwidth(1 << 26 if a.quick else 1 << 30, threads=threads)
    results: list[dict] = []
    for banks, q, n, d in shapes:
        case = Case(banks, q, n, d)
        print(f"... {case.label}", file=sys.stderr, flush=True)
        results.extend(run_case(case, a.k, threads, repeats, want, rng, bw))
    load_after = os.getloadavg()
    peaks = {"bf16": _native.peak_gflops(bf16=True, threads=threads), "fp32": _native.peak_gflops(bf16=False, threads=threads)}
    targets = [] if a.quick else evaluate_targets(results, peaks["bf16"])
    meta = {
        "cpu": cpu_model(),
        "threads": threads,
        "read_gbps": bw,
        "peak_gflops": peaks,
        "simd_path": _native.simd_path(),
        "simd_paths": _native.simd_paths(),
        "k": a.k,
        "repeats": repeats,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "versions": _versions(),
        "quick": a.quick,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": meta, "results": results, "targets": targets}, indent=2))
    _print_table(results, targets, meta)
    print(f"wrote {out}", file=sys.stderr)
    del limiter
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
