"""The training loop: LoRA fine-tuning with CRL (or a baseline), checkpointed and resumable.

Runs the same on one CPU process and under `accelerate launch` (see docs). Every schedule counts
optimizer steps. Each optimizer step appends one JSON object to `metrics.jsonl`; every
`run.checkpoint_every` steps an atomic checkpoint is written, from which `--resume` continues with
exactly the trajectory an uninterrupted run would have had (same data order, RNG and optimizer state).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crl.config import ConfigError
from crl.data import EncodedExample, Example, LengthGroupedBatchSampler, collate, encode_example
from crl.training.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    latest_checkpoint,
    read_checkpoint,
    restore_rng_state,
    write_checkpoint,
)
from crl.training.config import TrainConfig
from crl.training.step import LossComputer, StepBatches, token_selection

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PoolStream:
    """An endless, resumable stream of micro-batches from one pool, grouped by length."""

    def __init__(self, encoded: list[EncodedExample], batch_size: int, seed: int) -> None:
        if not encoded:
            raise ValueError("pool is empty after encoding")
        self.encoded = encoded
        self.sampler = LengthGroupedBatchSampler(
            [len(e.input_ids) for e in encoded], batch_size, seed=seed, shuffle=True
        )
        self._iter = self.sampler.batches()

    def next_batch(self) -> list[EncodedExample]:
        return [self.encoded[i] for i in next(self._iter)]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._iter = self.sampler.batches()


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_metrics: dict[str, float]


def lora_layers_for(config: TrainConfig) -> list[int]:
    """Decoder layers (0-based) that get adapters: by default every layer that feeds a loss layer."""
    from crl.models import lora_layers_for_targets

    if config.lora.layers is not None:
        return list(config.lora.layers)
    return lora_layers_for_targets(config.loss.captured_layers)


def _lr_lambda(config: TrainConfig):
    optim = config.optim

    def factor(step: int) -> float:
        if optim.warmup_steps and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.lr_schedule == "constant":
            return 1.0
        span = max(1, optim.max_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        if optim.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        output_dir: str | Path,
        *,
        resume: bool = False,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.output_dir = Path(output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.resume = resume
        grad_accum = config.optim.grad_accumulation
        self.accelerator = Accelerator(
            gradient_accumulation_steps=grad_accum,
            mixed_precision="no",  # bf16 autocast is applied to the forward passes ourselves
            cpu=not torch.cuda.is_available(),
        )
        self.is_main = self.accelerator.is_main_process
        self._check_output_dir()
        seed_everything(config.run.seed)
        if model is None:
            from crl.models import load_model

            model, tokenizer = load_model(config.model.name, dtype=DTYPES[config.model.dtype])
        self.tokenizer = tokenizer
        self.base_model = model
        self.streams = self._build_streams()
        from crl.models import apply_lora

        lora = config.lora
        self.model = apply_lora(
            model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
            target_modules=lora.target_modules, layers=lora_layers_for(config),
        )
        self.model.to(self.accelerator.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        self.loss = LossComputer(
            self.accelerator.unwrap_model(self.model), config.loss, autocast=self.accelerator.device.type == "cuda"
        )
        self.step = 0

    # --- setup ---------------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        has_ckpt = latest_checkpoint(self.checkpoints_dir) is not None
        if has_ckpt and not self.resume:
            raise ConfigError(
                f"{self.output_dir}: holds checkpoints of an earlier run; pass --resume to continue it "
                "or choose another --output-dir"
            )
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.output_dir / "config.json", self.config.to_dict())

    def _load_pools(self):
        from crl.data import load_pools

        pools = self.config.data.pools
        if pools == "demo":
            from crl.data import build_pools, load_demo

            return build_pools(
                self.base_model, self.tokenizer, load_demo("harmful", "train"), load_demo("benign", "train"),
                self.output_dir / "pools", max_new_tokens=self.config.data.generation_max_new_tokens,
                progress=self.config.run.progress, seed=self.config.run.seed,
            )
        return load_pools(Path(pools))

    def _encode(self, examples: list[Example], name: str) -> list[EncodedExample]:
        from crl.data.encoding import EncodingTooLongError

        kept: list[EncodedExample] = []
        too_long = 0
        for ex in examples:
            try:
                encoded = encode_example(self.tokenizer, ex, max_length=self.config.data.max_length)
            except EncodingTooLongError:
                too_long += 1
                continue
            if encoded.has_response:
                kept.append(encoded)
        if too_long and self.is_main:
            print(f"crl: {too_long} of {len(examples)} {name} examples have prompts longer than data.max_length; skipped")
        if not kept:
            raise ConfigError(f"data.pools: the {name} pool has no example with response tokens within data.max_length")
        return kept

    def _build_streams(self) -> dict[str, PoolStream]:
        pools = self._load_pools()
        seed = self.config.run.seed
        batch = self.config.data.batch_size
        streams = {
            "benign": PoolStream(self._encode(pools.benign, "benign"), batch, seed + 1),
            "harmful": PoolStream(self._encode(pools.harmful, "harmful"), batch, seed + 2),
        }
        if self.config.loss.method != "circuit_breakers":
            streams["retain"] = PoolStream(self._encode(pools.retain, "retain"), batch, seed + 3)
        return streams

    # --- the loop ------------------------------------------------------------------------------

    def _next_batches(self) -> StepBatches:
        pad = self.tokenizer.pad_token_id
        device = self.accelerator.device
        benign = self.streams["benign"].next_batch()
        harmful = self.streams["harmful"].next_batch()
        contrast = collate(benign + harmful, pad).to(device)
        retain = None
        if "retain" in self.streams:
            retain = collate(self.streams["retain"].next_batch(), pad).to(device)
        loss_cfg = self.config.loss
        selection = token_selection(contrast, loss_cfg.tokens, loss_cfg.first_response_tokens)
        return StepBatches(contrast=contrast, num_benign=len(benign), retain=retain, selection=selection)

    def _restore(self) -> None:
        path = latest_checkpoint(self.checkpoints_dir)
        if path is None:
            return
        from peft import set_peft_model_state_dict

        state = read_checkpoint(path, device=self.accelerator.device)
        unwrapped = self.accelerator.unwrap_model(self.model)
        set_peft_model_state_dict(unwrapped, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        trainer_state = state["trainer_state"]
        for name, stream_state in trainer_state["streams"].items():
            self.streams[name].load_state_dict(stream_state)
        restore_rng_state(state["rng"])
        self.step = int(trainer_state["step"])
        if self.is_main and self.metrics_path.exists():
            # Drop metrics logged after the checkpoint: they will be produced again.
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= self.step]
            atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in kept))

    def _checkpoint(self) -> None:
        if not self.is_main:
            return
        from peft import get_peft_model_state_dict

        unwrapped = self.accelerator.unwrap_model(self.model)
        write_checkpoint(
            self.checkpoints_dir, self.step,
            adapter=get_peft_model_state_dict(unwrapped),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            trainer_state={"step": self.step, "streams": {n: s.state_dict() for n, s in self.streams.items()}},
            keep=self.config.run.keep_checkpoints,
        )

    def train(self, max_steps: int | None = None) -> TrainResult:
        """Run until `max_steps` optimizer steps (default: optim.max_steps) are done."""
        if self.resume:
            self._restore()
        total = self.config.optim.max_steps
        stop_at = min(total, max_steps) if max_steps is not None else total
        grad_accum = self.config.optim.grad_accumulation
        bar = None
        if self.config.run.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=stop_at, initial=self.step, desc=f"train {self.config.loss.method}", unit="step")
        metrics: dict[str, float] = {}
        self.model.train()
        while self.step < stop_at:
            started = time.perf_counter()
            progress = self.step / total
            sums: dict[str, float] = {}
            for _ in range(grad_accum):
                batches = self._next_batches()
                with self.accelerator.accumulate(self.model):
                    out = self.loss(batches, progress)
                    self.accelerator.backward(out.loss / grad_accum)
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + value / grad_accum
            t_opt = time.perf_counter()
            grad_norm = self.accelerator.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.config.optim.max_grad_norm
            )
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            metrics = {"step": self.step, **sums, "lr": lr, "grad_norm": float(grad_norm)}
            metrics["seconds_optimizer"] = time.perf_counter() - t_opt
            metrics["seconds_per_step"] = time.perf_counter() - started
            if self.is_main:
                with open(self.metrics_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(metrics) + "\n")
            if bar is not None:
                shown = {k: f"{metrics[k]:.3g}" for k in ("loss", "loss_benign", "loss_harmful", "loss_kl") if k in metrics}
                bar.set_postfix(shown)
                bar.update(1)
            if self.step % self.config.run.checkpoint_every == 0 or self.step == total:
                self._checkpoint()
        if bar is not None:
            bar.close()
        if self.step >= total and self.is_main:
            self._finish()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.output_dir, self.step, metrics)

    def _finish(self) -> None:
        """Write the adapter in peft format, and a model card."""
        from crl.training.export import write_model_card

        unwrapped = self.accelerator.unwrap_model(self.model)
        unwrapped.save_pretrained(str(self.output_dir / "adapter"))
        write_model_card(self.output_dir, self.config)


def train(config: TrainConfig, output_dir: str | Path, *, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    return Trainer(config, output_dir, resume=resume).train(max_steps=max_steps)
