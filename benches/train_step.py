"""Training-step benchmark: seconds per optimizer step and peak memory, split into the frozen
passes, the trained passes, the loss and the optimizer; and the hidden-state capture with hooks and
truncated passes against `output_hidden_states=True` over the whole model.

    python benches/train_step.py                       # SmolLM2, the demo preset, 8 steps
    python benches/train_step.py --model tiny --steps 4
    python benches/train_step.py --config configs/llama3-8b-instruct.toml   (on a GPU)

Writes JSON (default results/train_step.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _synthetic_pools(out: Path, n: int = 32) -> Path:
    """Fixed-length synthetic responses, so that timings do not depend on a generation step."""
    from crl.data import Pools, load_demo, save_pools

    words = "the model explains each step of the process in plain and careful detail".split()
    filler = " ".join(words[i % len(words)] for i in range(60))
    harmful = [ex.with_response("Sure, here is how: " + filler) for ex in load_demo("harmful", "all")[:n]]
    benign = [ex.with_response("Happy to help: " + filler) for ex in load_demo("benign", "all")[:n]]
    save_pools(Pools(harmful=harmful, benign=benign, retain=benign), out)
    return out


def time_capture(model, batch, layers, repeats: int) -> dict[str, float]:
    """Forward + backward of the hidden states at `layers`: hooks with truncation vs all hidden states."""
    from crl.models import capture_hidden_states

    def truncated():
        hidden = capture_hidden_states(model, batch.input_ids, batch.attention_mask, layers)
        return sum(h.float().pow(2).mean() for h in hidden.values())

    def full():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        return sum(out.hidden_states[l].float().pow(2).mean() for l in layers)

    times: dict[str, list[float]] = {"hooks_truncated": [], "output_hidden_states": []}
    for _ in range(repeats):  # interleaved
        for name, fn in (("hooks_truncated", truncated), ("output_hidden_states", full)):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn().backward()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="training config (default: the demo preset)")
    parser.add_argument("--model", default=None, help="override model.name (e.g. tiny)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--output", type=Path, default=Path("results/train_step.json"))
    args = parser.parse_args(argv)

    from crl.demo import preset_path
    from crl.models import load_model
    from crl.training.config import load_train_config
    from crl.training.trainer import DTYPES, Trainer

    config_path = args.config or preset_path()
    sets = list(args.set) + ([f'model.name="{args.model}"'] if args.model else [])
    sets += [f"optim.max_steps={args.steps + 1}", f"run.checkpoint_every={10**6}", "run.progress=false"]
    config = load_train_config(config_path, sets)
    model, tokenizer = load_model(config.model.name, dtype=DTYPES[config.model.dtype],
                                  device="cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if config.data.pools == "demo":
            config.data.pools = str(_synthetic_pools(Path(tmp) / "pools"))
        trainer = Trainer(config, Path(tmp) / "run", model=model, tokenizer=tokenizer)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train(max_steps=args.steps + 1)  # the first step warms up and is left out
        rows = [json.loads(l) for l in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
        batch = trainer._next_batches().contrast
        peft_model = trainer.accelerator.unwrap_model(trainer.model)
        capture = time_capture(peft_model, batch, config.loss.captured_layers, repeats=5)
    split = {
        key: statistics.median(r.get(key, 0.0) for r in rows)
        for key in ("seconds_per_step", "seconds_frozen_pass", "seconds_trained_pass", "seconds_loss",
                    "seconds_retain_passes", "seconds_optimizer")
    }
    backward = split["seconds_per_step"] - sum(v for k, v in split.items() if k != "seconds_per_step")
    split["seconds_backward_and_other"] = backward
    tokens = (batch.attention_mask.sum().item()) * config.optim.grad_accumulation
    result = {
        "model": config.model.name, "method": config.loss.method, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "batch_size_per_pool": config.data.batch_size, "max_length": config.data.max_length,
        "captured_layers": config.loss.captured_layers, "steps_timed": len(rows),
        "split_median": split, "contrast_tokens_last_batch": tokens,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else _peak_rss_gib(),
        "peak_memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "process max RSS",
        "capture_forward_backward_seconds": capture,
        "capture_speedup": capture["output_hidden_states"] / capture["hooks_truncated"],
        "torch": torch.__version__, "python": sys.version.split()[0],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"{'part':<28}{'median s/step':>14}")
    for k, v in split.items():
        print(f"{k:<28}{v:>14.3f}")
    print(f"peak memory ({result['peak_memory_kind']}): {result['peak_memory_gib']:.2f} GiB")
    print(f"capture fwd+bwd: hooks+truncation {capture['hooks_truncated']:.3f}s vs output_hidden_states "
          f"{capture['output_hidden_states']:.3f}s ({result['capture_speedup']:.2f}x)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
