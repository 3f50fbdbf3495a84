"""One micro-batch of training: the frozen and trained passes and the method's loss.

Passes per micro-batch (whatever the method): the benign and harmful sequences go through the model
together, once with the adapter disabled (the frozen reference, no grad) and once with it (the
trained model), both truncated after the last loss layer; the retain sequences, which feed the KL
term, go through the whole model twice the same way, and only the selected tokens reach the LM head.

No host synchronisation: the token selections arrive as flat row indices built on the host
(`StepRows`, from the CPU batch in `Trainer._next_batches`), so gathering the selected states is an
`index_select` whose size the host knows; row counts (global ones under several processes) are host
ints; metrics are returned as device tensors (`StepOutput.values`) that the trainer reads once per
optimizer step. With mining, the pooled queries (and the batch's vectors for the queue) come to the
host in one copy per micro-batch, for the search that runs there; refinement adds the attacked
samples' queries (one copy) and, when it attacks, one read of the clean states' scale (Adam's
learning rate is a host number). See docs/distributed.md.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from crl.data import Batch
from crl.losses.objectives import (
    LayerFrame,
    RowIndex,
    circuit_breaker_terms,
    crl_benign_triplet,
    crl_harmful_triplet,
    pooled_by_sample,
    repbend_terms,
    retain_kl,
    select_rows,
    take_layers,
)
from crl.models import capture_hidden_states, num_hidden_layers, unwrap_model
from crl.training.config import LossConfig, MiningConfig
from crl.training.metrics import Value, read_values

if TYPE_CHECKING:
    from crl.mining import HardNegativeMiner
    from crl.training.distributed import DistributedContext
    from crl.training.refinement import AdversarialRefiner


@dataclass
class StepRows:
    """The row sets of a micro-batch as flat token indices (`RowIndex`), built on the host."""

    benign: RowIndex
    """The selected tokens of the benign rows of the contrast batch."""
    harmful: RowIndex
    """The selected tokens of its harmful rows."""
    benign_tokens: RowIndex | None = None
    """Every attended token of the benign rows (circuit breakers' retain set)."""
    retain_tokens: RowIndex | None = None
    """Every attended token of the retain batch (the KL term's)."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "StepRows":
        move = lambda r: r.to(device, non_blocking) if r is not None else None  # noqa: E731
        return StepRows(move(self.benign), move(self.harmful), move(self.benign_tokens), move(self.retain_tokens))


def step_rows(
    contrast: Batch, num_benign: int, selection: torch.Tensor, retain: Batch | None = None,
    totals: dict[str, int] | None = None,
) -> StepRows:
    """The row sets of a micro-batch from its host (CPU) tensors: no synchronisation. `totals`: the
    global batch's row count of each set (keys benign, harmful, benign_tokens, retain_tokens) under
    several processes; by default the local counts."""
    totals = totals or {}
    is_benign = torch.arange(selection.shape[0]).unsqueeze(1) < num_benign
    attended = contrast.attention_mask.detach().cpu().bool()
    selection = selection.detach().cpu()
    sets = {
        "benign": selection & is_benign,
        "harmful": selection & ~is_benign,
        "benign_tokens": attended & is_benign,
        "retain_tokens": retain.attention_mask.detach().cpu().bool() if retain is not None else None,
    }
    rows = {k: RowIndex.from_mask(m, total=totals.get(k)) if m is not None else None for k, m in sets.items()}
    return StepRows(**rows)


def row_totals(contrast: Batch, num_benign: int, selection: torch.Tensor, retain: Batch | None) -> dict[str, int]:
    """The row count of each set of `step_rows` for a (global) host batch."""
    rows = step_rows(contrast, num_benign, selection, retain)
    return {"benign": rows.benign.count, "harmful": rows.harmful.count, "benign_tokens": rows.benign_tokens.count,
            "retain_tokens": rows.retain_tokens.count if rows.retain_tokens is not None else 0}


@dataclass
class StepBatches:
    """The micro-batch of each pool, already on the model's device."""

    contrast: Batch
    """Benign sequences first, then harmful ones, padded together."""
    num_benign: int
    retain: Batch | None
    selection: torch.Tensor
    """[B, T] bool: the tokens whose states enter the representation losses."""
    benign_ids: torch.Tensor | None = None
    """[num_benign] int64 (host): benign-pool index of each benign sample (for mining's history)."""
    harmful_ids: torch.Tensor | None = None
    """[num_harmful] int64 (host): harmful-pool index of each harmful sample (the bank's sample ids)."""
    step: int = 0
    """Optimizer steps done before this micro-batch (refinement's schedule)."""
    micro: int = 0
    """Index of the micro-batch within its optimizer step."""
    rows: StepRows | None = None
    """The row sets as flat indices on the device, built on the host (`Trainer._next_batches`). None:
    built from `selection` at the start of the step (one device-to-host copy when it is on a GPU; one
    process only)."""
    global_harmful_ids: torch.Tensor | None = None
    """Several processes: the harmful ids of the global batch (host; every rank's, in rank order)."""
    harmful_shards: list[int] | None = None
    """Several processes: the number of harmful samples of each rank, in rank order."""


@dataclass
class StepOutput:
    loss: torch.Tensor
    values: dict[str, Value] = field(default_factory=dict)
    """The metrics as computed, not yet read: 0-dim detached device tensors, host floats (seconds_*,
    coef_*, mining statistics) and None for a key not logged by this process (crl.training.metrics)."""

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics as host floats (one device read: a synchronisation on a GPU; the trainer reads
        `values` once per optimizer step instead). Under several processes: this rank's values."""
        return read_values([self.values])[0][0]


def token_selection(batch: Batch, mode: str, first_n: int) -> torch.Tensor:
    """[B, T] bool mask of the tokens the representation losses use (see LossConfig.tokens). Runs
    where the batch is (the trainer calls it on the CPU batch: `last_request` uses a nonzero)."""
    if mode == "response":
        return batch.response_mask.clone()
    if mode == "request":
        return batch.request_mask.clone()
    if mode == "last_request":
        positions = torch.arange(batch.request_mask.shape[1], device=batch.request_mask.device)
        last = torch.where(batch.request_mask, positions, torch.full_like(positions, -1)).amax(dim=1)
        mask = torch.zeros_like(batch.request_mask)
        has = last >= 0
        mask[has.nonzero(as_tuple=True)[0], last[has]] = True
        return mask
    if mode == "first_response":
        rank = torch.cumsum(batch.response_mask.long(), dim=1)
        return batch.response_mask & (rank <= first_n)
    if mode == "assistant":
        # Everything after the request up to the response's end: the template's assistant header,
        # then the response. Under "response" alone the state that emits the first response token
        # (the header's last) is never trained, and a defended model can still open compliantly.
        positions = torch.arange(batch.request_mask.shape[1], device=batch.request_mask.device)
        none = torch.full_like(positions, -1)
        last_request = torch.where(batch.request_mask, positions, none).amax(dim=1, keepdim=True)
        last_response = torch.where(batch.response_mask, positions, none).amax(dim=1, keepdim=True)
        return (positions > last_request) & (positions <= last_response)
    raise ValueError(f"loss.tokens: unknown token selection {mode!r}")


def contrast_selection(contrast: Batch, num_benign: int, config: LossConfig) -> torch.Tensor:
    """The token selection of a contrast batch: its first `num_benign` rows (benign pool) under
    `loss.tokens`, the others (harmful pool) under `loss.harmful_tokens`."""
    benign = token_selection(contrast, config.tokens, config.first_response_tokens)
    if config.resolved_harmful_tokens == config.tokens:
        return benign
    harmful = token_selection(contrast, config.resolved_harmful_tokens, config.first_response_tokens)
    rows = torch.arange(contrast.input_ids.shape[0], device=benign.device).unsqueeze(1) < num_benign
    return torch.where(rows, benign, harmful)


def _final_logits(model: torch.nn.Module, batch: Batch, tokens: RowIndex | torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the given tokens only (a `RowIndex`, or a [B, T] bool mask): the last hidden
    state (layer L, which crl's capture takes after the final norm, as transformers' hidden_states[-1])
    through the LM head, without materialising [B, T, V]."""
    if not isinstance(tokens, RowIndex):
        tokens = RowIndex.from_mask(tokens)
    last = num_hidden_layers(model)
    hidden = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [last], padded=batch.padded)[last]
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, tokens.flat)
    return unwrap_model(model).get_output_embeddings()(rows)


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


class LossComputer:
    """Runs the passes of one micro-batch and combines them into the configured method's loss."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: LossConfig,
        *,
        autocast: bool = False,
        miner: HardNegativeMiner | None = None,
        mining: MiningConfig | None = None,
        refiner: AdversarialRefiner | None = None,
        dist: DistributedContext | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self.dist = dist
        """Multi-process context (None: one process, the plain code path); see crl.training.distributed."""
        self.config = config
        self.layers = config.captured_layers
        self.autocast = autocast
        self.miner = miner
        self.mining = mining if mining is not None else MiningConfig(enabled=miner is not None)
        self.refiner = refiner
        self._device = torch.device(device) if device is not None else None
        self.sync_timings = False
        """Synchronise with the device before each clock read, so that `seconds_*` measure the device's
        work on a GPU (benchmarks only: without it they measure the host's, which only queues it)."""
        if refiner is not None and miner is None:
            raise ValueError("refinement needs mining (it attacks the owners of the hardest mined negatives)")

    @property
    def device(self) -> torch.device:
        """The training device (the model's, unless given)."""
        if self._device is None:
            self._device = next(self.model.parameters()).device
        return self._device

    def clock(self) -> float:
        if self.sync_timings and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def _amp(self):
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _frozen(self):
        return self.model.disable_adapter()

    def _step_rows(self, batches: StepBatches) -> StepRows:
        """The row sets of a hand-built micro-batch (no `rows`): from its selection, via the host."""
        if self.dist is not None:
            raise ValueError("StepBatches.rows is required under several processes (the global row counts; "
                             "Trainer._next_batches builds it)")
        rows = step_rows(batches.contrast, batches.num_benign, batches.selection, batches.retain)
        return rows.to(batches.contrast.input_ids.device)

    def __call__(self, batches: StepBatches, progress: float) -> StepOutput:
        cfg = self.config
        timings: dict[str, float] = {}
        contrast = batches.contrast
        nb = batches.num_benign
        rows = batches.rows if batches.rows is not None else self._step_rows(batches)
        t0 = self.clock()
        with torch.no_grad(), self._frozen(), self._amp():
            frozen_hidden = capture_hidden_states(
                self.model, contrast.input_ids, contrast.attention_mask, self.layers, padded=contrast.padded
            )
        t1 = self.clock()
        with self._amp():
            trained_hidden = capture_hidden_states(
                self.model, contrast.input_ids, contrast.attention_mask, self.layers, padded=contrast.padded
            )
        t2 = self.clock()
        timings["seconds_frozen_pass"] = t1 - t0
        timings["seconds_trained_pass"] = t2 - t1

        metrics: dict[str, Value] = {}
        if cfg.method == "crl":
            loss = self._crl(frozen_hidden, trained_hidden, rows, progress, metrics, batches)
        elif cfg.method == "circuit_breakers":
            loss = self._circuit_breakers(frozen_hidden, trained_hidden, rows, progress, metrics)
        else:
            num_harmful = int(contrast.input_ids.shape[0]) - nb
            loss = self._repbend(frozen_hidden, trained_hidden, rows, nb, num_harmful, progress, metrics)
        t3 = self.clock()
        timings["seconds_loss"] = t3 - t2

        needs_kl = cfg.method in ("crl", "repbend") and batches.retain is not None
        if needs_kl:
            retain = batches.retain
            assert retain is not None and rows.retain_tokens is not None
            kl_rows = rows.retain_tokens
            with torch.no_grad(), self._frozen(), self._amp():
                frozen_logits = _final_logits(self.model, retain, kl_rows)
            with self._amp():
                trained_logits = _final_logits(self.model, retain, kl_rows)
            kl = retain_kl(frozen_logits, trained_logits, cfg.kl_temperature)
            if self.dist is not None and cfg.method == "crl":
                kl = self.dist.shard_mean(kl, kl_rows.count, kl_rows.total)  # this rank's share of the global token mean
            weight = cfg.gamma.at(progress) if cfg.method == "crl" else cfg.epsilon.at(progress)
            loss = loss + weight * kl
            metrics["loss_kl"] = kl.detach()
            metrics["coef_kl"] = weight
            timings["seconds_retain_passes"] = self.clock() - t3
        metrics.update(timings)
        metrics["loss"] = loss.detach()
        if self.dist is not None and cfg.method != "crl":
            # crl: each rank's loss is its share of the global loss (gradients are summed over ranks);
            # the baselines: local means, averaged over ranks (their metrics too, in the trainer).
            loss = loss / self.dist.world_size
        return StepOutput(loss, metrics)

    # --- methods -------------------------------------------------------------------------------

    # Under multi-process training these give the global quantities (crl.training.distributed);
    # `total` is the global row count of the set, known on the host.

    def _share(self, out, rows: int, total: int):
        return out if self.dist is None else self.dist.shard_triplet(out, rows, total)

    def _fit_frame(self, frozen: Sequence[torch.Tensor], total: int | None = None) -> LayerFrame:
        """crl's layer frame fitted on the frozen rows [L, R, d] of every given set (global under
        multi-process training, where `total` is their global row count)."""
        cfg = self.config
        rows = torch.cat(list(frozen), dim=1)
        if self.dist is None:
            return LayerFrame.fit(rows, center=cfg.center_states, scale=cfg.normalize_layer_scale)
        if total is None:
            raise ValueError("_fit_frame: the global row count is required under several processes")
        return self.dist.fit_frame(rows, total, center=cfg.center_states, scale=cfg.normalize_layer_scale)

    def _crl(self, frozen_hidden, trained_hidden, rows: StepRows, progress, metrics, batches=None) -> torch.Tensor:
        cfg = self.config
        layers = self.layers
        fb, tb = select_rows(frozen_hidden, rows.benign, layers), select_rows(trained_hidden, rows.benign, layers)
        fh, th = select_rows(frozen_hidden, rows.harmful, layers), select_rows(trained_hidden, rows.harmful, layers)
        fb_s, tb_s, fh_s, th_s = fb.states, tb.states, fh.states, th.states
        frame = self._fit_frame((fb.states, fh.states), rows.benign.total + rows.harmful.total)
        fb_s, tb_s, fh_s, th_s = (frame.apply(x) for x in (fb_s, tb_s, fh_s, th_s))
        if self.dist is None:
            centroid = th_s.float().mean(dim=1)  # [L, d], the collapsed harmful region (carries grad)
        else:  # the global batch's, gradient to every rank's rows
            centroid = self.dist.global_row_mean(th_s, rows.harmful.total)
        benign_idx = [layers.index(l) for l in cfg.resolved_benign_layers]
        target_idx = [layers.index(l) for l in cfg.target_layers]
        alpha, beta = cfg.alpha.at(progress), cfg.beta.at(progress)
        loss = fb_s.new_zeros((), dtype=torch.float32)
        benign_total, harmful_total = rows.benign.total, rows.harmful.total
        mined = None
        if self.miner is not None and batches is not None:
            mined = self._mine(fb, tb, fh, th, batches, metrics)
            harmful_total += mined["attacked_rows"]  # the attacked anchors (on the main rank's share only)
            if mined.get("unused_attacked"):
                # Other ranks than the main one: their attacked states, unused, still join the backward
                # (weight 0), so that every rank's backward runs the same passes (under FSDP each
                # layer's backward all-gathers its weights: a collective).
                loss = loss + 0.0 * sum(h.float().mean() for h in mined["unused_attacked"].values())
            if mined["attacked"] is not None:
                fa, ta = mined["attacked"]
                fa_s, ta_s = frame.apply(fa.states), frame.apply(ta.states)
                # the attacked harmful states join the harmful anchors (the centroid stays the clean batch's)
                th_s, fh_s = torch.cat([th_s, ta_s], dim=1), torch.cat([fh_s, fa_s], dim=1)
        replace_terms = mined is not None and self.mining.combine == "replace"
        w_mined = 1.0 if replace_terms else self.mining.weight
        tb_b, fb_b, centroid_b = take_layers(tb_s, benign_idx), take_layers(fb_s, benign_idx), take_layers(centroid, benign_idx)
        if benign_total > 0:
            loss_b = None
            if not replace_terms:
                out_b = crl_benign_triplet(
                    tb_b, fb_b, centroid_b,
                    positive_distance=cfg.benign_positive_distance, negative_distance=cfg.benign_negative_distance,
                    margin=cfg.benign_margin, mix_weight=cfg.mix_weight,
                )
                out_b = self._share(out_b, tb_s.shape[1], benign_total)
                loss_b = out_b.loss
                metrics.update(
                    loss_benign=out_b.loss.detach(), active_benign=out_b.active_fraction.detach(),
                    benign_d_pos=out_b.mean_positive_distance.detach(), benign_d_neg=out_b.mean_negative_distance.detach(),
                )
            if mined is not None:
                negatives, index = self._mined_negatives(mined["benign"], mined["benign_rows"], frame.select(benign_idx))
                out_bm = crl_benign_triplet(
                    tb_b, fb_b, centroid_b,
                    positive_distance=cfg.benign_positive_distance, negative_distance=cfg.benign_negative_distance,
                    margin=cfg.benign_margin, mix_weight=cfg.mix_weight,
                    extra_negatives=negatives, extra_negative_index=index,
                )
                out_bm = self._share(out_bm, tb_s.shape[1], benign_total)
                loss_b = w_mined * out_bm.loss if loss_b is None else loss_b + w_mined * out_bm.loss
                metrics.update(
                    loss_benign_mined=out_bm.loss.detach(), active_benign_mined=out_bm.active_fraction.detach(),
                    benign_d_neg_mined=out_bm.mean_negative_distance.detach(),
                )
            loss = loss + alpha * loss_b
        if harmful_total > 0:
            th_t, fh_t, centroid_t = take_layers(th_s, target_idx), take_layers(fh_s, target_idx), take_layers(centroid, target_idx)
            loss_h = None
            if not replace_terms:
                out_h = crl_harmful_triplet(
                    th_t, fh_t, centroid_t,
                    positive_distance=cfg.harmful_positive_distance, negative_distance=cfg.harmful_negative_distance,
                    margin=cfg.harmful_margin, mix_weight=cfg.mix_weight,
                )
                out_h = self._share(out_h, th_s.shape[1], harmful_total)
                loss_h = out_h.loss
                metrics.update(
                    loss_harmful=out_h.loss.detach(), active_harmful=out_h.active_fraction.detach(),
                    harmful_d_pos=out_h.mean_positive_distance.detach(), harmful_d_neg=out_h.mean_negative_distance.detach(),
                )
            if mined is not None:
                negatives, index = self._mined_negatives(mined["harmful"], mined["harmful_rows"], frame.select(target_idx))
                out_hm = crl_harmful_triplet(
                    th_t, fh_t, centroid_t,
                    positive_distance=cfg.harmful_positive_distance, negative_distance=cfg.harmful_negative_distance,
                    margin=cfg.harmful_margin, mix_weight=cfg.mix_weight,
                    extra_negatives=negatives, extra_negative_index=index,
                )
                out_hm = self._share(out_hm, th_s.shape[1], harmful_total)
                loss_h = w_mined * out_hm.loss if loss_h is None else loss_h + w_mined * out_hm.loss
                metrics.update(
                    loss_harmful_mined=out_hm.loss.detach(), active_harmful_mined=out_hm.active_fraction.detach(),
                    harmful_d_neg_mined=out_hm.mean_negative_distance.detach(),
                )
            loss = loss + beta * loss_h
        metrics.update(coef_benign=alpha, coef_harmful=beta)
        return loss

    # --- mining and refinement -----------------------------------------------------------------

    def _mined_negatives(self, mined, row_sample: torch.Tensor, frame: LayerFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample negatives [L * S, k, d] (entry l * S + s; in the same layer frame as the states)
        and the row -> entry index [L * R]. Never broadcast to rows. The negatives (host memory) go to
        the device without a blocking copy."""
        device = row_sample.device
        negatives = mined.negatives
        if self.device.type == "cuda":
            negatives = negatives.pin_memory()
        negatives = frame.apply(negatives.to(self.device, non_blocking=True))  # [L, S, k, d]
        num_layers, num_samples = negatives.shape[0], negatives.shape[1]
        negatives = negatives.reshape(num_layers * num_samples, *negatives.shape[2:])
        index = (torch.arange(num_layers, device=device)[:, None] * num_samples + row_sample[None, :]).reshape(-1)
        return negatives, index

    def _mine(self, fb, tb, fh, th, batches: StepBatches, metrics: dict[str, Value]) -> dict:
        """Mine the negatives of this micro-batch (and run the refinement); refresh the queue.

        Host round trips: one device-to-host copy of the pooled queries of both searches (and, under
        several processes, of the global batch's pooled harmful states for the queue, gathered on the
        device first); with refinement, one more for the attacked samples' queries."""
        from crl.mining import MINING_STAT_KEYS, Mined, MiningStats
        from crl.training.refinement import hardest_owners

        cfg = self.config
        miner = self.miner
        assert miner is not None
        nb = batches.num_benign
        nh = int(batches.contrast.input_ids.shape[0]) - nb
        benign_ids = batches.benign_ids if batches.benign_ids is not None else torch.arange(nb)
        harmful_ids = batches.harmful_ids if batches.harmful_ids is not None else torch.arange(nh)
        benign_idx = [self.layers.index(l) for l in cfg.resolved_benign_layers]
        target_idx = [self.layers.index(l) for l in cfg.target_layers]
        stats = MiningStats()
        t0 = self.clock()
        harmful_rows = th.row_sample - nb
        pooled_b = pooled_by_sample(take_layers(tb.states.detach(), benign_idx), tb.row_sample, nb)  # [Lb, nb, d]
        pooled_h = pooled_by_sample(th.states.detach(), harmful_rows, nh)  # [L, nh, d], every captured layer
        if self.dist is None:
            host_b, host_h = to_host(pooled_b, pooled_h)
            queue_h, queue_ids = host_h, harmful_ids
        else:  # the global batch's vectors, in global order: every rank keeps the same queue
            shards = batches.harmful_shards
            if shards is None or batches.global_harmful_ids is None:
                raise ValueError("mining under several processes needs StepBatches.harmful_shards and global_harmful_ids")
            host_b, queue_h = to_host(pooled_b, self.dist.all_gather_rows(pooled_h, shards, dim=1))
            start = sum(shards[: self.dist.rank])
            host_h = queue_h[:, start : start + nh]
            queue_ids = batches.global_harmful_ids
        mined_b = miner.mine_benign(host_b, benign_ids, stats)
        mined_h = miner.mine_harmful(host_h[target_idx], harmful_ids, stats)
        out = {"benign": mined_b, "benign_rows": tb.row_sample, "harmful": mined_h, "harmful_rows": harmful_rows,
               "attacked": None, "attacked_rows": 0}
        refiner = self.refiner
        refined_values: dict[str, Value] = {}
        if refiner is not None and refiner.use_at(batches.step, batches.micro):
            candidates = [(mined_b.owners[..., 0], mined_b.scores[..., 0]), (mined_h.owners[..., 0], mined_h.scores[..., 0])]
            if self.dist is not None:  # the global batch's hardest owners, the same on every rank (host data)
                candidates = [c for part in self.dist.all_gather_object(candidates) for c in part]
            owners = hardest_owners(candidates, refiner.config.samples)
            if owners:
                # Every rank runs the same attack (so that the persistent perturbation stays identical),
                # but only the main rank's loss uses the attacked anchors (counted once, as in one process).
                refined = refiner.refine(self.model, owners, batches.step, self.layers)
                refined_values = refined.values
                out["attacked_rows"] = refined.rows.count
                if self.dist is not None and not self.dist.is_main:
                    out["unused_attacked"] = refined.trained  # enters the loss with weight 0 (see _crl)
                else:
                    fa = select_rows(refined.frozen, refined.rows, self.layers)
                    ta = select_rows(refined.trained, refined.rows, self.layers)
                    pooled_a = pooled_by_sample(take_layers(ta.states.detach(), target_idx), ta.row_sample, len(owners))
                    (host_a,) = to_host(pooled_a)
                    mined_a = miner.mine_harmful(host_a, refined.sample_ids, stats, track=False)
                    out["harmful"] = Mined(
                        torch.cat([mined_h.negatives, mined_a.negatives], dim=1),
                        np.concatenate([mined_h.scores, mined_a.scores], axis=1),
                        np.concatenate([mined_h.owners, mined_a.owners], axis=1),
                        torch.cat([mined_h.valid, mined_a.valid]),
                    )
                    out["harmful_rows"] = torch.cat([harmful_rows, ta.row_sample + nh])
                    out["attacked"] = (fa, ta)
        metrics.update(refined_values)
        for kind in ("benign", "harmful"):
            if not out[kind].all_valid():
                raise RuntimeError(
                    f"mining: some {kind} samples found no negative (the bank must hold at least two harmful samples)"
                )
        miner.push(queue_h[benign_idx], queue_ids)
        # every key on every process (None: not computed here), so that all processes log the same keys
        metrics.update({key: stats.values.get(key) for key in MINING_STAT_KEYS})
        # mining = pooling the queries, the searches, gathering the negatives and the queue refresh
        metrics["seconds_mining"] = self.clock() - t0 - float(refined_values.get("seconds_refinement", 0.0))
        metrics["seconds_mining_search"] = stats.seconds
        return out

    def _baseline_frame(self, trained_a, frozen_a, trained_b, frozen_b, total: int | None = None):
        """With `loss.baseline_frame`, the four [L, R, d] state sets in crl's layer frame (fitted on
        the frozen rows of both; `total`: their global row count under several processes), else
        unchanged."""
        if not self.config.baseline_frame:
            return trained_a, frozen_a, trained_b, frozen_b
        frame = self._fit_frame((frozen_a, frozen_b), total)
        return tuple(frame.apply(x) for x in (trained_a, frozen_a, trained_b, frozen_b))

    def _circuit_breakers(self, frozen_hidden, trained_hidden, rows: StepRows, progress, metrics):
        cfg = self.config
        target = cfg.target_layers
        retain_rows = rows.benign_tokens
        assert retain_rows is not None
        fr, tr = select_rows(frozen_hidden, retain_rows, target), select_rows(trained_hidden, retain_rows, target)
        fh, th = select_rows(frozen_hidden, rows.harmful, target), select_rows(trained_hidden, rows.harmful, target)
        tr_s, fr_s, th_s, fh_s = self._baseline_frame(tr.states, fr.states, th.states, fh.states,
                                                      retain_rows.total + rows.harmful.total)
        retain, reroute = circuit_breaker_terms(tr_s, fr_s, th_s, fh_s)
        # The schedule of the CB paper: t goes from 0 to 1/2 over training.
        t = 0.5 * progress
        alpha = cfg.alpha.at(progress)
        c_ret, c_rr = alpha * t, alpha * (1.0 - t)
        metrics.update(loss_retain=retain.detach(), loss_reroute=reroute.detach(), coef_retain=c_ret, coef_reroute=c_rr)
        return c_ret * retain + c_rr * reroute

    def _repbend(self, frozen_hidden, trained_hidden, rows: StepRows, num_benign, num_harmful, progress, metrics):
        cfg = self.config
        target = cfg.target_layers
        fb, tb = select_rows(frozen_hidden, rows.benign, target), select_rows(trained_hidden, rows.benign, target)
        fh, th = select_rows(frozen_hidden, rows.harmful, target), select_rows(trained_hidden, rows.harmful, target)
        harmful_sample = th.row_sample - num_benign
        tb_s, fb_s, th_s, fh_s = self._baseline_frame(tb.states, fb.states, th.states, fh.states,
                                                      rows.benign.total + rows.harmful.total)
        benign, harmful, dissim = repbend_terms(tb_s, fb_s, th_s, fh_s, harmful_sample, num_harmful)
        a, b, g = cfg.alpha.at(progress), cfg.beta.at(progress), cfg.gamma.at(progress)
        metrics.update(
            loss_benign_distance=benign.detach(), loss_harmful_distance=harmful.detach(),
            loss_harmful_dissimilarity=dissim.detach(), coef_benign=a, coef_harmful=b, coef_dissimilarity=g,
        )
        return a * benign - b * harmful + g * dissim


__all__ = [
    "LossComputer", "StepBatches", "StepOutput", "StepRows", "contrast_selection", "row_totals", "step_rows",
    "to_host", "token_selection",
]
