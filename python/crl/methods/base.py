"""What a training method is: a config section and a loss over the captured states of a micro-batch.

The loss step (crl.training.step.LossComputer) runs the passes, the frozen and trained hidden states
of the contrast batch at every captured layer, and hands them to the method as `StepStates`; the
method returns its loss and logs its terms. The retain KL on the retain batch is the step's (a method
only says how much it weighs, `retain_kl_weight`). Shared pieces (selecting rows, crl's layer frame,
this process's share of global means under several processes) are `MethodContext`'s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch

from crl.losses.objectives import LayerFrame, LayerRows, RowIndex, select_rows
from crl.losses.triplet import TripletOutput

if TYPE_CHECKING:
    from crl.data import Batch
    from crl.training.distributed import DistributedContext
    from crl.training.step import StepBatches, StepRows


@dataclass
class StepStates:
    """The captured states of one micro-batch, as the loss step hands them to a method."""

    frozen: dict[int, torch.Tensor]
    """Layer -> [B, T, d] states of the contrast batch with the adapter disabled (no grad)."""
    trained: dict[int, torch.Tensor]
    """Layer -> [B, T, d] states with the adapter on."""
    rows: StepRows
    """The row sets (selected benign and harmful tokens, every benign token) as flat indices."""
    layers: list[int]
    """The captured layers, in the order of the states' first dimension once selected."""
    num_benign: int
    num_harmful: int
    batches: StepBatches
    """The micro-batch itself (sample ids and schedule position, for mining)."""
    model: torch.nn.Module
    """The model with its adapter (attacks run their passes through it)."""
    trained_pass: Callable[[Batch], dict[int, torch.Tensor]]
    """Another trained-model pass at the captured layers (e.g. under an attack), as the step runs its own."""


@dataclass
class MethodContext:
    """The services a method's loss needs besides its states."""

    frame_center: bool = True
    """`loss.center_states`: crl's layer frame subtracts the frozen states' mean."""
    frame_scale: bool = True
    """`loss.normalize_layer_scale`: crl's layer frame divides by the frozen states' mean norm."""
    dist: DistributedContext | None = None
    """Several processes (None: one process)."""

    def select(self, states: dict[int, torch.Tensor], rows: RowIndex, layers: Sequence[int]) -> LayerRows:
        return select_rows(states, rows, list(layers))

    def fit_frame(self, frozen: Sequence[torch.Tensor], total: int | None = None) -> LayerFrame:
        """crl's layer frame fitted on the frozen rows [L, R, d] of every given set (over the global
        batch under several processes, where `total` is their global row count)."""
        rows = torch.cat(list(frozen), dim=1)
        if self.dist is None:
            return LayerFrame.fit(rows, center=self.frame_center, scale=self.frame_scale)
        if total is None:
            raise ValueError("fit_frame: the global row count is required under several processes")
        return self.dist.fit_frame(rows, total, center=self.frame_center, scale=self.frame_scale)

    def share(self, out: TripletOutput, rows: int, total: int) -> TripletOutput:
        """A triplet output over `rows` local rows as this process's share of the global mean."""
        return out if self.dist is None else self.dist.shard_triplet(out, rows, total)

    def row_mean(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Mean over the rows (dim 1) of [L, R, d], over the global batch under several processes
        (differentiable: every rank's rows get the gradient)."""
        return x.float().mean(dim=1) if self.dist is None else self.dist.global_row_mean(x, total)


class Method(ABC):
    """A training objective. Subclasses set `name`, `Config` (the dataclass of their `[loss.<name>]`
    section) and implement `loss`."""

    name: ClassVar[str]
    Config: ClassVar[type]
    global_shares: ClassVar[bool] = False
    """True: the loss and its logged terms are this process's shares of global means (summed over
    processes); False: local means, averaged over processes."""

    def __init__(self, loss_config: Any, config: Any, context: MethodContext) -> None:
        self.loss_config = loss_config
        """The shared `[loss]` section (layers, token selection, frame, KL temperature)."""
        self.config = config
        """This method's own section."""
        self.context = context

    def prepare(self, model: torch.nn.Module, metrics: dict[str, Any]) -> None:
        """Called once per micro-batch before its passes (e.g. to train an adversary); logs into `metrics`."""

    @abstractmethod
    def loss(self, states: StepStates, progress: float, metrics: dict[str, Any]) -> torch.Tensor:
        """The method's loss over the representation terms; logs its terms and coefficients into
        `metrics` (0-dim detached tensors and host floats)."""

    def retain_kl_weight(self, progress: float) -> float | None:
        """Weight of the retain KL at this point of training; None: the method has no KL term."""
        return None


__all__ = ["Method", "MethodContext", "StepStates"]
