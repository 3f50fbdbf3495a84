"""RepBend (arXiv 2504.01550), as a baseline.

L = benign_distance_weight * mean ||h'_B - h_B|| - harmful_distance_weight * mean ||h'_H - h_H||
    + harmful_dissimilarity_weight * (1 - mean pairwise cos of the harmful samples' pooled states)
    (+ retain_kl_weight * KL, the step's), on the target layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from crl.config import Schedule
from crl.losses.objectives import repbend_terms
from crl.methods.base import Method, StepStates
from crl.methods.baseline_frame import in_baseline_frame


@dataclass
class RepBendConfig:
    """`[loss.repbend]`."""

    benign_distance_weight: Schedule = field(default_factory=lambda: Schedule(0.5))
    """Weight of the benign states' distance to the frozen ones (kept small)."""
    harmful_distance_weight: Schedule = field(default_factory=lambda: Schedule(0.6))
    """Weight of the harmful states' distance to the frozen ones (pushed up)."""
    harmful_dissimilarity_weight: Schedule = field(default_factory=lambda: Schedule(0.7))
    """Weight of 1 - the mean cosine among the harmful samples (pulled together)."""
    retain_kl_weight: Schedule = field(default_factory=lambda: Schedule(1.0))
    """Weight of the retain KL."""


class RepBendMethod(Method):
    name: ClassVar[str] = "repbend"
    Config: ClassVar[type] = RepBendConfig

    def retain_kl_weight(self, progress: float) -> float | None:
        return self.config.retain_kl_weight.at(progress)

    def loss(self, states: StepStates, progress: float, metrics: dict[str, Any]) -> torch.Tensor:
        ctx, rows = self.context, states.rows
        target = self.loss_config.target_layers
        fb, tb = ctx.select(states.frozen, rows.benign, target), ctx.select(states.trained, rows.benign, target)
        fh, th = ctx.select(states.frozen, rows.harmful, target), ctx.select(states.trained, rows.harmful, target)
        harmful_sample = th.row_sample - states.num_benign
        tb_s, fb_s, th_s, fh_s = in_baseline_frame(ctx, self.loss_config.baseline_frame, tb.states, fb.states,
                                                   th.states, fh.states, rows.benign.total + rows.harmful.total)
        benign, harmful, dissim = repbend_terms(tb_s, fb_s, th_s, fh_s, harmful_sample, states.num_harmful)
        cfg = self.config
        a, b, g = (cfg.benign_distance_weight.at(progress), cfg.harmful_distance_weight.at(progress),
                   cfg.harmful_dissimilarity_weight.at(progress))
        metrics.update(
            loss_benign_distance=benign.detach(), loss_harmful_distance=harmful.detach(),
            loss_harmful_dissimilarity=dissim.detach(), coef_benign=a, coef_harmful=b, coef_dissimilarity=g,
        )
        return a * benign - b * harmful + g * dissim


__all__ = ["RepBendConfig", "RepBendMethod"]
