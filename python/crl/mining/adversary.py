"""The paper's adversarial hard negatives: a module in the residual stream that makes the model comply.

As in the reference code (samuelsimko/crl-llm-defense, methods/triplet/attack.py and trainer.py):

- The adversary is a linear map plus bias, `Linear(d, d)` with its weight initialised at the identity
  and its bias at 1e-7, inserted after decoder layer `layer`, whose output becomes h + W h + b (so at
  initialisation the residual stream there is doubled).
- Every `module_refresh_micro_batches` micro-batches (the reference: 40; the first at the 40th) a
  new module is inserted after a decoder layer drawn uniformly from `module_layers` (the reference:
  0-9 of 32) and trained for up to `module_iterations` iterations (1100), one harmful-pool sample each
  (drawn without replacement), with a new Adam (lr 1e-4) on the cross-entropy of the harmful response
  under the current defended model (adapter on, LoRA weights frozen for it), stopping early once the
  mean of the last `module_stop_window` (100) losses is below `module_stop_loss` (1.85). At every
  later micro-batch it trains `module_step_iterations` (1) more iteration(s) the same way; before
  the first module there is no adversary.
- With probability `module_probability` (0.25), and only while the mean of its last
  `module_success_window` (10) losses is below `module_success_loss` (3), the harmful batch runs
  through the attacked model, and those states become the harmful anchors and the centroid
  (`module_combine = "replace"`; `"join"` adds them to the clean anchors instead).

Departures from the reference, for reproducibility: every draw (layer, samples, gate) comes from a
generator seeded by (run seed, micro-batch), not the global RNG; the module and its loss history are
checkpointed, so a resumed run continues exactly. Under several processes each rank trains the same
module on the same samples, the early-stopping decision uses the mean loss over ranks (one small
all-reduce per iteration), and rank 0's weights are broadcast after each training call.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from crl.data import collate
from crl.mining.config import RefinementConfig
from crl.mining.refinement import response_cross_entropy
from crl.models import decoder_layers, first_tensor, hidden_size, num_hidden_layers, replace_first_tensor

if TYPE_CHECKING:
    from crl.training.distributed import DistributedContext


class AdversaryModule(nn.Module):
    """h -> h + W h + b after one decoder layer (W = I, b = 1e-7 at initialisation), optionally bounded."""

    def __init__(self, hidden: int, *, max_relative_norm: float | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=True)
        with torch.no_grad():
            nn.init.eye_(self.linear.weight)
            nn.init.constant_(self.linear.bias, 1e-7)
        self.max_relative_norm = max_relative_norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        change = self.linear(h.to(self.linear.weight.dtype))
        if self.max_relative_norm is not None:
            # at most max_relative_norm ||h|| per token (off in the paper's setting)
            scale = (self.max_relative_norm * h.float().norm(dim=-1, keepdim=True)
                     / change.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
            change = change * scale.to(change.dtype)
        return h + change.to(h.dtype)


class ModuleAdversary:
    """Owns the adversary module, its schedule and its training (see the module docstring)."""

    def __init__(self, config: RefinementConfig, model: torch.nn.Module, examples: Sequence[Any], pad_token_id: int,
                 *, seed: int = 0, device: torch.device | str = "cpu", amp: Callable[[], Any] | None = None,
                 dist: DistributedContext | None = None) -> None:
        self.config = config
        self.examples = examples
        self.pad_token_id = pad_token_id
        self.seed = int(seed)
        self.device = torch.device(device)
        self.amp = amp or nullcontext
        self.dist = dist
        self.hidden = hidden_size(model)
        depth = num_hidden_layers(model)
        low, high = config.module_layers if config.module_layers is not None else (0, max(1, round(10 * depth / 32)))
        if high > depth:
            raise ValueError(f"refinement.module_layers: decoder layers 0-{depth - 1} exist, got [{low}, {high})")
        self.layer_range = (int(low), int(high))
        self.module: AdversaryModule | None = None
        self.layer = -1
        self.losses: list[float] = []
        """Every training loss of the adversary, across refreshes as in the reference (the success
        gate reads the last few)."""
        self.micro_batches = 0
        """Micro-batches seen (the refresh schedule counts them, as the reference does)."""

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 7, *[int(k) for k in keys]])

    # --- the schedule --------------------------------------------------------------------------

    def before_micro_batch(self, model: torch.nn.Module) -> dict[str, Any]:
        """Refresh or step the module as the schedule says (called once per micro-batch, before the
        loss); returns its metrics."""
        cfg = self.config
        t0 = time.perf_counter()
        self.micro_batches += 1
        index = self.micro_batches  # 1-based, as the reference's step counter: the first module at 40
        values: dict[str, Any] = {}
        losses: list[float] = []
        if index % cfg.module_refresh_micro_batches == 0:
            rng = self._rng(1, index)
            self.layer = int(rng.integers(*self.layer_range))
            self.module = AdversaryModule(self.hidden, max_relative_norm=cfg.module_max_relative_norm).to(self.device)
            losses = self._train(model, cfg.module_iterations, rng)
        elif self.module is not None and cfg.module_step_iterations > 0:
            losses = self._train(model, cfg.module_step_iterations, self._rng(2, index))
        if losses:
            values["adversary_loss"] = losses[-1]
            values["adversary_iterations"] = float(len(losses))
        values["adversary_layer"] = float(self.layer)
        values["seconds_adversary"] = time.perf_counter() - t0
        return values

    def use_now(self) -> bool:
        """Whether this micro-batch's harmful states come from the attacked model: with probability
        `module_probability`, and only while the module succeeds (its recent losses are low)."""
        cfg = self.config
        if self.module is None or not self.losses:
            return False
        succeeding = float(np.mean(self.losses[-cfg.module_success_window:])) < cfg.module_success_loss
        draw = self._rng(3, self.micro_batches).random()
        return succeeding and draw < cfg.module_probability

    # --- the module in the model -----------------------------------------------------------------

    @contextmanager
    def installed(self, model: torch.nn.Module) -> Iterator[None]:
        """While inside, decoder layer `layer`'s output goes through the module."""
        assert self.module is not None
        module = self.module

        def hook(mod, args, output):
            return replace_first_tensor(output, module(first_tensor(output)))

        handle = decoder_layers(model)[self.layer].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    def _train(self, model: torch.nn.Module, iterations: int, rng: np.random.Generator) -> list[float]:
        """Train the module for up to `iterations` iterations, one harmful sample each (drawn without
        replacement), with a new Adam; the model's own weights get no gradient."""
        cfg = self.config
        assert self.module is not None
        order = rng.permutation(len(self.examples))[: min(iterations, len(self.examples))]
        params = list(self.module.parameters())
        optimizer = torch.optim.Adam(params, lr=cfg.module_lr)
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        was_training = model.training
        model.train(False)
        losses: list[float] = []
        patience = min(cfg.module_stop_window, len(order))
        try:
            with self.installed(model):
                for i, index in enumerate(order.tolist()):
                    batch = collate([self.examples[index]], self.pad_token_id).to(self.device)
                    optimizer.zero_grad(set_to_none=True)
                    with self.amp():
                        loss = response_cross_entropy(model, batch.input_ids, batch.attention_mask,
                                                      batch.response_mask, padded=batch.padded).mean()
                    if not torch.isfinite(loss):  # the reference skips such a step
                        continue
                    loss.backward()
                    optimizer.step()
                    losses.append(self._agreed(float(loss.detach())))
                    if i >= patience - 1 and np.mean(losses[-patience:]) < cfg.module_stop_loss:
                        break
        finally:
            for p in frozen:
                p.requires_grad_(True)
            model.train(was_training)
        if self.dist is not None:
            self._broadcast_module()
        self.losses.extend(losses)
        return losses

    def _agreed(self, loss: float) -> float:
        """The loss every rank acts on: the mean over ranks (one process: the loss itself)."""
        return loss if self.dist is None else self.dist.total(loss) / self.dist.world_size

    def _broadcast_module(self) -> None:
        assert self.dist is not None and self.module is not None
        self.dist.broadcast_parameters(list(self.module.parameters()))

    # --- the attacked states ---------------------------------------------------------------------

    def attacked_states(self, capture: Callable[[], dict[int, torch.Tensor]], model: torch.nn.Module) -> dict[int, torch.Tensor]:
        """`capture()` (a trained-model pass) with the module installed; the module gets no gradient."""
        assert self.module is not None
        for p in self.module.parameters():
            p.requires_grad_(False)
        try:
            with self.installed(model):
                return capture()
        finally:
            for p in self.module.parameters():
                p.requires_grad_(True)

    # --- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"layer": self.layer, "micro_batches": self.micro_batches,
                                 "losses": torch.tensor(self.losses, dtype=torch.float64)}
        if self.module is not None:
            state.update({f"module.{k}": v.detach().cpu() for k, v in self.module.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layer = int(state["layer"])
        self.micro_batches = int(state["micro_batches"])
        self.losses = [float(x) for x in torch.as_tensor(state["losses"]).tolist()]
        weights = {k[len("module."):]: v for k, v in state.items() if k.startswith("module.")}
        if weights:
            self.module = AdversaryModule(self.hidden, max_relative_norm=self.config.module_max_relative_norm).to(self.device)
            self.module.load_state_dict(weights)
        else:
            self.module = None


__all__ = ["AdversaryModule", "ModuleAdversary"]
