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

import torch

from crl.data import Batch
from crl.losses.objectives import (
    LayerRows,
    circuit_breaker_terms,
    crl_benign_triplet,
    crl_harmful_triplet,
    layer_scale,
    repbend_terms,
    retain_kl,
    select_rows,
)
from crl.models import capture_hidden_states, final_norm, num_hidden_layers, unwrap_model
from crl.training.config import LossConfig


@dataclass
class StepBatches:
    """The micro-batch of each pool, already on the model's device."""

    contrast: Batch
    """Benign sequences first, then harmful ones, padded together."""
    num_benign: int
    retain: Batch | None
    selection: torch.Tensor
    """[B, T] bool: the tokens whose states enter the representation losses."""


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
    raise ValueError(f"loss.tokens: unknown token selection {mode!r}")


def _final_logits(model: torch.nn.Module, batch: Batch, token_mask: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the masked tokens only: the last decoder layer's output through the final
    norm and LM head, without materialising [B, T, V]."""
    last = num_hidden_layers(model)
    hidden = capture_hidden_states(model, batch.input_ids, batch.attention_mask, [last])[last]
    rows = hidden[token_mask]
    norm = final_norm(model)
    if norm is not None:
        rows = norm(rows)
    return unwrap_model(model).get_output_embeddings()(rows)


class LossComputer:
    """Runs the passes of one micro-batch and combines them into the configured method's loss."""

    def __init__(self, model: torch.nn.Module, config: LossConfig, *, autocast: bool = False) -> None:
        self.model = model
        self.config = config
        self.layers = config.captured_layers
        self.autocast = autocast

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
            loss = self._crl(frozen_hidden, trained_hidden, benign_sel, harmful_sel, progress, metrics)
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
            weight = cfg.gamma.at(progress) if cfg.method == "crl" else cfg.epsilon.at(progress)
            loss = loss + weight * kl
            metrics["loss_kl"] = float(kl.detach())
            metrics["coef_kl"] = weight
            timings["seconds_retain_passes"] = time.perf_counter() - t3
        metrics.update(timings)
        metrics["loss"] = float(loss.detach())
        return StepOutput(loss, metrics)

    # --- methods -------------------------------------------------------------------------------

    def _rows(self, hidden: dict[int, torch.Tensor], mask: torch.Tensor) -> LayerRows:
        return select_rows(hidden, mask, self.layers)

    def _crl(self, frozen_hidden, trained_hidden, benign_sel, harmful_sel, progress, metrics) -> torch.Tensor:
        cfg = self.config
        fb, tb = self._rows(frozen_hidden, benign_sel), self._rows(trained_hidden, benign_sel)
        fh, th = self._rows(frozen_hidden, harmful_sel), self._rows(trained_hidden, harmful_sel)
        fb_s, tb_s, fh_s, th_s = fb.states, tb.states, fh.states, th.states
        if cfg.normalize_layer_scale:
            scale = layer_scale(torch.cat([fb.states, fh.states], dim=1))[:, None, None]
            fb_s, tb_s, fh_s, th_s = fb_s / scale, tb_s / scale, fh_s / scale, th_s / scale
        centroid = th_s.float().mean(dim=1)  # [L, d], the collapsed harmful region (carries grad)
        benign_idx = [self.layers.index(l) for l in cfg.resolved_benign_layers]
        target_idx = [self.layers.index(l) for l in cfg.target_layers]
        alpha, beta = cfg.alpha.at(progress), cfg.beta.at(progress)
        loss = fb_s.new_zeros((), dtype=torch.float32)
        if fb_s.shape[1] > 0:
            out_b = crl_benign_triplet(
                tb_s[benign_idx], fb_s[benign_idx], centroid[benign_idx],
                positive_distance=cfg.benign_positive_distance, negative_distance=cfg.benign_negative_distance,
                margin=cfg.benign_margin, mix_weight=cfg.mix_weight,
            )
            loss = loss + alpha * out_b.loss
            metrics.update(
                loss_benign=float(out_b.loss.detach()), active_benign=float(out_b.active_fraction),
                benign_d_pos=float(out_b.mean_positive_distance), benign_d_neg=float(out_b.mean_negative_distance),
            )
        if th_s.shape[1] > 0:
            out_h = crl_harmful_triplet(
                th_s[target_idx], fh_s[target_idx], centroid[target_idx],
                positive_distance=cfg.harmful_positive_distance, negative_distance=cfg.harmful_negative_distance,
                margin=cfg.harmful_margin, mix_weight=cfg.mix_weight,
            )
            loss = loss + beta * out_h.loss
            metrics.update(
                loss_harmful=float(out_h.loss.detach()), active_harmful=float(out_h.active_fraction),
                harmful_d_pos=float(out_h.mean_positive_distance), harmful_d_neg=float(out_h.mean_negative_distance),
            )
        metrics.update(coef_benign=alpha, coef_harmful=beta)
        return loss

    def _circuit_breakers(self, frozen_hidden, trained_hidden, retain_mask, harmful_sel, progress, metrics):
        cfg = self.config
        target = cfg.target_layers
        fr, tr = select_rows(frozen_hidden, retain_mask, target), select_rows(trained_hidden, retain_mask, target)
        fh, th = select_rows(frozen_hidden, harmful_sel, target), select_rows(trained_hidden, harmful_sel, target)
        retain, reroute = circuit_breaker_terms(tr.states, fr.states, th.states, fh.states)
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
        benign, harmful, dissim = repbend_terms(tb.states, fb.states, th.states, fh.states, harmful_sample, num_harmful)
        a, b, g = cfg.alpha.at(progress), cfg.beta.at(progress), cfg.gamma.at(progress)
        metrics.update(
            loss_benign_distance=float(benign.detach()), loss_harmful_distance=float(harmful.detach()),
            loss_harmful_dissimilarity=float(dissim.detach()), coef_benign=a, coef_harmful=b, coef_dissimilarity=g,
        )
        return a * benign - b * harmful + g * dissim
