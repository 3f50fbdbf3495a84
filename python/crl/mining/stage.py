"""The mining stage of a training step: pooled queries in, hard negatives and attacked samples out.

`MiningStage.run` pools the trained model's states of the micro-batch per sample, searches the
frozen bank (and the queue of recent trained-model vectors) on the host, optionally attacks the
owners of the hardest negatives (crl.mining.refinement), and refreshes the queue. The loss gets a
`MinedBatch`; it does not know how its negatives were found.

Host round trips: one device-to-host copy of the pooled queries of both searches (and, under several
processes, of the global batch's pooled harmful states for the queue, gathered on the device first);
with refinement, one more for the attacked samples' queries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from crl.losses.objectives import LayerFrame, LayerRows, pooled_by_sample, select_rows, take_layers
from crl.mining.miner import MINING_STAT_KEYS, HardNegativeMiner, Mined, MiningStats

if TYPE_CHECKING:
    from crl.mining.refinement import AdversarialRefiner
    from crl.training.distributed import DistributedContext
    from crl.training.step import StepBatches


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Float32 host copies of several device tensors with one device-to-host copy (one synchronisation
    on a GPU instead of one per tensor)."""
    if not tensors:
        return []
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors]).cpu()
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[offset : offset + n].view(t.shape))
        offset += n
    return out


@dataclass
class MinedBatch:
    """What mining found for one micro-batch."""

    benign: Mined
    """The benign samples' negatives (harmful bank vectors most similar to them), per benign layer."""
    benign_rows: torch.Tensor
    """[R_b] the benign sample of each selected benign row."""
    harmful: Mined
    """The harmful samples' negatives (the frozen bank's most similar other harmful samples), per
    target layer; attacked samples' negatives follow the clean ones."""
    harmful_rows: torch.Tensor
    """[R_h] the sample (index into `harmful`) of each harmful anchor row, attacked rows last."""
    attacked: tuple[LayerRows, LayerRows] | None = None
    """(frozen, trained) states of the attacked samples' selected tokens, at every captured layer:
    extra harmful anchors (None: no attack this micro-batch, or not this process's to use)."""
    attacked_rows: int = 0
    """The number of attacked rows in the global loss (the main process's)."""
    unused_attacked: dict[int, torch.Tensor] | None = None
    """Several processes, other than the main one: the attacked states this process computed but
    does not use; they join the loss with weight 0 so that every process runs the same backward."""
    refined: bool = False
    """Whether the refiner attacked at this micro-batch (on every process alike)."""


def per_sample_negatives(mined: Mined, row_sample: torch.Tensor, frame: LayerFrame,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample negatives [L * S, k, d] (entry l * S + s; in the loss's layer frame) and the
    row -> entry index [L * R]. Never broadcast to rows. The negatives (host memory) go to the
    device without a blocking copy."""
    negatives = mined.negatives
    if device.type == "cuda":
        negatives = negatives.pin_memory()
    negatives = frame.apply(negatives.to(device, non_blocking=True))  # [L, S, k, d]
    num_layers, num_samples = negatives.shape[0], negatives.shape[1]
    negatives = negatives.reshape(num_layers * num_samples, *negatives.shape[2:])
    rows = row_sample
    index = (torch.arange(num_layers, device=rows.device)[:, None] * num_samples + rows[None, :]).reshape(-1)
    return negatives, index


class MiningStage:
    """Mining (and refinement) for the training step; one per run."""

    def __init__(self, miner: HardNegativeMiner, *, layers: list[int], benign_layers: list[int],
                 target_layers: list[int], refiner: AdversarialRefiner | None = None,
                 dist: DistributedContext | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.miner = miner
        self.refiner = refiner
        self.dist = dist
        self.layers = list(layers)
        """The captured layers (the states' first dimension)."""
        self.benign_idx = [self.layers.index(l) for l in benign_layers]
        self.target_idx = [self.layers.index(l) for l in target_layers]
        self.clock = clock

    def run(self, model: torch.nn.Module, trained_benign: LayerRows, trained_harmful: LayerRows,
            batches: StepBatches, metrics: dict[str, Any]) -> MinedBatch:
        """Mine the negatives of this micro-batch (and attack, when the refiner says so); refresh the
        queue. `trained_*`: the trained model's selected rows at every captured layer."""
        nb = batches.num_benign
        nh = int(batches.contrast.input_ids.shape[0]) - nb
        benign_ids = batches.benign_ids if batches.benign_ids is not None else torch.arange(nb)
        harmful_ids = batches.harmful_ids if batches.harmful_ids is not None else torch.arange(nh)
        stats = MiningStats()
        t0 = self.clock()
        harmful_rows = trained_harmful.row_sample - nb
        pooled_b = pooled_by_sample(take_layers(trained_benign.states.detach(), self.benign_idx),
                                    trained_benign.row_sample, nb)  # [Lb, nb, d]
        pooled_h = pooled_by_sample(trained_harmful.states.detach(), harmful_rows, nh)  # [L, nh, d], every layer
        host_b, host_h, queue_h, queue_ids = self._to_host(pooled_b, pooled_h, batches, harmful_ids, nh)
        mined_b = self.miner.mine_benign(host_b, benign_ids, stats)
        mined_h = self.miner.mine_harmful(host_h[self.target_idx], harmful_ids, stats)
        out = MinedBatch(mined_b, trained_benign.row_sample, mined_h, harmful_rows)
        refined_values = self._refine(model, out, batches, nh, stats)
        metrics.update(refined_values)
        for kind, found in (("benign", out.benign), ("harmful", out.harmful)):
            if not found.all_valid():
                raise RuntimeError(
                    f"mining: some {kind} samples found no negative (the bank must hold at least two harmful samples)"
                )
        self.miner.push(queue_h[self.benign_idx], queue_ids)
        # every key on every process (None: not computed here), so that all processes log the same keys
        metrics.update({key: stats.values.get(key) for key in MINING_STAT_KEYS})
        # mining = pooling the queries, the searches, gathering the negatives and the queue refresh
        metrics["seconds_mining"] = self.clock() - t0 - float(refined_values.get("seconds_refinement", 0.0))
        metrics["seconds_mining_search"] = stats.seconds
        return out

    def _to_host(self, pooled_b: torch.Tensor, pooled_h: torch.Tensor, batches: StepBatches,
                 harmful_ids: torch.Tensor, nh: int):
        """(benign queries, harmful queries, the queue's new vectors, their ids) on the host, in one copy."""
        if self.dist is None:
            host_b, host_h = to_host(pooled_b, pooled_h)
            return host_b, host_h, host_h, harmful_ids
        # the global batch's vectors, in global order: every rank keeps the same queue
        shards = batches.harmful_shards
        if shards is None or batches.global_harmful_ids is None:
            raise ValueError("mining under several processes needs StepBatches.harmful_shards and global_harmful_ids")
        host_b, queue_h = to_host(pooled_b, self.dist.all_gather_rows(pooled_h, shards, dim=1))
        start = sum(shards[: self.dist.rank])
        return host_b, queue_h[:, start : start + nh], queue_h, batches.global_harmful_ids

    def _refine(self, model: torch.nn.Module, out: MinedBatch, batches: StepBatches, nh: int,
                stats: MiningStats) -> dict[str, Any]:
        """Attack the owners of the hardest negatives when the refiner's schedule says so; the attacked
        samples' states and negatives join `out`. Returns the refinement's metrics."""
        from crl.mining.refinement import hardest_owners

        refiner = self.refiner
        if refiner is None or not refiner.use_at(batches.step, batches.micro):
            return {}
        mined_b, mined_h = out.benign, out.harmful
        pools = [[(mined_b.owners[..., 0], mined_b.scores[..., 0])], [(mined_h.owners[..., 0], mined_h.scores[..., 0])]]
        if self.dist is not None:  # the global batch's hardest owners, the same on every rank (host data)
            gathered = self.dist.all_gather_object(pools)
            pools = [[c for part in gathered for c in part[i]] for i in range(2)]
        owners = hardest_owners(pools, refiner.config.samples)
        if not owners:
            return {}
        # Every rank runs the same attack (so that the persistent perturbation stays identical), but
        # only the main rank's loss uses the attacked anchors (counted once, as in one process).
        refined = refiner.refine(model, owners, batches.step, self.layers)
        out.refined = True
        out.attacked_rows = refined.rows.count
        if self.dist is not None and not self.dist.is_main:
            out.unused_attacked = refined.trained
            return refined.values
        fa = select_rows(refined.frozen, refined.rows, self.layers)
        ta = select_rows(refined.trained, refined.rows, self.layers)
        pooled_a = pooled_by_sample(take_layers(ta.states.detach(), self.target_idx), ta.row_sample, len(owners))
        (host_a,) = to_host(pooled_a)
        mined_a = self.miner.mine_harmful(host_a, refined.sample_ids, stats, track=False)
        out.harmful = Mined(
            torch.cat([mined_h.negatives, mined_a.negatives], dim=1),
            np.concatenate([mined_h.scores, mined_a.scores], axis=1),
            np.concatenate([mined_h.owners, mined_a.owners], axis=1),
            torch.cat([mined_h.valid, mined_a.valid]),
        )
        out.harmful_rows = torch.cat([out.harmful_rows, ta.row_sample + nh])
        out.attacked = (fa, ta)
        return refined.values


__all__ = ["MinedBatch", "MiningStage", "per_sample_negatives", "to_host"]
