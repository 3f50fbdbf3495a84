"""Training-step benchmark: seconds per optimizer step and peak memory, split into the frozen
passes, the trained passes, mining, refinement, the loss and the optimizer; the fused triplet kernel
against the torch reference; and the hidden-state capture with hooks and truncated passes against
`output_hidden_states=True` over the whole model.

    python benches/train_step.py                       # SmolLM2, the demo preset, 8 steps
    python benches/train_step.py --model tiny --steps 4
    python benches/gpu_step.py                         # Llama-3-8B-shaped, random weights, on a GPU

Both write JSON and print a table.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SPLIT_KEYS = (
    "seconds_frozen_pass", "seconds_trained_pass", "seconds_mining", "seconds_refinement", "seconds_loss",
    "seconds_retain_passes", "seconds_optimizer",
)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"


def synthetic_pools(out: Path, *, n: int = 32, response_words: int = 60) -> Path:
    """Pools with fixed-length synthetic responses, so that timings do not depend on generation."""
    from crl.data import Pools, load_demo, save_pools

    words = "the model explains each step of the process in plain and careful detail".split()
    filler = " ".join(words[i % len(words)] for i in range(response_words))
    harmful = [ex.with_response("Sure, here is how: " + filler) for ex in load_demo("harmful", "all")[:n]]
    benign = [ex.with_response("Happy to help: " + filler) for ex in load_demo("benign", "all")[:n]]
    save_pools(Pools(harmful=harmful, benign=benign, retain=benign), out)
    return out


def time_capture(model: Any, batch: Any, layers: list[int], repeats: int) -> dict[str, float]:
    """Forward + backward of the hidden states at `layers`: hooks with truncation vs all hidden states."""
    from crl.models import capture_hidden_states

    def truncated() -> torch.Tensor:
        hidden = capture_hidden_states(model, batch.input_ids, batch.attention_mask, layers)
        return sum(h.float().pow(2).mean() for h in hidden.values())

    def full() -> torch.Tensor:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        return sum(out.hidden_states[l].float().pow(2).mean() for l in layers)

    times: dict[str, list[float]] = {"hooks_truncated": [], "output_hidden_states": []}
    for _ in range(repeats):  # interleaved, so that drift affects both alike
        for name, fn in (("hooks_truncated", truncated), ("output_hidden_states", full)):
            _sync()
            t = time.perf_counter()
            fn().backward()
            _sync()
            times[name].append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def run_step_benchmark(
    config: Any, model: Any, tokenizer: Any, *, steps: int, backends: tuple[str, ...] = ("auto",),
    capture_repeats: int = 3,
) -> dict[str, Any]:
    """Train `steps` timed optimizer steps per triplet backend (after one warm-up step each) on
    synthetic pools; returns the per-part medians, peak memory and the capture comparison."""
    from crl.training.trainer import Trainer

    per_backend: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if config.data.pools == "demo":
            config.data.pools = str(synthetic_pools(Path(tmp) / "pools", response_words=config.data.max_length))
        config.run.checkpoint_every = 10**6
        config.run.progress = False
        total_steps = (steps + 1) * len(backends)
        config.optim.max_steps = total_steps
        trainer = Trainer(config, Path(tmp) / "run", model=model, tokenizer=tokenizer)
        # The step does not wait for the device; for the split, each part's clock reads wait for it
        # (on a GPU, without this, seconds_* would time the host queuing the work).
        trainer.loss.sync_timings = True
        done = 0
        previous = os.environ.get("CRL_TRIPLET_BACKEND")
        try:
            for backend in backends:
                os.environ["CRL_TRIPLET_BACKEND"] = backend
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                done += steps + 1
                trainer.train(max_steps=done)
                rows = [json.loads(l) for l in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
                rows = rows[done - steps : done]  # the warm-up step of each backend is left out
                split = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("seconds_per_step", *SPLIT_KEYS)}
                split["seconds_backward_and_other"] = split["seconds_per_step"] - sum(split[k] for k in SPLIT_KEYS)
                peak, kind = peak_memory_gib()
                per_backend[backend] = {"split_median": split, "peak_memory_gib": peak, "peak_memory_kind": kind}
        finally:
            if previous is None:
                os.environ.pop("CRL_TRIPLET_BACKEND", None)
            else:
                os.environ["CRL_TRIPLET_BACKEND"] = previous
        batches = trainer._next_batches()
        tokens_per_step = int(batches.contrast.attention_mask.sum()) + (
            int(batches.retain.attention_mask.sum()) if batches.retain is not None else 0
        )
        tokens_per_step *= config.optim.grad_accumulation
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        capture = time_capture(peft_model, batches.contrast, config.loss.captured_layers, capture_repeats)
    first = per_backend[backends[0]]["split_median"]["seconds_per_step"]
    return {
        "model": config.model.name, "method": config.loss.method,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "batch_size_per_pool": config.data.batch_size, "grad_accumulation": config.optim.grad_accumulation,
        "max_length": config.data.max_length, "captured_layers": config.loss.captured_layers,
        "steps_timed": steps, "tokens_per_step": tokens_per_step, "tokens_per_second": tokens_per_step / first,
        "backends": per_backend,
        "capture_forward_backward_seconds": capture,
        "capture_speedup": capture["output_hidden_states"] / capture["hooks_truncated"],
        "torch": torch.__version__, "python": sys.version.split()[0],
    }


def print_result(result: dict[str, Any]) -> None:
    backends = list(result["backends"])
    print(f"{'part (median s/step)':<30}" + "".join(f"{b:>14}" for b in backends))
    for key in ("seconds_per_step", *SPLIT_KEYS, "seconds_backward_and_other"):
        print(f"{key:<30}" + "".join(f"{result['backends'][b]['split_median'][key]:>14.3f}" for b in backends))
    for b in backends:
        r = result["backends"][b]
        print(f"peak memory [{b}] ({r['peak_memory_kind']}): {r['peak_memory_gib']:.2f} GiB")
    print(f"tokens per step {result['tokens_per_step']}, {result['tokens_per_second']:.0f} tokens/s")
    cap = result["capture_forward_backward_seconds"]
    print(f"capture fwd+bwd: hooks+truncation {cap['hooks_truncated']:.3f}s vs output_hidden_states "
          f"{cap['output_hidden_states']:.3f}s ({result['capture_speedup']:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="training config (default: the demo preset)")
    parser.add_argument("--model", default=None, help="override model.name (e.g. tiny)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backends", default="auto", help="comma-separated triplet backends to compare (auto,torch,triton)")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--output", type=Path, default=Path("results/train_step.json"))
    args = parser.parse_args(argv)

    from crl.demo import preset_path
    from crl.models import DTYPES, load_model
    from crl.training.config import load_train_config

    sets = list(args.set) + ([f'model.name="{args.model}"'] if args.model else [])
    config = load_train_config(args.config or preset_path(), sets)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(config.model.name, dtype=DTYPES[config.model.dtype], device=device)
    result = run_step_benchmark(config, model, tokenizer, steps=args.steps, backends=tuple(args.backends.split(",")))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print_result(result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
