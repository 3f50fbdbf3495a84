"""The training loop: LoRA fine-tuning with CRL (or a baseline), checkpointed and resumable.

Runs the same on one CPU process and under `accelerate launch` (data parallel: each rank takes a
slice of every global batch; with an FSDP config the frozen weights are also sharded across the
ranks; see crl.training.distributed and docs/distributed.md). Every schedule counts
optimizer steps. Each optimizer step appends one JSON object to `metrics.jsonl`; every
`run.checkpoint_every` steps an atomic checkpoint is written, from which `--resume` continues with
exactly the trajectory an uninterrupted run would have had (same data order, RNG and optimizer state).

A run folder survives a kill at any moment: a (re)started run first removes what a killed one left
(temporary folders and files), resumes from the newest checkpoint that is complete (falling back past
damaged ones), and drops the metrics lines after that step (all of them when it starts from step 0),
so metrics.jsonl never holds a step twice. A non-finite loss or gradient norm stops the run before
the update (or skips the update, `optim.on_nonfinite = "skip"`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crl.atomic import atomic_write_json, atomic_write_text
from crl.config import ConfigError
from crl.data import EncodedExample, Example, LengthGroupedBatchSampler, collate, encode_example
from crl.training.checkpoint import (
    atomic_directory,
    check_output_folder,
    checkpoint_step,
    complete_checkpoints,
    list_checkpoints,
    read_checkpoint,
    remove_orphans,
    restore_rng_state,
    write_checkpoint,
)
from crl.training.config import TrainConfig
from crl.training.metrics import average_micro_batches, read_values, reduce_over_ranks
from crl.training.step import LossComputer, StepBatches, contrast_selection, row_totals, step_rows, token_selection

class TrainingDiverged(RuntimeError):
    """A step's loss or gradient norm was nan or inf (with `optim.on_nonfinite = "stop"`); the message
    names the step, the metrics and the last good checkpoint."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class PoolStream:
    """An endless, resumable stream of micro-batches from one pool, grouped by length."""

    def __init__(self, encoded: list[EncodedExample], batch_size: int, seed: int, min_size: int = 1) -> None:
        if not encoded:
            raise ValueError("pool is empty after encoding")
        self.encoded = encoded
        self.min_size = min_size
        """Batches smaller than this (an epoch's incomplete last batch) are skipped: with W processes,
        one of fewer than W examples would leave a rank without any."""
        self.sampler = LengthGroupedBatchSampler(
            [len(e.input_ids) for e in encoded], batch_size, seed=seed, shuffle=True
        )
        self._iter = self.sampler.batches()

    def next_batch(self) -> list[EncodedExample]:
        return self.next_batch_with_indices()[0]

    def next_batch_with_indices(self) -> tuple[list[EncodedExample], list[int]]:
        """The next micro-batch and the pool indices of its examples."""
        indices = list(next(self._iter))
        while len(indices) < self.min_size:
            indices = list(next(self._iter))
        return [self.encoded[i] for i in indices], indices

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
    skipped_steps: int = 0
    """Steps of this session whose update was dropped for a non-finite loss (`optim.on_nonfinite = "skip"`)."""


def nonfinite_metrics(values: dict[str, Any], grad_norm: float | None) -> list[str]:
    """The loss terms (`loss*`) and the gradient norm that are nan or inf: they decide the update."""
    named = [(k, v) for k, v in values.items() if k.startswith("loss")] + [("grad_norm", grad_norm)]
    return [k for k, v in named if isinstance(v, float) and not math.isfinite(v)]


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
        # Gradient accumulation is the loop's own (it scales each micro-batch's loss by 1 / steps and
        # steps the optimizer itself), so accelerate must not scale the loss a second time.
        self.accelerator = Accelerator(
            mixed_precision="no",  # bf16 autocast is applied to the forward passes ourselves
            cpu=not torch.cuda.is_available(),
        )
        self.is_main = self.accelerator.is_main_process
        from crl.training.distributed import DistributedContext

        self.dist = DistributedContext.from_accelerator(self.accelerator)
        if self.dist is not None:
            self.dist.check_batch_size(config.data.batch_size)
        self.fsdp = self.dist is not None and self.dist.fsdp is not None
        self._check_output_dir()
        seed_everything(config.run.seed)
        if model is None:
            from crl.models import DTYPES, ModelLoadError, load_model

            try:
                model, tokenizer = load_model(config.model.name, dtype=DTYPES[config.model.dtype])
            except ModelLoadError as exc:
                raise ConfigError(f"model.name: {exc}") from None
        self._check_layers(model)
        self.tokenizer = tokenizer
        self.base_model = model
        self.skipped_steps = 0
        if not self.fsdp:  # the demo pools are generated on the training device
            model.to(self.accelerator.device)
        with self.accelerator.main_process_first():  # demo pools: generated once (rank 0, unsharded model), then read
            self.streams = self._build_streams()
        self.miner = None
        self.refiner = None
        bank_model_hash = self._frozen_bank_before_lora(model)
        self.model = self._with_lora(model, bank_model_hash)
        self._build_optimizer()
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.adversary = None
        if config.refinement.enabled and config.refinement.kind == "module":
            self.adversary = self._build_adversary(unwrapped)
        elif config.refinement.enabled:
            self.refiner = self._build_refiner(unwrapped)
        mining = None
        if self.miner is not None:
            from crl.mining.stage import MiningStage

            mining = MiningStage(self.miner, layers=config.loss.captured_layers,
                                 benign_layers=config.loss.resolved_benign_layers,
                                 target_layers=config.loss.target_layers, refiner=self.refiner, dist=self.dist)
        self.loss = LossComputer(
            unwrapped, config.loss, autocast=self.accelerator.device.type == "cuda",
            mining=mining, mining_config=config.mining, adversary=self.adversary, dist=self.dist,
            device=self.accelerator.device,
        )
        self.step = 0
        if self.dist is not None and self.dist.rank > 0:
            # Own random streams per rank (LoRA dropout) after the identical initialisation.
            seed_everything(config.run.seed + 1_000_003 * self.dist.rank)

    def _frozen_bank_before_lora(self, model: torch.nn.Module) -> str | None:
        """The frozen bank through the base model (every rank in lock-step under several processes);
        under FSDP only the whole base model's fingerprint (on rank 0), since the bank is built through
        the sharded model later, under the same key."""
        if not self.config.mining.enabled:
            return None
        if not self.fsdp:
            self.miner = self._build_miner(model)
            return None
        if self.is_main:
            from crl.mining import model_fingerprint

            return model_fingerprint(model)
        return None

    def _with_lora(self, model: torch.nn.Module, bank_model_hash: str | None) -> torch.nn.Module:
        """The model with its LoRA adapters, on the device (sharded under FSDP, where the frozen bank is
        built now, through the sharded model)."""
        from crl.models import apply_lora

        lora = self.config.lora
        peft_model = apply_lora(
            model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
            target_modules=lora.target_modules, layers=lora_layers_for(self.config),
        )
        if not self.fsdp:
            return peft_model.to(self.accelerator.device)
        self.dist.shard_model(peft_model)  # the frozen weights sharded onto the devices; LoRA whole
        held = self.dist.frozen_fraction_held(peft_model)
        if self.is_main:
            print(f"crl: FSDP2 over {self.dist.world_size} processes: each holds {held:.1%} of the frozen "
                  "weights (one shard group per decoder layer); LoRA weights whole on every process")
        if self.config.mining.enabled:  # every rank runs the bank's passes (each one a collective)
            with peft_model.disable_adapter():
                self.miner = self._build_miner(peft_model, model_hash=bank_model_hash)
        return peft_model

    def _build_optimizer(self) -> None:
        config = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        if self.dist is None:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(self.model, self.optimizer, self.scheduler)
        elif self.fsdp:
            # Nothing goes through accelerator.prepare: accelerate's FSDP2 preparation would shard the
            # model its own way (and refuses an optimizer without it); the optimizer holds whole LoRA
            # parameters, exactly as in data parallelism.
            self.dist.broadcast_parameters(params)
        else:
            # No DDP wrapper (crl's truncated, adapter-toggled forwards bypass it; gradients are summed
            # explicitly), and the scheduler is not prepared (accelerate would step it once per process).
            self.optimizer = self.accelerator.prepare(self.optimizer)
            self.dist.broadcast_parameters(params)

    # --- setup ---------------------------------------------------------------------------------

    def _check_output_dir(self) -> None:
        """Refuse an output folder that cannot be a run folder, or whose checkpoints belong to another
        run (without --resume, or under another config). Nothing in the folder changes here (it is
        created when missing): the run folder is only written once the config, the model and the data
        have been checked (`_start_run_folder`)."""
        check_output_folder(self.output_dir, create=self.is_main)
        has_ckpt = bool(list_checkpoints(self.checkpoints_dir))
        if has_ckpt and not self.resume:
            raise ConfigError(
                f"{self.output_dir}: holds checkpoints of an earlier run; pass --resume to continue it "
                "or choose another --output-dir"
            )
        saved_path = self.output_dir / "config.json"
        if has_ckpt and saved_path.is_file():
            # Checkpoints only continue the run that wrote them: another config (target layers,
            # LoRA layers, schedule, data) would load into a different model or optimiser, or
            # silently change the run half-way.
            try:
                saved = json.loads(saved_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{saved_path}: cannot be read ({exc}); the run's config is needed to resume it") from None
            diffs = config_differences(saved, self.config.to_dict())
            if diffs:
                shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
                raise ConfigError(
                    f"{self.output_dir}: its checkpoints were written under another config ({shown}); "
                    "resume with the config it was started with, or choose another --output-dir"
                )

    def _check_layers(self, model: torch.nn.Module) -> None:
        """Every layer the config names exists in the model (checked before the pools are built)."""
        from crl.models import num_hidden_layers

        depth = num_hidden_layers(model)
        cfg = self.config
        states = f"hidden states 1..{depth} (the model has {depth} decoder layers)"
        checks = [("loss.target_layers", cfg.loss.target_layers, depth, states)]
        if cfg.loss.benign_layers is not None:
            checks.append(("loss.benign_layers", cfg.loss.benign_layers, depth, states))
        if cfg.lora.layers is not None:
            checks.append(("lora.layers", cfg.lora.layers, depth - 1, f"decoder layers 0..{depth - 1}"))
        if cfg.refinement.enabled and cfg.refinement.kind != "module":
            checks.append(("refinement.layers", cfg.refinement.layers, depth, states))
        if cfg.refinement.enabled and cfg.refinement.kind == "module" and cfg.refinement.module_layers is not None:
            checks.append(("refinement.module_layers", cfg.refinement.module_layers, depth,
                           f"[low, high) within decoder layers 0..{depth - 1}"))
        for key, layers, highest, expected in checks:
            if any(l > highest for l in layers):
                raise ConfigError(f"{key}: expected {expected}, got {list(layers)}")

    def _load_pools(self):
        from crl.data import load_pools

        pools = self.config.data.pools
        if pools == "demo":
            from crl.data import build_pools, load_demo

            folder = self.output_dir / "pools"
            try:  # a build.json cut short (crl.data.build writes it in place) would stop every rerun
                if (folder / "build.json").is_file():
                    json.loads((folder / "build.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"data.pools: {folder / 'build.json'} is damaged ({exc}); delete {folder} "
                                  "to build the demo pools again") from None
            try:
                with self._on_generation_device(self.base_model):
                    return build_pools(
                        self.base_model, self.tokenizer, load_demo("harmful", "train"), load_demo("benign", "train"),
                        folder, max_new_tokens=self.config.data.generation_max_new_tokens,
                        progress=self.config.run.progress, seed=self.config.run.seed,
                    )
            except ValueError as exc:  # built with other settings
                raise ConfigError(f"data.pools: {exc}") from None
        try:
            return load_pools(Path(pools))
        except (ValueError, FileNotFoundError) as exc:  # a malformed line, a missing field or file
            raise ConfigError(f"data.pools: {exc}") from None

    @contextmanager
    def _on_generation_device(self, model: torch.nn.Module):
        """Generate the demo pools on the training device. Without FSDP the model is there already.
        Under FSDP the whole model exists on rank 0 only, before sharding: it goes to the device for
        the generation and back to the CPU afterwards when the device can hold it (less than 80% of
        its free memory), else it generates on the CPU (slowly: build the pools beforehand with
        `crl data build --device cuda` on one device, or use smaller pools)."""
        device = self.accelerator.device
        current = next(model.parameters()).device
        if current == device or device.type != "cuda" or not self.is_main:  # only rank 0 generates
            yield
            return
        free, _ = torch.cuda.mem_get_info(device)
        need = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        if need > 0.8 * free:
            if self.is_main:
                print(f"crl: the model ({need / 2**30:.1f} GiB) does not fit the free memory of {device} "
                      f"({free / 2**30:.1f} GiB) before sharding: the demo pools are generated on the CPU")
            yield
            return
        model.to(device)
        try:
            yield
        finally:
            model.to(current)
            torch.cuda.empty_cache()

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
        least = self.dist.world_size if self.dist is not None else 1
        streams = {
            "benign": PoolStream(self._encode(pools.benign, "benign"), batch, seed + 1, least),
            "harmful": PoolStream(self._encode(pools.harmful, "harmful"), batch, seed + 2, least),
        }
        if self.config.loss.method != "circuit_breakers":
            streams["retain"] = PoolStream(self._encode(pools.retain, "retain"), batch, seed + 3, least)
        return streams

    def _select_tokens(self, batch) -> torch.Tensor:
        """Token selection of harmful-pool batches (the bank and the refinement use only those)."""
        return token_selection(batch, self.config.loss.resolved_harmful_tokens, self.config.loss.first_response_tokens)

    def _build_miner(self, model: torch.nn.Module, model_hash: str | None = None):
        """The frozen bank of the harmful pool (built once, cached by key) and the miner over it.

        `model` is the frozen model (the base model, or under FSDP the sharded model with its adapter
        disabled, then `model_hash` is the whole base model's fingerprint, read on rank 0 only). Under
        multiple processes every rank calls this: the bank is built in lock-step (see
        `build_or_load_bank`)."""
        from crl.mining import HardNegativeMiner, IndexParams, build_or_load_bank

        cfg = self.config
        mcfg = cfg.mining
        encoded = self.streams["harmful"].encoded
        device = self.accelerator.device
        pad = self.tokenizer.pad_token_id
        selections = []
        for e in encoded:
            single = collate([e], pad)
            selections.append(self._select_tokens(single)[0].tolist())

        def make_batch(indices: list[int]):
            batch = collate([encoded[i] for i in indices], pad).to(device)
            return batch.input_ids, batch.attention_mask, self._select_tokens(batch)

        was_training = model.training
        model.eval()
        amp = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        with amp:
            bank = build_or_load_bank(
                model, encoded, make_batch, selections,
                layers=cfg.loss.captured_layers, pooling=f"mean:{cfg.loss.resolved_harmful_tokens}:{cfg.loss.first_response_tokens}",
                dtype=mcfg.bank_dtype, max_size=mcfg.bank_size,
                root=Path(mcfg.cache_dir).expanduser() if mcfg.cache_dir else None,
                batch_size=mcfg.bank_batch_size, seed=cfg.run.seed, progress=cfg.run.progress and self.is_main,
                model_hash=model_hash, dist=self.dist,
            )
        model.train(was_training)
        if len(set(bank.ids.tolist())) < 2:
            raise ConfigError("mining: the frozen bank needs at least two harmful samples (own samples are excluded)")
        if self.is_main and cfg.run.progress:
            how = "reused" if bank.reused else f"built in {bank.build_seconds:.1f}s"
            print(f"crl: frozen bank {bank.path} ({bank.size} samples x {len(bank.layers)} layers, {how})")
        params = IndexParams(
            metric=mcfg.metric, nlist=mcfg.nlist, nprobe=mcfg.nprobe, hnsw_m=mcfg.hnsw_m,
            hnsw_ef_search=mcfg.hnsw_ef_search, threads=mcfg.threads, auto_native_max_gib=mcfg.auto_native_max_gib,
            seed=cfg.run.seed,
        )
        return HardNegativeMiner(
            bank, benign_layers=cfg.loss.resolved_benign_layers, target_layers=cfg.loss.target_layers,
            k=mcfg.k, backend=mcfg.backend, params=params, queue_size=mcfg.queue_size, seed=cfg.run.seed,
            center=mcfg.center,
        )

    def _build_refiner(self, model: torch.nn.Module):
        from crl.mining.refinement import AdversarialRefiner

        device = self.accelerator.device
        amp = (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
        rcfg = self.config.refinement
        benign = None
        if rcfg.benign_invariance > 0 and rcfg.benign_perturbation == "refusal":
            from crl.mining.refinement import with_response_tokens

            refusal = self.tokenizer(rcfg.refusal_text, add_special_tokens=False)["input_ids"]
            benign = [with_response_tokens(e, refusal) for e in self.streams["benign"].encoded]
        return AdversarialRefiner(
            rcfg, model, self.streams["harmful"].encoded, self.tokenizer.pad_token_id,
            self._select_tokens, seed=self.config.run.seed, device=device, amp=amp, benign_examples=benign,
        )

    def _build_adversary(self, model: torch.nn.Module):
        from crl.mining.adversary import ModuleAdversary

        device = self.accelerator.device
        amp = (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16)) if device.type == "cuda" else None
        return ModuleAdversary(self.config.refinement, model, self.streams["harmful"].encoded,
                               self.tokenizer.pad_token_id, seed=self.config.run.seed, device=device, amp=amp,
                               dist=self.dist)

    # --- the loop ------------------------------------------------------------------------------

    def _next_batches(self, micro: int = 0) -> StepBatches:
        """The next micro-batch of each pool, on the device. Everything the step needs to know about
        it on the host (the token selections as flat row indices, the row counts, under several
        processes those of the global batch) is computed here on the CPU batch, without a device read;
        the tensors then go to the device without blocking copies (pinned memory on a GPU)."""
        pad = self.tokenizer.pad_token_id
        device = self.accelerator.device
        loss_cfg = self.config.loss
        benign, benign_ids = self.streams["benign"].next_batch_with_indices()
        harmful, harmful_ids = self.streams["harmful"].next_batch_with_indices()
        retain_examples = self.streams["retain"].next_batch() if "retain" in self.streams else None
        totals = global_harmful_ids = harmful_shards = whole_retain = None
        if self.dist is not None:  # this rank's slice of each global batch; the global row counts first
            shard = self.dist.shard
            whole = collate(benign + harmful, pad)
            whole_retain = collate(retain_examples, pad) if retain_examples is not None else None
            totals = row_totals(whole, len(benign), contrast_selection(whole, len(benign), loss_cfg), whole_retain)
            global_harmful_ids = torch.tensor(harmful_ids, dtype=torch.int64)
            harmful_shards = self.dist.shard_sizes(len(harmful))
            benign, benign_ids, harmful, harmful_ids = shard(benign), shard(benign_ids), shard(harmful), shard(harmful_ids)
            retain_examples = shard(retain_examples) if retain_examples is not None else None
        contrast = collate(benign + harmful, pad)
        retain = collate(retain_examples, pad) if retain_examples is not None else None
        if retain is not None and whole_retain is not None:
            retain.global_size = len(whole_retain)  # the KL's "batchmean" divides by the global count
        selection = contrast_selection(contrast, len(benign), loss_cfg)
        rows = step_rows(contrast, len(benign), selection, retain, totals)
        return StepBatches(
            contrast=self._to_device(contrast), num_benign=len(benign),
            retain=self._to_device(retain) if retain is not None else None, selection=self._to_device(selection),
            benign_ids=torch.tensor(benign_ids, dtype=torch.int64), harmful_ids=torch.tensor(harmful_ids, dtype=torch.int64),
            step=self.step, micro=micro, rows=rows.to(device, non_blocking=True),
            global_harmful_ids=global_harmful_ids, harmful_shards=harmful_shards,
        )

    def _to_device(self, x):
        """A host tensor or batch on the training device without a blocking copy (pinned on a GPU)."""
        device = self.accelerator.device
        if device.type == "cuda":
            x = x.pin_memory()
        return x.to(device, non_blocking=True)

    def _restore(self) -> None:
        """Continue from the newest complete checkpoint (by step number, verified: see
        crl.training.checkpoint), saying which; newer ones that are damaged are named and passed over."""
        complete, damaged = complete_checkpoints(self.checkpoints_dir)
        path = state = None
        for candidate in complete:
            try:
                # Read onto the CPU: Optimizer.load_state_dict moves the moments to their parameters'
                # devices and leaves Adam's `step` counters where they are, on the CPU as in a fresh run
                # (on a GPU they would cost a device read per parameter at every step of the
                # non-capturable Adam).
                state = read_checkpoint(candidate, device="cpu")
            except Exception as exc:  # noqa: BLE001 - complete on disk, yet unreadable: the one before
                damaged.append((candidate, f"{candidate}: cannot be read ({type(exc).__name__}: {exc})"))
                continue
            path = candidate
            break
        chosen = checkpoint_step(path) if path is not None else 0
        if self.is_main:
            for bad, why in sorted(damaged, key=lambda item: -(checkpoint_step(item[0]) or 0)):
                if (checkpoint_step(bad) or 0) > chosen:
                    print(f"crl: warning: checkpoint {bad.name} is damaged, passed over: {why}", file=sys.stderr)
            where = f"{path} (step {chosen})" if path is not None else "step 0 (no complete checkpoint yet)"
            print(f"crl: resuming {self.output_dir} from {where}", file=sys.stderr)
        if path is not None:
            self._load_checkpoint(path, state)

    def _load_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        unwrapped = self.accelerator.unwrap_model(self.model)
        set_peft_model_state_dict(unwrapped, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        trainer_state = state["trainer_state"]
        for name, stream_state in trainer_state["streams"].items():
            self.streams[name].load_state_dict(stream_state)
        restore_rng_state(state["rng"])
        extra = state.get("extra", {})
        if self.dist is not None:
            from crl.training.distributed import restore_rank_rng

            saved = extra.get("distributed", {}).get("rng", [])
            if not restore_rank_rng(self.dist, saved) and self.dist.rank > 0:
                # written by another number of processes: fresh per-rank streams (only dropout uses them)
                seed_everything(self.config.run.seed + 1_000_003 * self.dist.rank + int(trainer_state["step"]))
        for name, part in (("mining", self.miner), ("refinement", self.refiner or self.adversary)):
            if part is None:
                continue
            if name not in extra:
                raise ConfigError(f"{path}: the checkpoint has no {name} state (was it written with {name} disabled?)")
            part.load_state_dict(extra[name])
        self.step = int(trainer_state["step"])

    def _start_run_folder(self) -> None:
        """Make the run folder agree with the step the run (re)starts from: remove what a killed run
        left (temporary folders and files) and the checkpoints after that step (damaged ones: the
        complete ones were taken), record the config, and drop the metrics of later steps."""
        if self.is_main:
            remove_orphans(self.output_dir)
            for path in list_checkpoints(self.checkpoints_dir):
                if (checkpoint_step(path) or 0) > self.step:
                    shutil.rmtree(path, ignore_errors=True)
            atomic_write_json(self.output_dir / "config.json", self.config.to_dict())
            truncate_metrics(self.metrics_path, self.step)
        self.accelerator.wait_for_everyone()

    def _read_metrics(self, micro_values: list[dict], grad_norm: Any) -> tuple[list[dict[str, float]], list[float | None]]:
        """Host floats of the step's metrics (per micro-batch, global under several processes) and of
        the gradient norm: one device read (crl.training.metrics)."""
        if self.dist is None:
            return read_values(micro_values, [grad_norm])
        per_rank, extras = self.dist.gather_metrics(micro_values, [grad_norm])
        additive = self.config.loss.method == "crl"
        per_micro = [reduce_over_ranks([rank[m] for rank in per_rank], additive=additive) for m in range(len(micro_values))]
        return per_micro, extras

    def _checkpoint(self) -> None:
        ranks_rng = None
        if self.dist is not None:  # a collective: every rank takes part
            from crl.training.distributed import rng_states_plain

            ranks_rng = rng_states_plain(self.dist)
        if self.fsdp:  # rank 0's state_dict() below must not leave FSDP's state differing across ranks
            self.dist.reshard(self.model)
        if not self.is_main:
            return
        from peft import get_peft_model_state_dict

        unwrapped = self.accelerator.unwrap_model(self.model)
        extra = {}
        if self.miner is not None:
            extra["mining"] = self.miner.state_dict()
        if self.refiner is not None or self.adversary is not None:
            extra["refinement"] = (self.refiner or self.adversary).state_dict()
        if ranks_rng is not None:
            extra["distributed"] = {"world_size": len(ranks_rng), "rng": ranks_rng}
        write_checkpoint(
            self.checkpoints_dir, self.step,
            adapter=get_peft_model_state_dict(unwrapped),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            trainer_state={"step": self.step, "streams": {n: s.state_dict() for n, s in self.streams.items()}},
            keep=self.config.run.keep_checkpoints,
            extra=extra,
        )

    def train(self, max_steps: int | None = None) -> TrainResult:
        """Run until `max_steps` optimizer steps (default: optim.max_steps) are done."""
        if self.resume:
            self._restore()
        self._start_run_folder()
        total = self.config.optim.max_steps
        stop_at = min(total, max_steps) if max_steps is not None else total
        grad_accum = self.config.optim.grad_accumulation
        bar = None
        if self.config.run.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=stop_at, initial=self.step, desc=f"train {self.config.loss.method}", unit="step")
        metrics: dict[str, float] = {}
        self.model.train()
        clock = self.loss.clock
        while self.step < stop_at:
            started = clock()
            progress = self.step / total
            micro_values = []
            for micro in range(grad_accum):
                batches = self._next_batches(micro)
                out = self.loss(batches, progress)
                self.accelerator.backward(out.loss / grad_accum)
                micro_values.append(out.values)  # device tensors, read once below
            t_opt = clock()
            if self.dist is not None:  # the sum of the ranks' shares is the global batch's gradient
                self.dist.all_reduce_gradients([p for p in self.model.parameters() if p.requires_grad])
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            if self.fsdp:  # whole LoRA tensors, already summed: plain clipping (accelerate's FSDP branch expects its own model)
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, self.config.optim.max_grad_norm)
            else:
                grad_norm = self.accelerator.clip_grad_norm_(trainable, self.config.optim.max_grad_norm)
            seconds_optimizer = clock() - t_opt
            # The one host synchronisation of the step: every micro-batch's metrics and the gradient
            # norm in one device read (after one all-gather under several processes), before the
            # update, so that a non-finite loss or gradient never reaches the weights.
            per_micro, (grad_norm_value,) = self._read_metrics(micro_values, grad_norm)
            values = average_micro_batches(per_micro, grad_accum)
            nonfinite = nonfinite_metrics(values, grad_norm_value)
            if nonfinite:
                self._nonfinite(nonfinite, values, grad_norm_value, bar)
            t_update = clock()
            lr = self.scheduler.get_last_lr()[0]
            if not nonfinite:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            metrics = {"step": self.step, **values, "lr": lr, "grad_norm": grad_norm_value}
            if nonfinite:  # skipped: the values as JSON can hold them (null), and which ones they were
                metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
                metrics["nonfinite"] = nonfinite
            metrics["seconds_optimizer"] = seconds_optimizer + clock() - t_update
            metrics["seconds_per_step"] = clock() - started
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
        if self.fsdp and self.step >= total:  # on every rank, before rank 0 reads the adapter
            self.dist.reshard(self.model)
        if self.step >= total and self.is_main:
            self._finish()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.output_dir, self.step, metrics, self.skipped_steps)

    def _nonfinite(self, names: list[str], values: dict[str, float], grad_norm: float | None, bar: Any) -> None:
        """A step with a non-finite loss or gradient norm (its update not applied yet): stop the run
        (TrainingDiverged) or, with optim.on_nonfinite = "skip", count it and let the loop drop it."""
        step = self.step + 1
        shown = ", ".join(f"{k} = {grad_norm if k == 'grad_norm' else values[k]}" for k in names)
        if self.config.optim.on_nonfinite == "skip":
            self.skipped_steps += 1
            if self.is_main:
                print(f"crl: warning: step {step}: {shown}; its update is skipped (optim.on_nonfinite = \"skip\")",
                      file=sys.stderr)
            return
        if bar is not None:
            bar.close()
        last = list_checkpoints(self.checkpoints_dir)
        kept = f"{last[-1]} holds the last good state" if last else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"step {step}: {shown} (not finite); the run stopped before applying this update ({kept}). "
            "Lower optim.lr or the loss weights and resume with --resume, or set optim.on_nonfinite = \"skip\""
        )

    def _finish(self) -> None:
        """Write the adapter in peft format (into a temporary folder renamed into place: a kill never
        leaves a partial adapter/), and a model card."""
        from crl.training.export import write_model_card

        unwrapped = self.accelerator.unwrap_model(self.model)
        with atomic_directory(self.output_dir / "adapter") as tmp:
            unwrapped.save_pretrained(str(tmp))
        write_model_card(self.output_dir, self.config)


def shutdown_distributed(*, synchronise: bool = False) -> None:
    """Tear down the process group once a multi-process run is over: left to interpreter exit, gloo's
    threads can abort the process ("terminate called without an active exception"). After a run that
    ended well, `synchronise` first waits for every rank, so that no rank closes its connections while
    another still talks over them (the same abort, seen now and then without the barrier); after a
    failure there is no barrier, since the other ranks may be gone."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        if synchronise:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


#: Config keys that may change between a run and its resumption: they do not touch the training state.
RESUMABLE_CHANGES = frozenset({"run.progress", "run.checkpoint_every", "run.keep_checkpoints", "optim.on_nonfinite"})


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps 1..`step` (the last line of each, in step order) and drop the rest:
    later steps (logged after the checkpoint the run resumes from: they will be logged again), lines
    that do not parse (one cut short by a kill or a full disk) and repeated steps."""
    if not path.exists():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    by_step: dict[int, str] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        number = record.get("step") if isinstance(record, dict) else None
        if isinstance(number, int) and 1 <= number <= step:
            by_step[number] = line
    kept = "".join(by_step[n] + "\n" for n in sorted(by_step))
    if kept != text:
        atomic_write_text(path, kept)


def config_differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """The dotted keys where two resolved configs (`TrainConfig.to_dict()`) differ, as
    "key: SAVED there, CURRENT here", except RESUMABLE_CHANGES."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if name in RESUMABLE_CHANGES:
                continue
            if key not in saved or key not in current:
                out.append(f"{name}: {'absent' if key not in saved else json.dumps(saved[key])} there, "
                           f"{'absent' if key not in current else json.dumps(current[key])} here")
                continue
            out.extend(config_differences(saved[key], current[key], name))
        return out
    if saved != current:
        return [f"{prefix}: {json.dumps(saved)} there, {json.dumps(current)} here"]
    return []


def train(config: TrainConfig, output_dir: str | Path, *, resume: bool = False, max_steps: int | None = None) -> TrainResult:
    try:
        result = Trainer(config, output_dir, resume=resume).train(max_steps=max_steps)
    except BaseException:
        shutdown_distributed()
        raise
    shutdown_distributed(synchronise=True)
    return result
