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
  count;
* the LoRA gradients are then SUMMED across ranks (`all_reduce_gradients`) after the accumulation
  and before clipping.

Why not DDP's reducer: crl's forwards do not go through a DDP wrapper. The hidden-state passes are
truncated by forward hooks that raise after the last loss layer, and the frozen pass runs the same
module with its adapter disabled (`disable_adapter`), so they call the unwrapped PeftModel; DDP's
reducer would see neither a forward it prepared nor every parameter used. The model is therefore not
wrapped (no `DistributedDataParallel`), its trainable parameters are broadcast from rank 0 once, and
gradients are reduced explicitly in one flat all-reduce per optimizer step.

Metrics are reduced inside `LossComputer` (`reduce_metrics`) so that the values every rank holds,
and the main rank logs, are the global ones.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from crl.config import ConfigError
from crl.losses.objectives import LayerFrame
from crl.losses.triplet import TripletOutput

# Metric keys of the crl method that are additive partials (global value = sum over ranks).
_ADDITIVE_PREFIXES = ("loss", "active_", "benign_d_", "harmful_d_")


def _dist():
    import torch.distributed as dist

    return dist


class DistributedContext:
    """Rank, world size and the collectives the trainer and the loss need (one per process)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)

    @classmethod
    def from_accelerator(cls, accelerator: Any) -> "DistributedContext | None":
        """The context of a multi-process run, or None for a single process (unchanged code path)."""
        if accelerator.num_processes <= 1:
            return None
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind not in (
            DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.MULTI_NPU,
            DistributedType.MULTI_XPU, DistributedType.MULTI_MLU, DistributedType.MULTI_MUSA,
            DistributedType.MULTI_HPU, DistributedType.MULTI_SDAA,
        ):
            raise ConfigError(
                f"accelerate: distributed type {kind} is not supported by crl's trainer; use plain data "
                "parallelism (`accelerate launch --multi_gpu` or `--cpu`, no FSDP/DeepSpeed plugin). "
                "See docs/distributed.md (FSDP)."
            )
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device)

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

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous slice of a global batch (sizes differ by at most one when the batch
        does not divide; concatenating the slices in rank order gives the batch back)."""
        n = len(items)
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        stop = start + base + (1 if self.rank < extra else 0)
        return list(items[start:stop])

    # --- collectives ---------------------------------------------------------------------------

    def total(self, value: float) -> float:
        """Sum of a number over ranks."""
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        _dist().all_reduce(t)
        return float(t.item())

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no autograd)."""
        _dist().all_reduce(tensor)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        _dist().all_gather_object(out, obj)
        return out

    def all_gather_cat(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's tensor along `dim` in rank order (sizes along `dim` may differ)."""
        parts = self.all_gather_object(tensor.detach().cpu())
        return torch.cat(parts, dim=dim).to(tensor.device)

    # --- the loss pieces -----------------------------------------------------------------------

    def fit_frame(self, frozen: torch.Tensor, *, center: bool, scale: bool) -> LayerFrame:
        """`LayerFrame.fit` over the frozen rows [L, R, d] of the global batch."""
        with torch.no_grad():
            x = frozen.float()
            count = self.total(x.shape[1])
            mean = None
            if center and count > 0:
                mean = self.sum_(x.sum(dim=1)) / count
            spread = None
            if scale:
                centred = x - mean[:, None, :] if mean is not None else x
                spread = (self.sum_(centred.norm(dim=-1).sum(dim=-1)) / max(count, 1.0)).clamp_min(1e-6)
        return LayerFrame(mean, spread)

    def global_row_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over the rows (dim 1) of [L, R, d] across ranks, differentiable: the backward of the
        all-reduce sums every rank's gradient of the mean into each rank's rows."""
        from torch.distributed.nn.functional import all_reduce

        count = self.total(x.shape[1])
        summed = all_reduce(x.float().sum(dim=1))
        return summed / max(count, 1.0)

    def has_rows(self, rows: int) -> bool:
        """Whether any rank has rows (branches must be global: every rank runs the same collectives)."""
        return self.total(rows) > 0

    def shard_triplet(self, out: TripletOutput, rows: int) -> TripletOutput:
        """A triplet output whose loss and statistics are means over `rows` local rows, as this rank's
        share of the global means: value * rows / global rows (their sum over ranks is the global mean)."""
        total = self.total(rows)
        f = rows / total if total > 0 else 0.0
        return TripletOutput(
            out.loss * f, out.active_fraction * f, out.mean_positive_distance * f, out.mean_negative_distance * f
        )

    def shard_mean(self, value: torch.Tensor, count: int) -> torch.Tensor:
        """Same as `shard_triplet` for a scalar mean over `count` local items."""
        total = self.total(count)
        return value * (count / total if total > 0 else 0.0)

    def reduce_metrics(self, metrics: dict[str, float], *, additive: bool) -> dict[str, float]:
        """The global metrics of one micro-batch, identical on every rank.

        `additive` (method crl): loss/active/distance keys are this rank's partial sums and are summed;
        otherwise they are local means and are averaged over ranks. `seconds_*`: the slowest rank;
        `coef_*`: equal on every rank; anything else (mining statistics): the mean over the ranks that
        logged it."""
        gathered = self.all_gather_object(dict(metrics))
        keys: list[str] = []
        for m in gathered:
            keys.extend(k for k in m if k not in keys)
        out: dict[str, float] = {}
        for key in keys:
            values = [float(m[key]) for m in gathered if key in m]
            if key.startswith("seconds_"):
                out[key] = max(values)
            elif key.startswith("coef_"):
                out[key] = values[0]
            elif additive and key.startswith(_ADDITIVE_PREFIXES):
                out[key] = sum(values)
            else:
                out[key] = sum(values) / len(values)
        return out

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
    from crl.training.checkpoint import _numpy_state_to_plain, rng_state

    state = rng_state()
    state["numpy"] = _numpy_state_to_plain(state["numpy"])
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


__all__ = ["DistributedContext", "restore_rank_rng", "rng_states_plain"]
