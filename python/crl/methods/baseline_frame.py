"""The baselines' optional layer frame: Circuit Breakers and RepBend as published work on raw states;
with `loss.baseline_frame` they get crl's layer frame too (a like-for-like comparison)."""

from __future__ import annotations

import torch

from crl.methods.base import MethodContext


def in_baseline_frame(context: MethodContext, enabled: bool, trained_a: torch.Tensor, frozen_a: torch.Tensor,
                      trained_b: torch.Tensor, frozen_b: torch.Tensor, total: int | None = None):
    """The four [L, R, d] state sets in crl's layer frame (fitted on the frozen rows of both; `total`:
    their global row count under several processes) when `enabled`, else unchanged."""
    if not enabled:
        return trained_a, frozen_a, trained_b, frozen_b
    frame = context.fit_frame((frozen_a, frozen_b), total)
    return tuple(frame.apply(x) for x in (trained_a, frozen_a, trained_b, frozen_b))


__all__ = ["in_baseline_frame"]
