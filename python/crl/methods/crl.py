"""CRL (Simko et al., arXiv 2506.11938): triplet losses on hidden states, in crl's layer frame.

- Benign triplet (benign layers): anchor h'(x), positive h(x), negative the harmful centroid of the
  layer (the trained model's harmful states, averaged over the batch), or k mined harmful vectors.
- Harmful triplet (target layers): anchor h'(x), positive the harmful centroid, negative h(x), or k
  mined vectors of other harmful samples under the frozen model; attacked harmful samples (mining's
  refinement) join the anchors.
- Loss: benign_weight * L_benign + harmful_weight * L_harmful (+ retain_kl_weight * KL, the step's).
- The paper's adversary (crl.mining.adversary): when its gate opens, the harmful rows' trained
  states come from the attacked model and replace the clean ones as anchors and in the centroid (or
  join them, `refinement.module_combine = "join"`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from crl.config import Schedule, require
from crl.losses.distances import DISTANCES
from crl.losses.objectives import LayerFrame, RowIndex, crl_benign_triplet, crl_harmful_triplet, take_layers
from crl.losses.triplet import TripletOutput
from crl.methods.base import Method, MethodContext, StepStates

if TYPE_CHECKING:
    from crl.mining.adversary import ModuleAdversary
    from crl.mining.config import MiningConfig
    from crl.mining.stage import MinedBatch, MiningStage


@dataclass
class CRLConfig:
    """`[loss.crl]`: the weights, distances and margins of CRL's two triplet terms."""

    benign_weight: Schedule = field(default_factory=lambda: Schedule(0.5))
    """Weight of the benign triplet term (the reference code's alpha)."""
    harmful_weight: Schedule = field(default_factory=lambda: Schedule(0.6))
    """Weight of the harmful triplet term (beta)."""
    retain_kl_weight: Schedule = field(default_factory=lambda: Schedule(0.7))
    """Weight of the retain KL (gamma)."""
    benign_positive_distance: str = "l2"
    benign_negative_distance: str = "cosine"
    harmful_positive_distance: str = "cosine"
    harmful_negative_distance: str = "cosine"
    mix_weight: float = 1.0
    """Weight of the cosine part of the `mix` distance."""
    benign_margin: float = 0.5
    harmful_margin: float = 0.5

    def validate(self) -> None:
        for name in ("benign_positive_distance", "benign_negative_distance", "harmful_positive_distance",
                     "harmful_negative_distance"):
            value = getattr(self, name)
            require(value in DISTANCES, name, "one of " + ", ".join(DISTANCES), value)


class CRLMethod(Method):
    name: ClassVar[str] = "crl"
    Config: ClassVar[type] = CRLConfig
    global_shares: ClassVar[bool] = True

    def __init__(self, loss_config: Any, config: CRLConfig, context: MethodContext, *,
                 mining: MiningStage | None = None, mining_config: MiningConfig | None = None,
                 adversary: ModuleAdversary | None = None) -> None:
        super().__init__(loss_config, config, context)
        self.mining = mining
        """Where mined negatives (and attacked samples) come from; None: no mining."""
        self.adversary = adversary
        """The paper's adversary module (crl.mining.adversary); None: none."""
        self.mined_terms = "add" if mining_config is None else mining_config.combine
        """`add`: mined terms (times `mined_weight`) join the batch terms; `replace`: they replace them."""
        self.mined_weight = 1.0 if mining_config is None else mining_config.weight

    def retain_kl_weight(self, progress: float) -> float | None:
        return self.config.retain_kl_weight.at(progress)

    def prepare(self, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        if self.adversary is not None:
            metrics.update(self.adversary.before_micro_batch(model))

    def loss(self, states: StepStates, progress: float, metrics: dict[str, Any]) -> torch.Tensor:
        ctx, layers, rows = self.context, states.layers, states.rows
        fb, tb = ctx.select(states.frozen, rows.benign, layers), ctx.select(states.trained, rows.benign, layers)
        fh, th = ctx.select(states.frozen, rows.harmful, layers), ctx.select(states.trained, rows.harmful, layers)
        frame = ctx.fit_frame((fb.states, fh.states), rows.benign.total + rows.harmful.total)
        fb_s, tb_s, fh_s, th_s = (frame.apply(x) for x in (fb.states, tb.states, fh.states, th.states))
        benign_idx = [layers.index(l) for l in self.loss_config.resolved_benign_layers]
        target_idx = [layers.index(l) for l in self.loss_config.target_layers]
        benign_total, harmful_total = rows.benign.total, rows.harmful.total
        attacked = self._adversary_states(states, metrics)
        attacked_s = frame.apply(attacked) if attacked is not None else None
        clean_th_s = th_s
        if attacked_s is not None and self.adversary.config.module_combine == "replace":
            th_s = attacked_s  # the attacked states are the anchors and make the centroid
        centroid = ctx.row_mean(th_s, rows.harmful.total)  # [L, d], the collapsed harmful region (carries grad)
        if attacked_s is not None:
            self._log_adversary_hardness(take_layers(clean_th_s, target_idx), take_layers(attacked_s, target_idx),
                                         take_layers(fh_s, target_idx), take_layers(centroid, target_idx), metrics)
            if self.adversary.config.module_combine == "join":
                th_s, fh_s = torch.cat([th_s, attacked_s], dim=1), torch.cat([fh_s, fh_s], dim=1)
                harmful_total += rows.harmful.total
        alpha, beta = self.config.benign_weight.at(progress), self.config.harmful_weight.at(progress)
        loss = fb_s.new_zeros((), dtype=torch.float32)
        mined = None
        if self.mining is not None:
            mined = self.mining.run(states.model, tb, th, states.batches, metrics)
            harmful_total += mined.attacked_rows  # the attacked anchors (on the main rank's share only)
            if mined.unused_attacked:
                # Other ranks than the main one: their attacked states, unused, still join the backward
                # (weight 0), so that every rank's backward runs the same passes (under FSDP each
                # layer's backward all-gathers its weights: a collective).
                loss = loss + 0.0 * sum(h.float().mean() for h in mined.unused_attacked.values())
            if mined.attacked is not None:
                fa, ta = mined.attacked
                # the attacked harmful states join the harmful anchors (the centroid stays the clean batch's)
                th_s = torch.cat([th_s, frame.apply(ta.states)], dim=1)
                fh_s = torch.cat([fh_s, frame.apply(fa.states)], dim=1)
        if benign_total > 0:
            loss_b = self._pool_loss(
                "benign", take_layers(tb_s, benign_idx), take_layers(fb_s, benign_idx), take_layers(centroid, benign_idx),
                self._negatives(mined, "benign", frame.select(benign_idx)), tb_s.shape[1], benign_total, metrics,
            )
            loss = loss + alpha * loss_b
            invariance = self._benign_invariance_weight(mined)
            if invariance > 0:
                fb_b, centroid_b = take_layers(fb_s, benign_idx), take_layers(centroid, benign_idx)

                def benign_gap(hidden: torch.Tensor) -> torch.Tensor:
                    """Mean over the benign rows [L, R_b, d] (as captured; this rank's share) of the benign
                    triplet's term without its hinge and margin, d(state, its frozen state) - d(state,
                    harmful centroid): what `benign_perturbation = "triplet"` raises. Without the hinge
                    the attack has a gradient also where every benign triplet is inactive."""
                    anchors = take_layers(frame.apply(hidden), benign_idx)
                    out = self._triplet("benign", anchors, fb_b.detach(), centroid_b.detach(), margin=GAP_MARGIN)
                    gap = dataclasses.replace(out, loss=out.loss - GAP_MARGIN)
                    return self.context.share(gap, anchors.shape[1], benign_total).loss

                perturbed_s = frame.apply(self._perturbed_benign_states(states, metrics, benign_gap))
                loss_p = self._pool_loss(
                    "benign", take_layers(perturbed_s, benign_idx), fb_b, centroid_b,
                    self._negatives(mined, "benign", frame.select(benign_idx)),
                    perturbed_s.shape[1], benign_total, metrics, label="benign_perturbed",
                )
                loss = loss + alpha * invariance * loss_p
        if harmful_total > 0:
            loss_h = self._pool_loss(
                "harmful", take_layers(th_s, target_idx), take_layers(fh_s, target_idx), take_layers(centroid, target_idx),
                self._negatives(mined, "harmful", frame.select(target_idx)), th_s.shape[1], harmful_total, metrics,
            )
            loss = loss + beta * loss_h
        metrics.update(coef_benign=alpha, coef_harmful=beta)
        return loss

    def _benign_invariance_weight(self, mined: MinedBatch | None) -> float:
        """`refinement.benign_invariance` on micro-batches the refiner attacked (0 otherwise)."""
        refiner = self.mining.refiner if self.mining is not None else None
        if mined is None or not mined.refined or refiner is None:
            return 0.0
        return float(refiner.config.benign_invariance)

    def _perturbed_benign_states(self, states: StepStates, metrics: dict[str, Any],
                                 benign_gap: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The benign rows' trained states [L, R_b, d] with the refiner's universal perturbation on
        their prompt tokens (grad to LoRA). The benign samples are the contrast batch's first rows, so
        the benign row indices select the same tokens in the benign sub-batch. `benign_gap`: what the
        `triplet` benign perturbation raises, of such states."""
        contrast, nb, batches = states.batches.contrast, states.num_benign, states.batches
        refiner, dist = self.mining.refiner, self.context.dist
        benign = contrast.rows(slice(0, nb))

        def select(hidden: dict[int, torch.Tensor]) -> torch.Tensor:
            return self.context.select(hidden, states.rows.benign, states.layers).states

        kind = refiner.config.benign_perturbation
        if kind == "refusal":  # refresh the benign perturbation on this batch first
            ids = (batches.benign_ids if batches.benign_ids is not None else torch.arange(nb)).tolist()
            if dist is not None:  # the global batch's ids: every rank runs the same attack
                ids = [i for part in dist.all_gather_object(ids) for i in part]
            metrics.update(refiner.refine_benign(states.model, ids, batches.step))
        elif kind == "triplet":  # attacked on this rank's benign samples, summed over ranks
            metrics.update(refiner.refine_benign_triplet(
                states.model, benign, batches.step, lambda: -benign_gap(select(states.trained_pass(benign))), dist))
        with refiner.universal_installed(states.model, benign, batches.step):
            hidden = states.trained_pass(benign)
        return select(hidden)

    def _adversary_states(self, states: StepStates, metrics: dict[str, Any]) -> torch.Tensor | None:
        """The harmful rows' trained states [L, R_h, d] through the attacked model when the adversary's
        gate opens this micro-batch (None otherwise)."""
        adversary = self.adversary
        if adversary is None:
            return None
        if not adversary.use_now():
            metrics["adversary_used"] = 0.0
            return None
        metrics["adversary_used"] = 1.0
        contrast, nb, rows = states.batches.contrast, states.num_benign, states.rows
        harmful = contrast.rows(slice(nb, None))
        hidden = adversary.attacked_states(lambda: states.trained_pass(harmful), states.model)
        seq = contrast.input_ids.shape[1]
        shifted = RowIndex(rows.harmful.flat - nb * seq, rows.harmful.row_sample - nb, rows.harmful.count,
                           rows.harmful.total)  # the same rows, in the harmful sub-batch
        return self.context.select(hidden, shifted, states.layers).states

    def _log_adversary_hardness(self, clean: torch.Tensor, attacked: torch.Tensor, frozen: torch.Tensor,
                                centroid: torch.Tensor, metrics: dict[str, Any]) -> None:
        """Whether the attacked anchors are harder than the clean ones: both sets' harmful-triplet
        statistics against the same centroid and frozen states (no gradient)."""
        with torch.no_grad():
            for name, anchors in (("clean", clean), ("attacked", attacked)):
                out = self._triplet("harmful", anchors.detach(), frozen.detach(), centroid.detach())
                metrics.update({f"adversary_{name}_d_pos": out.mean_positive_distance,
                                f"adversary_{name}_d_neg": out.mean_negative_distance,
                                f"adversary_{name}_active": out.active_fraction,
                                f"adversary_{name}_loss": out.loss})

    def _negatives(self, mined: MinedBatch | None, pool: str, frame: LayerFrame):
        """The pool's mined negatives per sample, on the device and in the loss's frame (None without mining)."""
        if mined is None:
            return None
        from crl.mining.stage import per_sample_negatives

        found, row_sample = (mined.benign, mined.benign_rows) if pool == "benign" else (mined.harmful, mined.harmful_rows)
        return per_sample_negatives(found, row_sample, frame, row_sample.device)

    def _pool_loss(self, pool: str, anchors: torch.Tensor, frozen: torch.Tensor, centroid: torch.Tensor,
                   mined_negatives: tuple[torch.Tensor, torch.Tensor] | None, local_rows: int, total_rows: int,
                   metrics: dict[str, Any], label: str | None = None) -> torch.Tensor:
        """One pool's triplet loss: against the batch's negatives, the mined ones, or both. `label`:
        the metrics' name for the term (default: the pool's)."""
        label = label or pool
        loss = None
        if mined_negatives is None or self.mined_terms != "replace":
            out = self.context.share(self._triplet(pool, anchors, frozen, centroid), local_rows, total_rows)
            loss = out.loss
            metrics.update({
                f"loss_{label}": out.loss.detach(), f"active_{label}": out.active_fraction.detach(),
                f"{label}_d_pos": out.mean_positive_distance.detach(), f"{label}_d_neg": out.mean_negative_distance.detach(),
            })
        if mined_negatives is not None:
            weight = 1.0 if self.mined_terms == "replace" else self.mined_weight
            out = self.context.share(self._triplet(pool, anchors, frozen, centroid, *mined_negatives), local_rows, total_rows)
            loss = weight * out.loss if loss is None else loss + weight * out.loss
            metrics.update({
                f"loss_{label}_mined": out.loss.detach(), f"active_{label}_mined": out.active_fraction.detach(),
                f"{label}_d_neg_mined": out.mean_negative_distance.detach(),
            })
        assert loss is not None
        return loss

    def _triplet(self, pool: str, anchors: torch.Tensor, frozen: torch.Tensor, centroid: torch.Tensor,
                 negatives: torch.Tensor | None = None, negative_index: torch.Tensor | None = None,
                 margin: float | None = None) -> TripletOutput:
        cfg = self.config
        if pool == "benign":
            return crl_benign_triplet(
                anchors, frozen, centroid, positive_distance=cfg.benign_positive_distance,
                negative_distance=cfg.benign_negative_distance,
                margin=cfg.benign_margin if margin is None else margin, mix_weight=cfg.mix_weight,
                extra_negatives=negatives, extra_negative_index=negative_index,
            )
        return crl_harmful_triplet(
            anchors, frozen, centroid, positive_distance=cfg.harmful_positive_distance,
            negative_distance=cfg.harmful_negative_distance, margin=cfg.harmful_margin, mix_weight=cfg.mix_weight,
            extra_negatives=negatives, extra_negative_index=negative_index,
        )


#: A margin past any distance gap of the loss's frame: with it every triplet is active, so the
#: triplet loss minus it is the mean gap d(anchor, positive) - d(anchor, negative), with the loss's
#: own distances (the benign `triplet` perturbation's objective).
GAP_MARGIN = 100.0

__all__ = ["CRLConfig", "CRLMethod"]
