"""Circuit Breakers (representation rerouting, Zou et al., arXiv 2406.04313), as a baseline.

L = c_ret * mean ||h'_R - h_R|| + c_rr * mean relu(cos(h'_H, h_H)) on the target layers, where R is
every token of the benign sequences and H the harmful pool's selected tokens; c_rr = coefficient *
(1 - t) and c_ret = coefficient * t, with t going from 0 to 1/2 over training (the paper's schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from crl.config import Schedule
from crl.losses.objectives import circuit_breaker_terms
from crl.methods.base import Method, StepStates
from crl.methods.baseline_frame import in_baseline_frame


@dataclass
class CircuitBreakersConfig:
    """`[loss.circuit_breakers]`."""

    coefficient: Schedule = field(default_factory=lambda: Schedule(0.5))
    """alpha of the paper: c_rr = coefficient (1 - t), c_ret = coefficient t."""


class CircuitBreakersMethod(Method):
    name: ClassVar[str] = "circuit_breakers"
    Config: ClassVar[type] = CircuitBreakersConfig

    def loss(self, states: StepStates, progress: float, metrics: dict[str, Any]) -> torch.Tensor:
        ctx, rows = self.context, states.rows
        target = self.loss_config.target_layers
        retain_rows = rows.benign_tokens
        assert retain_rows is not None
        fr, tr = ctx.select(states.frozen, retain_rows, target), ctx.select(states.trained, retain_rows, target)
        fh, th = ctx.select(states.frozen, rows.harmful, target), ctx.select(states.trained, rows.harmful, target)
        tr_s, fr_s, th_s, fh_s = in_baseline_frame(ctx, self.loss_config.baseline_frame, tr.states, fr.states,
                                                   th.states, fh.states, retain_rows.total + rows.harmful.total)
        retain, reroute = circuit_breaker_terms(tr_s, fr_s, th_s, fh_s)
        t = 0.5 * progress
        coefficient = self.config.coefficient.at(progress)
        c_ret, c_rr = coefficient * t, coefficient * (1.0 - t)
        metrics.update(loss_retain=retain.detach(), loss_reroute=reroute.detach(), coef_retain=c_ret, coef_reroute=c_rr)
        return c_ret * retain + c_rr * reroute


__all__ = ["CircuitBreakersConfig", "CircuitBreakersMethod"]
