"""The training step on a GPU with a Llama-3-8B-shaped model (random weights, no download): bf16,
hidden size 4096, MLP 14336, a 128k vocabulary, LoRA r 16 on all projections, the paper's layers
scaled to the model's depth (target layers 20-30 of 32, benign term on 1-30). Reports seconds per step,
tokens per second, peak memory, the split between frozen passes, trained passes, mining, refinement,
loss and optimizer, the fused Triton kernel against the torch reference (same steps, one backend
after the other), and hooks with truncated passes against full hidden states.

The defaults are a shrunk step that fits an 80 GB GPU with room to spare (8 decoder layers, target
layers 5-7, sequences of up to 256 tokens, 4 per pool: about 25 GB on an H200); `--full` is the
paper's size (32 layers, 1024 tokens, 8 per pool: with fp32 KL logits over the 128k vocabulary it
needs well over 80 GB, and may not fit an H200's 141 GB).

    python benches/gpu_step.py                          # the shrunk step, about a minute on an H200
    python benches/gpu_step.py --full                   # the paper's size
    python benches/gpu_step.py --dry-run-cpu            # the same code path on a tiny CPU model

Writes results/gpu_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
)


def build_random_llama(num_layers: int, *, dry_run: bool) -> tuple[torch.nn.Module, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from crl.models import build_tiny_tokenizer, ensure_padding

    shape = dict(LLAMA3_8B)
    if dry_run:
        shape.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    config = LlamaConfig(num_hidden_layers=num_layers, **shape)
    device = "cuda" if torch.cuda.is_available() and not dry_run else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    # Any tokenizer with a chat template works with random weights; its ids fit the vocabulary.
    tokenizer = ensure_padding(build_tiny_tokenizer())
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def paper_layers(num_layers: int) -> tuple[list[int], int]:
    """The paper's target layers (20-30 of Llama-3-8B's 32) scaled to `num_layers`, and the last one
    (the benign term covers 1 to it)."""
    first = max(1, round(20 * num_layers / 32))
    top = max(first, min(num_layers - 1, round(30 * num_layers / 32)))
    return list(range(first, top + 1)), top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (32 = Llama-3-8B)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per backend")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per pool per micro-batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--full", action="store_true",
                        help="the paper's size: 32 layers, sequences of up to 1024 tokens, 8 per pool")
    parser.add_argument("--backends", default="triton,torch")
    parser.add_argument("--set", action="append", default=[], help="extra training config overrides")
    parser.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on the CPU: checks the code path only")
    parser.add_argument("--output", type=Path, default=Path("results/gpu_step.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.dry_run_cpu:
        print("gpu_step: no CUDA device; nothing measured (use --dry-run-cpu to check the code path)")
        return 0

    from crl.benchmarks.train_step import print_result, run_step_benchmark
    from crl.training.config import load_train_config

    if args.full:
        args.layers, args.max_length, args.batch_size = 32, 1024, 8
    repo = Path(__file__).resolve().parents[1]
    layers = args.layers
    targets, top = paper_layers(layers)
    sets = [
        'model.name="random-llama3-8b-shape"', 'data.pools="demo"',
        f"data.max_length={args.max_length}", f"data.batch_size={args.batch_size}",
        f"loss.target_layers={targets}", f"loss.benign_layers={list(range(1, top + 1))}",
        "optim.grad_accumulation=1", *args.set,
    ]
    if args.dry_run_cpu:
        sets += ["data.max_length=64", "data.batch_size=2"]
    config = load_train_config(repo / "configs" / "llama3-8b-instruct.toml", sets)
    started = time.perf_counter()
    model, tokenizer = build_random_llama(layers, dry_run=args.dry_run_cpu)
    built = time.perf_counter() - started
    backends = tuple(args.backends.split(","))
    if args.dry_run_cpu:
        backends = tuple(b for b in backends if b != "triton") or ("torch",)
    result = run_step_benchmark(config, model, tokenizer, steps=args.steps, backends=backends)
    result.update(model="Llama-3-8B shape, random weights", decoder_layers=layers, build_seconds=built,
                  dry_run_cpu=args.dry_run_cpu)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print_result(result)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
