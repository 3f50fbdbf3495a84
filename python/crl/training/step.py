"""One micro-batch of training: the frozen and trained passes and the method's loss.

Passes per micro-batch (whatever the method): the benign and harmful sequences go through the model
together, once with the adapter disabled (the frozen reference, no grad) and once with it (the
trained model), both truncated after the last loss layer; the retain sequences, which feed the KL
term, go through the whole model twice the same way, and only the selected tokens reach the LM head.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from crl.data import Batch
from crl.losses.objectives import (
    LayerRows,
    circuit_breaker_terms,
    crl_benign_triplet,
    crl_harmful_triplet,
    LayerFrame,
    repbend_terms,
    retain_kl,
    select_rows,
)
from crl.models import capture_hidden_states, num_hidden_layers, unwrap_model
from crl.losses.objectives import pooled_by_sample
from crl.training.config import LossConfig, MiningConfig

if TYPE_CHECKING:
    from crl.mining import HardNegativeMiner
    from crl.training.distributed import DistributedContext
    from crl.training.refinement import AdversarialRefiner


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
    """[num_benign] int64: benign-pool index of each benign sample (for mining's history)."""
    harmful_ids: torch.Tensor | None = None
    """[num_harmful] int64: harmful-pool index of each harmful sample (the bank's sample ids)."""
    step: int = 0
    """Optimizer steps done before this micro-batch (refinement's schedule)."""
    micro: int = 0
    """Index of the micro-batch within its optimizer step."""


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


def token_selection(batch: Batch, mode: str, first_n: int) -> torch.Tensor:
    """[B, T] bool mask of the tokens the representation losses use (see LossConfig.tokens)."""
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


def _final_logits(model: torch.nn.Module, batch: Batch, token_mask: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the masked tokens only: the last hidden state (layer L, which crl's capture
    takes after the final norm, as transformers' hidden_states[-1]) through the LM head, without
    materialising [B, T, V]."""
    last = num_hidden_layers(model)
    hidden = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [last])[last]
    return unwrap_model(model).get_output_embeddings()(hidden[token_mask])


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
        if refiner is not None and miner is None:
            raise ValueError("refinement needs mining (it attacks the owners of the hardest mined negatives)")

    def _amp(self):
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _frozen(self):
        return self.model.disable_adapter()

    def __call__(self, batches: StepBatches, progress: float) -> StepOutput:
        cfg = self.config
        timings: dict[str, float] = {}
        contrast = batches.contrast
        nb = batches.num_benign
        t0 = time.perf_counter()
        with torch.no_grad(), self._frozen(), self._amp():
            frozen_hidden = capture_hidden_states(self.model, contrast.input_ids, contrast.attention_mask, self.layers)
        t1 = time.perf_counter()
        with self._amp():
            trained_hidden = capture_hidden_states(self.model, contrast.input_ids, contrast.attention_mask, self.layers)
        t2 = time.perf_counter()
        timings["seconds_frozen_pass"] = t1 - t0
        timings["seconds_trained_pass"] = t2 - t1

        is_benign = torch.zeros_like(batches.selection)
        is_benign[:nb] = True
        benign_sel = batches.selection & is_benign
        harmful_sel = batches.selection & ~is_benign

        metrics: dict[str, float] = {}
        if cfg.method == "crl":
            loss = self._crl(frozen_hidden, trained_hidden, benign_sel, harmful_sel, progress, metrics, batches)
        elif cfg.method == "circuit_breakers":
            loss = self._circuit_breakers(
                frozen_hidden, trained_hidden, contrast.attention_mask.bool() & is_benign, harmful_sel, progress, metrics
            )
        else:
            loss = self._repbend(frozen_hidden, trained_hidden, benign_sel, harmful_sel, nb, progress, metrics)
        t3 = time.perf_counter()
        timings["seconds_loss"] = t3 - t2

        needs_kl = cfg.method in ("crl", "repbend") and batches.retain is not None
        if needs_kl:
            retain = batches.retain
            assert retain is not None
            kl_mask = retain.attention_mask.bool()
            with torch.no_grad(), self._frozen(), self._amp():
                frozen_logits = _final_logits(self.model, retain, kl_mask)
            with self._amp():
                trained_logits = _final_logits(self.model, retain, kl_mask)
            kl = retain_kl(frozen_logits, trained_logits, cfg.kl_temperature)
            if self.dist is not None and cfg.method == "crl":
                kl = self.dist.shard_mean(kl, int(kl_mask.sum()))  # this rank's share of the global token mean
            weight = cfg.gamma.at(progress) if cfg.method == "crl" else cfg.epsilon.at(progress)
            loss = loss + weight * kl
            metrics["loss_kl"] = float(kl.detach())
            metrics["coef_kl"] = weight
            timings["seconds_retain_passes"] = time.perf_counter() - t3
        metrics.update(timings)
        metrics["loss"] = float(loss.detach())
        if self.dist is not None:
            # crl: each rank's loss is its share of the global loss (gradients are summed over ranks);
            # the baselines: local means, averaged over ranks.
            exact = cfg.method == "crl"
            metrics = self.dist.reduce_metrics(metrics, additive=exact)
            if not exact:
                loss = loss / self.dist.world_size
        return StepOutput(loss, metrics)

    # --- methods -------------------------------------------------------------------------------

    def _rows(self, hidden: dict[int, torch.Tensor], mask: torch.Tensor) -> LayerRows:
        return select_rows(hidden, mask, self.layers)

    # Under multi-process training these give the global quantities (crl.training.distributed).

    def _has_rows(self, states: torch.Tensor) -> bool:
        return states.shape[1] > 0 if self.dist is None else self.dist.has_rows(states.shape[1])

    def _share(self, out, rows: int):
        return out if self.dist is None else self.dist.shard_triplet(out, rows)

    def _fit_frame(self, *frozen: torch.Tensor) -> LayerFrame:
        """crl's layer frame fitted on the frozen rows [L, R, d] of every given set (global under
        multi-process training)."""
        fit = LayerFrame.fit if self.dist is None else self.dist.fit_frame
        cfg = self.config
        return fit(torch.cat(frozen, dim=1), center=cfg.center_states, scale=cfg.normalize_layer_scale)

    def _crl(self, frozen_hidden, trained_hidden, benign_sel, harmful_sel, progress, metrics, batches=None) -> torch.Tensor:
        cfg = self.config
        fb, tb = self._rows(frozen_hidden, benign_sel), self._rows(trained_hidden, benign_sel)
        fh, th = self._rows(frozen_hidden, harmful_sel), self._rows(trained_hidden, harmful_sel)
        fb_s, tb_s, fh_s, th_s = fb.states, tb.states, fh.states, th.states
        frame = self._fit_frame(fb.states, fh.states)
        fb_s, tb_s, fh_s, th_s = (frame.apply(x) for x in (fb_s, tb_s, fh_s, th_s))
        if self.dist is None:
            centroid = th_s.float().mean(dim=1)  # [L, d], the collapsed harmful region (carries grad)
        else:
            centroid = self.dist.global_row_mean(th_s)  # the global batch's, gradient to every rank's rows
        benign_idx = [self.layers.index(l) for l in cfg.resolved_benign_layers]
        target_idx = [self.layers.index(l) for l in cfg.target_layers]
        alpha, beta = cfg.alpha.at(progress), cfg.beta.at(progress)
        loss = fb_s.new_zeros((), dtype=torch.float32)
        mined = None
        if self.miner is not None and batches is not None:
            mined = self._mine(fb, tb, fh, th, batches, metrics)
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
        replace = mined is not None and self.mining.combine == "replace"
        w_mined = 1.0 if replace else self.mining.weight
        if self._has_rows(fb_s):
            loss_b = None
            if not replace:
                out_b = crl_benign_triplet(
                    tb_s[benign_idx], fb_s[benign_idx], centroid[benign_idx],
                    positive_distance=cfg.benign_positive_distance, negative_distance=cfg.benign_negative_distance,
                    margin=cfg.benign_margin, mix_weight=cfg.mix_weight,
                )
                out_b = self._share(out_b, tb_s.shape[1])
                loss_b = out_b.loss
                metrics.update(
                    loss_benign=float(out_b.loss.detach()), active_benign=float(out_b.active_fraction),
                    benign_d_pos=float(out_b.mean_positive_distance), benign_d_neg=float(out_b.mean_negative_distance),
                )
            if mined is not None:
                negatives, index = self._mined_negatives(
                    mined["benign"], mined["benign_rows"], frame.select(benign_idx), tb_s.device
                )
                out_bm = crl_benign_triplet(
                    tb_s[benign_idx], fb_s[benign_idx], centroid[benign_idx],
                    positive_distance=cfg.benign_positive_distance, negative_distance=cfg.benign_negative_distance,
                    margin=cfg.benign_margin, mix_weight=cfg.mix_weight,
                    extra_negatives=negatives, extra_negative_index=index,
                )
                out_bm = self._share(out_bm, tb_s.shape[1])
                loss_b = w_mined * out_bm.loss if loss_b is None else loss_b + w_mined * out_bm.loss
                metrics.update(
                    loss_benign_mined=float(out_bm.loss.detach()), active_benign_mined=float(out_bm.active_fraction),
                    benign_d_neg_mined=float(out_bm.mean_negative_distance),
                )
            loss = loss + alpha * loss_b
        if self._has_rows(th_s):
            loss_h = None
            if not replace:
                out_h = crl_harmful_triplet(
                    th_s[target_idx], fh_s[target_idx], centroid[target_idx],
                    positive_distance=cfg.harmful_positive_distance, negative_distance=cfg.harmful_negative_distance,
                    margin=cfg.harmful_margin, mix_weight=cfg.mix_weight,
                )
                out_h = self._share(out_h, th_s.shape[1])
                loss_h = out_h.loss
                metrics.update(
                    loss_harmful=float(out_h.loss.detach()), active_harmful=float(out_h.active_fraction),
                    harmful_d_pos=float(out_h.mean_positive_distance), harmful_d_neg=float(out_h.mean_negative_distance),
                )
            if mined is not None:
                negatives, index = self._mined_negatives(
                    mined["harmful"], mined["harmful_rows"], frame.select(target_idx), th_s.device
                )
                out_hm = crl_harmful_triplet(
                    th_s[target_idx], fh_s[target_idx], centroid[target_idx],
                    positive_distance=cfg.harmful_positive_distance, negative_distance=cfg.harmful_negative_distance,
                    margin=cfg.harmful_margin, mix_weight=cfg.mix_weight,
                    extra_negatives=negatives, extra_negative_index=index,
                )
                out_hm = self._share(out_hm, th_s.shape[1])
                loss_h = w_mined * out_hm.loss if loss_h is None else loss_h + w_mined * out_hm.loss
                metrics.update(
                    loss_harmful_mined=float(out_hm.loss.detach()), active_harmful_mined=float(out_hm.active_fraction),
                    harmful_d_neg_mined=float(out_hm.mean_negative_distance),
                )
            loss = loss + beta * loss_h
        metrics.update(coef_benign=alpha, coef_harmful=beta)
        return loss

    # --- mining and refinement -----------------------------------------------------------------

    @staticmethod
    def _mined_negatives(mined, row_sample, frame: LayerFrame, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample negatives [L * S, k, d] (entry l * S + s; in the same layer frame as the states)
        and the row -> entry index [L * R]. Never broadcast to rows."""
        negatives = frame.apply(mined.negatives.to(device))  # [L, S, k, d]
        num_layers, num_samples = negatives.shape[0], negatives.shape[1]
        negatives = negatives.reshape(num_layers * num_samples, *negatives.shape[2:])
        rows = row_sample.to(device)
        index = (torch.arange(num_layers, device=device)[:, None] * num_samples + rows[None, :]).reshape(-1)
        return negatives, index

    def _mine(self, fb, tb, fh, th, batches: StepBatches, metrics: dict[str, float]) -> dict:
        """Mine the negatives of this micro-batch (and run the refinement); refresh the queue."""
        from crl.mining import MiningStats
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
        t0 = time.perf_counter()
        harmful_rows = th.row_sample - nb
        pooled_b = pooled_by_sample(tb.states.detach()[benign_idx], tb.row_sample, nb)
        pooled_h = pooled_by_sample(th.states.detach(), harmful_rows, nh)  # [L, nh, d], every captured layer
        mined_b = miner.mine_benign(pooled_b, benign_ids, stats)
        mined_h = miner.mine_harmful(pooled_h[target_idx], harmful_ids, stats)
        out = {"benign": mined_b, "benign_rows": tb.row_sample, "harmful": mined_h, "harmful_rows": harmful_rows,
               "attacked": None}
        refiner = self.refiner
        if refiner is not None and refiner.use_at(batches.step, batches.micro):
            candidates = [(mined_b.owners[..., 0], mined_b.scores[..., 0]), (mined_h.owners[..., 0], mined_h.scores[..., 0])]
            if self.dist is not None:  # the global batch's hardest owners, the same on every rank
                candidates = [c for part in self.dist.all_gather_object(candidates) for c in part]
            owners = hardest_owners(candidates, refiner.config.samples)
            if owners and self.dist is not None and not self.dist.is_main:
                # Every rank runs the same attack (so that the persistent perturbation stays identical),
                # but only the main rank's loss uses the attacked anchors (counted once, as in one process).
                refined = refiner.refine(self.model, owners, batches.step, self.layers)
                metrics.update(refined.metrics)
                out["unused_attacked"] = refined.trained  # enters the loss with weight 0 (see _crl)
                owners = []
            if owners:
                refined = refiner.refine(self.model, owners, batches.step, self.layers)
                fa = select_rows(refined.frozen, refined.selection, self.layers)
                ta = select_rows(refined.trained, refined.selection, self.layers)
                pooled_a = pooled_by_sample(ta.states.detach()[target_idx], ta.row_sample, len(owners))
                mined_a = miner.mine_harmful(pooled_a, refined.sample_ids, stats, track=False)
                from crl.mining import Mined

                out["harmful"] = Mined(
                    torch.cat([mined_h.negatives, mined_a.negatives], dim=1),
                    np.concatenate([mined_h.scores, mined_a.scores], axis=1),
                    np.concatenate([mined_h.owners, mined_a.owners], axis=1),
                    torch.cat([mined_h.valid, mined_a.valid]),
                )
                out["harmful_rows"] = torch.cat([harmful_rows, ta.row_sample + nh])
                out["attacked"] = (fa, ta)
                metrics.update(refined.metrics)
        for kind in ("benign", "harmful"):
            valid = out[kind].valid
            if not bool(valid.all()):
                raise RuntimeError(
                    f"mining: some {kind} samples found no negative (the bank must hold at least two harmful samples)"
                )
        if self.dist is None:
            miner.push(pooled_h[benign_idx], harmful_ids)
        else:  # the global batch's vectors, in global order: every rank keeps the same queue
            miner.push(self.dist.all_gather_cat(pooled_h[benign_idx], 1), self.dist.all_gather_cat(harmful_ids, 0))
        metrics.update(stats.values)
        # mining = pooling the queries, the searches, gathering the negatives and the queue refresh
        metrics["seconds_mining"] = time.perf_counter() - t0 - metrics.get("seconds_refinement", 0.0)
        metrics["seconds_mining_search"] = stats.seconds
        return out

    def _baseline_frame(self, trained_a, frozen_a, trained_b, frozen_b):
        """With `loss.baseline_frame`, the four [L, R, d] state sets in crl's layer frame (fitted on
        the frozen rows of both), else unchanged."""
        if not self.config.baseline_frame:
            return trained_a, frozen_a, trained_b, frozen_b
        frame = self._fit_frame(frozen_a, frozen_b)
        return tuple(frame.apply(x) for x in (trained_a, frozen_a, trained_b, frozen_b))

    def _circuit_breakers(self, frozen_hidden, trained_hidden, retain_mask, harmful_sel, progress, metrics):
        cfg = self.config
        target = cfg.target_layers
        fr, tr = select_rows(frozen_hidden, retain_mask, target), select_rows(trained_hidden, retain_mask, target)
        fh, th = select_rows(frozen_hidden, harmful_sel, target), select_rows(trained_hidden, harmful_sel, target)
        tr_s, fr_s, th_s, fh_s = self._baseline_frame(tr.states, fr.states, th.states, fh.states)
        retain, reroute = circuit_breaker_terms(tr_s, fr_s, th_s, fh_s)
        # The schedule of the CB paper: t goes from 0 to 1/2 over training.
        t = 0.5 * progress
        alpha = cfg.alpha.at(progress)
        c_ret, c_rr = alpha * t, alpha * (1.0 - t)
        metrics.update(loss_retain=float(retain.detach()), loss_reroute=float(reroute.detach()), coef_retain=c_ret, coef_reroute=c_rr)
        return c_ret * retain + c_rr * reroute

    def _repbend(self, frozen_hidden, trained_hidden, benign_sel, harmful_sel, num_benign, progress, metrics):
        cfg = self.config
        target = cfg.target_layers
        fb, tb = select_rows(frozen_hidden, benign_sel, target), select_rows(trained_hidden, benign_sel, target)
        fh, th = select_rows(frozen_hidden, harmful_sel, target), select_rows(trained_hidden, harmful_sel, target)
        num_harmful = int(harmful_sel.shape[0] - num_benign)
        harmful_sample = th.row_sample - num_benign
        tb_s, fb_s, th_s, fh_s = self._baseline_frame(tb.states, fb.states, th.states, fh.states)
        benign, harmful, dissim = repbend_terms(tb_s, fb_s, th_s, fh_s, harmful_sample, num_harmful)
        a, b, g = cfg.alpha.at(progress), cfg.beta.at(progress), cfg.gamma.at(progress)
        metrics.update(
            loss_benign_distance=float(benign.detach()), loss_harmful_distance=float(harmful.detach()),
            loss_harmful_dissimilarity=float(dissim.detach()), coef_benign=a, coef_harmful=b, coef_dissimilarity=g,
        )
        return a * benign - b * harmful + g * dissim
