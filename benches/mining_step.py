"""Mining cost per training step, by backend and bank size, and its share of a real training step.

Part 1 (synthetic, clustered banks): for each bank size N and dimension d, one layer's bank is
indexed by each backend (FAISS IndexFlatIP with the BLAS threshold lowered, IVF-Flat, HNSW; the
native exact miner on fp32 and on bf16) and the per-step mining work is timed: the queries of one
micro-batch (``--queries`` pooled harmful states, own sample excluded) against that bank, plus the
gather of the k negatives, median of ``--repeats`` runs. A configuration mining L layers costs L
times this (the native miner searches all layers in one call, so slightly less). Build seconds are
reported separately (a frozen bank is indexed once per run). Configurations that do not fit in
memory (``--max-gib``, default 40% of the memory available at start) or whose build would take too
long (HNSW beyond ``--hnsw-max-elements`` N*d) are skipped, with the reason in the output.

Part 2 (a real step): a few training steps of SmolLM2-135M-Instruct (``--model smollm2``, loaded
offline; ``tiny`` in --quick mode) with mining and refinement enabled, on hand-made pools (the demo
harmful prompts with a fixed compliant answer, the demo benign prompts), reading seconds_per_step,
seconds_mining and seconds_refinement from metrics.jsonl. The share of a step that the Part 1 miner
would take at 100k x 4096 is reported against this measured step time too (the target: <= 10%).

Writes JSON (``--output``) and prints a table. ``--quick``: small shapes and the tiny model, seconds.
The machine may be shared: the load average is recorded with the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from crl.mining.index import IndexParams, available_memory_bytes, bf16_bits, make_index  # noqa: E402

BACKENDS = ["faiss_flat", "faiss_ivf", "faiss_hnsw", "native_fp32", "native_bf16"]


def synthetic_bank(n: int, d: int, *, bf16: bool, clusters: int = 256, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """A clustered bank [n, d] (float32, or bf16 bits as int16), generated in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * 2.0
    out = np.empty((n, d), dtype=np.int16 if bf16 else np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = centres[rng.integers(0, clusters, stop - start)]
        block += rng.standard_normal((stop - start, d), dtype=np.float32)
        out[start:stop] = bf16_bits(block) if bf16 else block
    return out


def bytes_needed(backend: str, n: int, d: int) -> int:
    if backend == "native_bf16":
        return n * d * 2
    if backend == "native_fp32":
        return n * d * 4
    return n * d * 4 * 2  # our fp32 array + FAISS's own copy


def time_mining(index, queries: np.ndarray, groups: np.ndarray, bank: np.ndarray, k: int, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k, groups)
        _ = bank[np.maximum(ids[0], 0).reshape(-1)]  # gather the negatives
        times.append(time.perf_counter() - t0)
    return times


def part1(args) -> list[dict]:
    rows = []
    limit = args.max_gib * (1 << 30)
    for d in args.dims:
        for n in args.sizes:
            gc.collect()
            queries = np.random.default_rng(1).standard_normal((1, args.queries, d)).astype(np.float32)
            qgroups = np.arange(args.queries, dtype=np.int64)
            groups = np.arange(n, dtype=np.int64)
            cache: dict[bool, np.ndarray] = {}
            for backend in args.backends:
                row = {"backend": backend, "n": n, "d": d, "queries": args.queries, "k": args.k, "seconds": None,
                       "threads": (args.faiss_threads if backend.startswith("faiss") and args.faiss_threads else args.threads)}
                need = bytes_needed(backend, n, d)
                if need > limit:
                    row["skipped"] = f"needs {need / 2**30:.1f} GiB > --max-gib {args.max_gib:.1f}"
                    rows.append(row)
                    print(f"  skip {backend:12s} N={n:>8d} d={d:>5d}: {row['skipped']}", flush=True)
                    continue
                if backend == "faiss_hnsw" and n * d > args.hnsw_max_elements:
                    row["skipped"] = f"HNSW build of N*d={n * d:.2e} > --hnsw-max-elements {args.hnsw_max_elements:.1e} (build time)"
                    rows.append(row)
                    print(f"  skip {backend:12s} N={n:>8d} d={d:>5d}: {row['skipped']}", flush=True)
                    continue
                bf16 = backend == "native_bf16"
                if bf16 not in cache:
                    cache.clear()
                    gc.collect()
                    cache[bf16] = synthetic_bank(n, d, bf16=bf16)
                bank = cache[bf16]
                threads = args.faiss_threads if backend.startswith("faiss") and args.faiss_threads else args.threads
                params = IndexParams(metric="cosine", nlist=args.nlist, nprobe=args.nprobe, threads=threads,
                                     train_size=40 * args.nlist, hnsw_ef_construction=40)
                index = make_index("native" if bf16 else backend, params)
                try:
                    index.build(bank[None], groups, kind="bfloat16" if bf16 else "float32")
                    times = time_mining(index, queries, qgroups, bank, args.k, args.repeats)
                except MemoryError as exc:  # pragma: no cover
                    row["skipped"] = f"MemoryError: {exc}"
                    rows.append(row)
                    continue
                row.update(seconds=statistics.median(times), min_seconds=min(times), build_seconds=index.build_seconds)
                rows.append(row)
                print(f"  {backend:12s} N={n:>8d} d={d:>5d}: {row['seconds'] * 1e3:9.2f} ms/step/layer  (build {index.build_seconds:.1f}s)", flush=True)
                del index
                gc.collect()
            cache.clear()
    return rows


def _pools(folder: Path, n_harmful: int, n_benign: int) -> None:
    from crl.data import Pools, load_demo, save_pools

    harmful = [ex.with_response(f"Sure, here is how to do that. First, {ex.prompt.lower()[:60]}. Then continue step by step.")
               for ex in load_demo("harmful", "train")[:n_harmful]]
    benign = [ex.with_response("Happy to help. Here is a short, clear answer to your question.")
              for ex in load_demo("benign", "train")[:n_benign]]
    save_pools(Pools(harmful=harmful, benign=benign, retain=benign), folder)


def part2(args) -> dict:
    import torch

    from crl.training.config import load_train_config
    from crl.training.trainer import Trainer

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="crl-mining-step-"))
    try:
        _pools(work / "pools", 24 if args.quick else 64, 24 if args.quick else 42)
        if args.model == "tiny":
            base = REPO / "configs" / "tiny.toml"
            sets = ["refinement.layers=[1, 2]"]
        else:
            base = REPO / "python" / "crl" / "presets" / "demo-smollm2.toml"
            sets = ["refinement.layers=[4, 8]", "data.max_length=96", "lora.dropout=0.0"]
        sets += [
            f'data.pools="{work / "pools"}"', f"optim.max_steps={args.steps}", f"run.checkpoint_every={args.steps + 1}",
            "run.progress=false", "mining.enabled=true", "refinement.enabled=true", f'mining.cache_dir="{work / "banks"}"',
            f"mining.k={args.k}", "mining.queue_size=1024", f"refinement.steps={args.refine_steps}",
            f"refinement.refresh_every={args.refresh_every}",
        ]
        config = load_train_config(base, sets)
        t0 = time.perf_counter()
        trainer = Trainer(config, work / "run")
        setup = time.perf_counter() - t0
        trainer.train()
        metrics = [json.loads(l) for l in (work / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
        timed = metrics[1:] if len(metrics) > 1 else metrics  # the first step warms up
        mean = lambda key: sum(m.get(key, 0.0) for m in timed) / len(timed)  # noqa: E731
        step = mean("seconds_per_step")
        return {
            "model": args.model, "steps": len(metrics), "timed_steps": len(timed), "setup_seconds": setup,
            "bank_size": trainer.miner.bank.size, "bank_layers": trainer.miner.bank.layers, "backend": trainer.miner.backend,
            "batch_size": config.data.batch_size, "target_layers": config.loss.target_layers,
            "refinement": {"steps": config.refinement.steps, "refresh_every": config.refinement.refresh_every,
                           "samples": config.refinement.samples, "layers": config.refinement.layers},
            "seconds_per_step": step, "seconds_mining": mean("seconds_mining"),
            "seconds_refinement": mean("seconds_refinement"),
            "mining_share": mean("seconds_mining") / step, "refinement_share": mean("seconds_refinement") / step,
            "attack_loss_start": mean("attack_loss_start"), "attack_loss": mean("attack_loss"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and the tiny model (smoke test)")
    parser.add_argument("--output", default=str(REPO / "results" / "mining_step.json"))
    parser.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=None)
    parser.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], default=None)
    parser.add_argument("--backends", type=lambda s: s.split(","), default=BACKENDS)
    parser.add_argument("--queries", type=int, default=8, help="pooled queries per layer per step (harmful samples)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--nlist", type=int, default=256)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--faiss-threads", type=int, default=None,
                        help="OpenMP threads of the FAISS backends (default: --threads). With torch loaded in the "
                             "process, FAISS's OpenMP threads can contend with torch's on few cores: try 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-gib", type=float, default=None)
    parser.add_argument("--hnsw-max-elements", type=float, default=6e7)
    parser.add_argument("--model", default=None, help="smollm2 (default), tiny, or none to skip part 2")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--refine-steps", type=int, default=2)
    parser.add_argument("--refresh-every", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or [2000, 5000]
        args.dims = args.dims or [64, 256]
        args.repeats = min(args.repeats, 2)
        args.nlist = min(args.nlist, 32)
        args.model = args.model or "tiny"
        args.steps = args.steps or 2
    args.sizes = args.sizes or [10_000, 100_000, 1_000_000]
    args.dims = args.dims or [4096, 576]
    args.model = args.model or "smollm2"
    args.steps = args.steps or 4
    avail = available_memory_bytes()
    if args.max_gib is None:
        args.max_gib = 0.4 * avail / 2**30
    load = os.getloadavg()
    print(f"mining step benchmark: {os.cpu_count()} CPUs, load average {load[0]:.2f}, available memory {avail / 2**30:.1f} GiB", flush=True)
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "load_average_start": load, "available_gib": avail / 2**30,
                    "python": platform.python_version(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items()},
    }
    print("part 1: mining seconds per step (one layer's bank, per-step queries, own sample excluded)", flush=True)
    results["mining"] = part1(args)
    if args.model != "none":
        print(f"part 2: training steps of {args.model} with mining and refinement", flush=True)
        results["step"] = part2(args)
    results["machine"]["load_average_end"] = os.getloadavg()

    # the target: mining <= 10% of a step at 100k x 4096 with the native miner
    step = results.get("step", {}).get("seconds_per_step")
    checks = []
    for r in results["mining"]:
        if r["backend"].startswith("native") and r["n"] == 100_000 and r["d"] == 4096 and r.get("seconds") and step:
            checks.append({"backend": r["backend"], "seconds": r["seconds"], "step_seconds": step,
                           "share": r["seconds"] / step, "target_met": r["seconds"] / step <= 0.10})
    results["target_100k_4096"] = checks

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))

    print()
    print(f"{'backend':<13}{'N':>9}{'d':>6}{'ms/step/layer':>15}{'build s':>10}  note")
    for r in results["mining"]:
        ms = f"{r['seconds'] * 1e3:.2f}" if r.get("seconds") is not None else "-"
        b = f"{r['build_seconds']:.1f}" if r.get("build_seconds") is not None else "-"
        print(f"{r['backend']:<13}{r['n']:>9}{r['d']:>6}{ms:>15}{b:>10}  {r.get('skipped', '')}")
    if "step" in results:
        s = results["step"]
        print(f"\n{s['model']} step: {s['seconds_per_step']:.2f} s; mining {s['seconds_mining']:.3f} s "
              f"({100 * s['mining_share']:.1f}%), refinement {s['seconds_refinement']:.2f} s ({100 * s['refinement_share']:.1f}%); "
              f"bank {s['bank_size']} samples x {len(s['bank_layers'])} layers, backend {s['backend']}")
    for c in checks:
        print(f"target (100k x 4096, {c['backend']}): {c['seconds'] * 1e3:.1f} ms per layer = {100 * c['share']:.1f}% of the "
              f"measured step -> {'met' if c['target_met'] else 'NOT met'} (per layer; multiply by the layers mined)")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
