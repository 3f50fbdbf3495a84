"""Multi-process (data-parallel) training under `accelerate launch` / torchrun: see docs/distributed.md.

Semantics: `data.batch_size` is the GLOBAL micro-batch of each pool. Every rank runs the same
samplers (same seeds), so every rank sees the same sequence of global batches as a single process
would, and takes one contiguous slice of each (`shard`). The loss of the default method (`crl`) is
then computed so that the sum over ranks of each rank's loss equals the single-process loss of the
global batch, term by term:

* the layer frame (centre and scale of the frozen states) is fitted on global sums and counts;
* the harmful centroid is the global mean: the per-rank sums are all-reduced with autograd
  (`torch.distributed.nn.functional.all_reduce`), so each rank's gradient reaches every rank's
  harmful rows through it;
* each mean over rows (triplet terms) or tokens (retain KL) is a local sum divided by the global
  count. Every rank holds the global batch before taking its slice, so the trainer counts the
  global rows of each set on the host (`crl.losses.objectives.RowIndex.total`): no collective and no
  device read is needed for them;
* the LoRA gradients are then SUMMED across ranks (`all_reduce_gradients`) after the accumulation
  and before clipping.

Why not DDP's reducer: crl's forwards do not go through a DDP wrapper. The hidden-state passes are
truncated (only the decoder layers up to the last loss layer run), and the frozen pass runs the same
module with its adapter disabled (`disable_adapter`), so they call the unwrapped PeftModel; DDP's
reducer would see neither a forward it prepared nor every parameter used. The model is therefore not
wrapped (no `DistributedDataParallel`), its trainable parameters are broadcast from rank 0 once, and
gradients are reduced explicitly in one flat all-reduce per optimizer step.

FSDP (`accelerate launch` with an FSDP config, `fsdp_version: 2`; see `FsdpSettings`): the frozen base
weights are sharded with FSDP2 (`fully_shard` per decoder layer, then the rest of the model as the
root), gathered layer by layer for each pass; the LoRA parameters are left out of the sharding
(`ignored_params`): they stay whole on every rank and everything above applies to them unchanged
(broadcast once, gradients summed explicitly, plain optimizer, full checkpoints).

Metrics stay on the device until the end of each optimizer step; then one all-gather of one float64
tensor (`gather_metrics`) and one read give every rank the global values, which the main rank logs
(see crl.training.metrics). Per optimizer step the loss path issues no host synchronisation of its
own; the collectives it needs are tensor collectives queued on the device (the centroid's and the
frame's all-reduces, with mining the gather of the batch's pooled harmful states, and the gradient
all-reduce). With refinement, the global hardest owners are gathered as Python objects (host data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from crl.config import ConfigError
from crl.losses.objectives import LayerFrame
from crl.losses.triplet import TripletOutput
from crl.training.metrics import Value, keys_checksum, metric_keys

MAX_METRIC_KEYS = 256
"""Slots per micro-batch in `gather_metrics`' tensor (a fixed size: every rank's tensor must have the
same size whatever it logged, or the all-gather would not match up)."""


def _dist():
    import torch.distributed as dist

    return dist


def _env_flag(env: Mapping[str, str], name: str, field: str) -> bool:
    value = env.get(name, "false").strip().lower()
    if value in ("y", "yes", "t", "true", "on", "1"):  # accelerate's str_to_bool
        return True
    if value in ("n", "no", "f", "false", "off", "0", ""):
        return False
    raise ConfigError(f"accelerate config: {field} = {value!r} ({name}); expected true or false")


@dataclass(frozen=True)
class FsdpSettings:
    """What crl takes from an accelerate FSDP configuration, read from the environment that
    `accelerate launch --config_file ...` (or `--use_fsdp ...`) sets for every process.

    crl applies FSDP2 itself (`DistributedContext.shard_model`): one `fully_shard` group per decoder
    layer plus the root, LoRA parameters left whole. Of accelerate's FSDP options it uses
    `fsdp_version` (must be 2) and `fsdp_reshard_after_forward`; it refuses the ones it would otherwise
    silently ignore or that would break loading (`fsdp_offload_params`, `fsdp_activation_checkpointing`,
    `fsdp_cpu_ram_efficient_loading`); the wrap policy, state dict type and prefetch options do not
    apply (crl wraps per decoder layer and writes its own checkpoints). Reading the environment rather than accelerate's plugin object makes the CPU
    path (accelerate treats FSDP on CPU as plain multi-CPU) the same as the GPU one."""

    reshard_after_forward: bool = True
    """Free each decoder layer's gathered weights after its forward (gathered again for backward):
    the memory saving FSDP is for. False keeps them until the backward (ZeRO-2-like)."""

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> "FsdpSettings | None":
        """The settings of an FSDP launch, or None when FSDP is not configured."""
        env = os.environ if env is None else env
        if not _env_flag(env, "ACCELERATE_USE_FSDP", "distributed_type FSDP"):
            return None
        version = env.get("FSDP_VERSION", "1").strip()
        if version != "2":
            raise ConfigError(
                f"accelerate config: fsdp_version = {version}; crl shards with FSDP2 (fully_shard): set "
                "fsdp_version: 2 in fsdp_config (see configs/accelerate/fsdp2.yaml)"
            )
        # Options crl would otherwise ignore silently. With cpu_ram_efficient_loading, transformers loads
        # empty (meta) weights on every rank but the first, for accelerate's model preparation to fill.
        for name, field in (("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
                            ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing"),
                            ("FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_cpu_ram_efficient_loading")):
            if _env_flag(env, name, field):
                raise ConfigError(f"accelerate config: {field} = true is not supported by crl's FSDP path; set it to false")
        reshard = _env_flag(env, "FSDP_RESHARD_AFTER_FORWARD", "fsdp_reshard_after_forward") \
            if "FSDP_RESHARD_AFTER_FORWARD" in env else True
        return cls(reshard_after_forward=reshard)


class DistributedContext:
    """Rank, world size and the collectives the trainer and the loss need (one per process)."""

    def __init__(self, rank: int, world_size: int, device: torch.device, fsdp: FsdpSettings | None = None) -> None:
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.fsdp = fsdp
        """FSDP settings when the base weights are sharded (`shard_model`), else None (data parallel)."""

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> "DistributedContext | None":
        """The context of a multi-process run, or None for a single process (unchanged code path)."""
        if accelerator.num_processes <= 1:
            return None
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        fsdp = FsdpSettings.from_environment()
        if fsdp is None and kind == DistributedType.FSDP:  # a plugin without the environment: not crl's CLI
            raise ConfigError("accelerate: FSDP is configured without ACCELERATE_USE_FSDP in the environment; "
                              "launch with `accelerate launch --config_file <fsdp config>`")
        if kind != DistributedType.FSDP and kind not in (
            DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.MULTI_NPU,
            DistributedType.MULTI_XPU, DistributedType.MULTI_MLU, DistributedType.MULTI_MUSA,
            DistributedType.MULTI_HPU, DistributedType.MULTI_SDAA,
        ):
            raise ConfigError(
                f"accelerate: distributed type {kind} is not supported by crl's trainer; use data "
                "parallelism (`accelerate launch --multi_gpu` or `--cpu`) or FSDP2 (`--config_file "
                "configs/accelerate/fsdp2.yaml`), not DeepSpeed. See docs/distributed.md."
            )
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device, fsdp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- data ----------------------------------------------------------------------------------

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ConfigError(
                f"data.batch_size = {batch_size} is the global micro-batch of each pool and must be a multiple "
                f"of the number of processes ({self.world_size})"
            )

    def shard_bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of a rank's slice of a global batch of `n` items (this rank's by default)."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(n, self.world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def shard_sizes(self, n: int) -> list[int]:
        """Every rank's slice size of a global batch of `n` items, in rank order."""
        return [stop - start for start, stop in (self.shard_bounds(n, r) for r in range(self.world_size))]

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous slice of a global batch (sizes differ by at most one when the batch
        does not divide; concatenating the slices in rank order gives the batch back)."""
        start, stop = self.shard_bounds(len(items))
        return list(items[start:stop])

    # --- collectives ---------------------------------------------------------------------------

    def total(self, value: float) -> float:
        """Sum of a number over ranks (a collective and a device read: not for the training step)."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        _dist().all_reduce(t)
        return float(t.item())

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no autograd)."""
        _dist().all_reduce(tensor)
        return tensor

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place minimum over ranks (no autograd)."""
        _dist().all_reduce(tensor, op=_dist().ReduceOp.MIN)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        _dist().all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s object, on every rank (the others pass anything, e.g. None)."""
        box = [obj]
        _dist().broadcast_object_list(box, src=src)
        return box[0]

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's object, in rank order, on rank `dst` (None on the others)."""
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        _dist().gather_object(obj, out, dst=dst)
        return out

    def all_gather_cat(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's tensor along `dim` in rank order (sizes along `dim` may differ;
        through Python objects: host data)."""
        parts = self.all_gather_object(tensor.detach().cpu())
        return torch.cat(parts, dim=dim).to(tensor.device)

    def all_gather_rows(self, tensor: torch.Tensor, sizes: Sequence[int], dim: int) -> torch.Tensor:
        """Concatenate every rank's tensor along `dim` in rank order, where rank r's has `sizes[r]`
        entries there (known on every rank): padded to the largest, one tensor all-gather on the
        device, no host synchronisation. No autograd."""
        sizes = [int(n) for n in sizes]
        if tensor.shape[dim] != sizes[self.rank]:
            raise ValueError(f"all_gather_rows: this rank's tensor has {tensor.shape[dim]} entries along dim {dim}, "
                             f"expected {sizes[self.rank]}")
        width = max(sizes)
        x = tensor.detach()
        if x.shape[dim] < width:
            pad = list(x.shape)
            pad[dim] = width - x.shape[dim]
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        _dist().all_gather(parts, x.contiguous())
        return torch.cat([part.narrow(dim, 0, n) for part, n in zip(parts, sizes)], dim=dim)

    # --- the loss pieces -----------------------------------------------------------------------
    # `total`: the number of rows of the global batch, counted on the host by the trainer
    # (crl.losses.objectives.RowIndex.total).

    def fit_frame(self, frozen: torch.Tensor, total: int, *, center: bool, scale: bool) -> LayerFrame:
        """`LayerFrame.fit` over the frozen rows [L, R, d] of the global batch (`total` rows)."""
        with torch.no_grad():
            x = frozen.float()
            mean = None
            if center and total > 0:
                mean = self.sum_(x.sum(dim=1)) / total
            spread = None
            if scale:
                centred = x - mean[:, None, :] if mean is not None else x
                spread = (self.sum_(centred.norm(dim=-1).sum(dim=-1)) / max(total, 1)).clamp_min(1e-6)
        return LayerFrame(mean, spread)

    def global_row_mean(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Mean over the rows (dim 1) of [L, R, d] across ranks (`total` rows in all), differentiable:
        the backward of the all-reduce sums every rank's gradient of the mean into each rank's rows."""
        from torch.distributed.nn.functional import all_reduce

        summed = all_reduce(x.float().sum(dim=1))
        return summed / max(total, 1)

    @staticmethod
    def shard_triplet(out: TripletOutput, rows: int, total: int) -> TripletOutput:
        """A triplet output whose loss and statistics are means over `rows` local rows, as this rank's
        share of the global means over `total` rows: value * rows / total (their sum over ranks is the
        global mean)."""
        f = rows / total if total > 0 else 0.0
        return TripletOutput(
            out.loss * f, out.active_fraction * f, out.mean_positive_distance * f, out.mean_negative_distance * f
        )

    @staticmethod
    def shard_mean(value: torch.Tensor, count: int, total: int) -> torch.Tensor:
        """Same as `shard_triplet` for a scalar mean over `count` local items (`total` in all)."""
        return value * (count / total if total > 0 else 0.0)

    def gather_metrics(
        self, micros: Sequence[dict[str, Value]], extra: Sequence[Value] = ()
    ) -> tuple[list[list[dict[str, float]]], list[float | None]]:
        """Every rank's metric values of an optimizer step's micro-batches, as host floats
        ([rank][micro] -> {key: value}, None-valued keys left out), and this rank's `extra` values, with
        one all-gather of one float64 tensor and one device read (crl.training.metrics).

        Every rank must emit the same keys (None where a value does not apply); a rank that did not is
        reported on every rank by a RuntimeError."""
        keys = metric_keys(micros)
        if len(keys) > MAX_METRIC_KEYS:
            raise RuntimeError(f"metrics: {len(keys)} keys per optimizer step; at most {MAX_METRIC_KEYS} fit "
                               "gather_metrics' tensor (raise MAX_METRIC_KEYS)")
        slots = 2 * MAX_METRIC_KEYS
        width = 2 + len(micros) * slots
        host = torch.zeros(width, dtype=torch.float64)
        host[0], host[1] = float(len(keys)), float(keys_checksum(keys))
        positions: list[int] = []
        tensors: list[torch.Tensor] = []
        for m, values in enumerate(micros):
            for k, key in enumerate(keys):
                v = values.get(key)
                if v is None:
                    continue  # not logged here: presence flag 0
                base = 2 + m * slots + 2 * k
                host[base + 1] = 1.0
                if isinstance(v, torch.Tensor):
                    positions.append(base)
                    tensors.append(v)
                else:
                    host[base] = float(v)
        payload = self._to_device(host)
        if tensors:
            index = self._to_device(torch.tensor(positions, dtype=torch.int64))
            payload.index_copy_(0, index, torch.stack([t.detach().reshape(()).to(payload.device, torch.float64)
                                                       for t in tensors]))
        parts = [torch.empty_like(payload) for _ in range(self.world_size)]
        _dist().all_gather(parts, payload)
        extra_tensors = [v.detach().reshape(()).to(payload.device, torch.float64) for v in extra if isinstance(v, torch.Tensor)]
        numbers = torch.cat(parts + ([torch.stack(extra_tensors)] if extra_tensors else [])).tolist()  # the one read
        checksum = keys_checksum(keys)
        per_rank: list[list[dict[str, float]]] = []
        for r in range(self.world_size):
            row = numbers[r * width : (r + 1) * width]
            if (int(row[0]), int(row[1])) != (len(keys), checksum):
                raise RuntimeError(
                    f"metrics: process {r} logged other metric keys than process {self.rank} ({int(row[0])} keys, "
                    f"checksum {int(row[1])}; here {len(keys)} keys, checksum {checksum}: {', '.join(keys)}); every "
                    "process must emit the same keys in the same order (None where a value does not apply)"
                )
            per_micro = []
            for m in range(len(micros)):
                base = 2 + m * slots
                per_micro.append({key: row[base + 2 * k] for k, key in enumerate(keys) if row[base + 2 * k + 1] == 1.0})
            per_rank.append(per_micro)
        tail = iter(numbers[self.world_size * width :])
        extras = [next(tail) if isinstance(v, torch.Tensor) else (None if v is None else float(v)) for v in extra]
        return per_rank, extras

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor on this rank's device without a blocking copy (pinned on a GPU)."""
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    # --- FSDP ---------------------------------------------------------------------------------

    def shard_model(self, model: torch.nn.Module) -> None:
        """FSDP2: shard `model`'s frozen weights across the ranks, in place, and put it on the device.

        One `fully_shard` group per decoder layer (all-gathered just before the layer runs, freed after
        it when `reshard_after_forward`), then the root group (embeddings, final norm, LM head, which
        share a tied weight on many models). The trainable (LoRA) parameters are `ignored_params`: they
        stay whole on every rank, so the data-parallel code (broadcast, summed gradients, optimizer,
        checkpoints) applies to them unchanged, and FSDP never reduces a gradient (it averages in its
        reduce-scatter, while crl's per-rank losses are shares to be summed). Call it before the
        optimizer is built."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from crl.models import decoder_layers, fsdp_lazy_init

        if self.fsdp is None:
            raise RuntimeError("shard_model: this run is not configured for FSDP")
        trainable = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():  # ignored parameters are not moved by fully_shard
            for p in trainable:
                p.data = p.data.to(self.device)
        ignored = set(trainable)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.fsdp.reshard_after_forward, ignored_params=ignored)
        # The root keeps its weights gathered after the forward: crl applies the LM head to the selected
        # tokens outside the model's forward (LossComputer's retain KL), which needs the whole weight.
        fully_shard(model, mesh=mesh, reshard_after_forward=False, ignored_params=ignored)
        fsdp_lazy_init(model)  # before a truncated pass hides decoder layers from FSDP's first walk

    @staticmethod
    def reshard(model: torch.nn.Module) -> None:
        """Free every gathered FSDP weight of `model` (local, no communication). Call it on every rank
        before a rank-0-only `state_dict()`: FSDP's state-dict hook reshards the calling rank only,
        and a rank whose root is sharded joins an all-gather at the next forward that the others skip."""
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def frozen_fraction_held(self, model: torch.nn.Module) -> float:
        """Share of the frozen parameters' elements that this rank holds (about 1 / world size when
        they are sharded; for tests)."""
        from torch.distributed.tensor import DTensor

        if self.fsdp is not None:
            self.reshard(model)  # gathered weights are registered in place of the shards
        total = local = 0
        for p in model.parameters():
            if p.requires_grad:
                continue
            total += p.numel()
            local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        return local / max(total, 1)

    # --- parameters and gradients --------------------------------------------------------------

    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Make every rank start from rank 0's values (e.g. freshly initialised LoRA weights)."""
        with torch.no_grad():
            for p in params:
                _dist().broadcast(p.data, src=0)

    def all_reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the gradients over ranks (one flat all-reduce); a missing gradient counts as zero."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        _dist().all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def parameters_equal(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether every rank holds the same values (checked on rank 0's copy; for tests)."""
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        ref = flat.clone()
        _dist().broadcast(ref, src=0)
        return bool(self.total(float((flat - ref).abs().max())) == 0.0)


def rng_states_plain(ctx: DistributedContext) -> list[Any]:
    """Every rank's RNG state (for the checkpoint), in a form `write_checkpoint` can store."""
    from crl.training.checkpoint import numpy_state_to_plain, rng_state

    state = rng_state()
    state["numpy"] = numpy_state_to_plain(state["numpy"])
    return ctx.all_gather_object(state)


def restore_rank_rng(ctx: DistributedContext, states: list[Any]) -> bool:
    """Restore this rank's RNG state from `rng_states_plain`'s list; False when the checkpoint was
    written with another number of processes (the caller keeps the main RNG state then)."""
    import numpy as np

    from crl.training.checkpoint import restore_rng_state

    if len(states) != ctx.world_size:
        return False
    state = dict(states[ctx.rank])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    restore_rng_state(state)
    return True


__all__ = ["DistributedContext", "FsdpSettings", "restore_rank_rng", "rng_states_plain"]
