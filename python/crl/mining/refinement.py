"""Adversarial refinement: the harmful samples owning the hardest negatives are attacked before they
enter the loss, and their attacked states join the harmful anchors.

The attack is `crl.attacks.latent.ResidualPerturbation` (one implementation for training and
evaluation): a perturbation of hidden state l (crl numbering; ``kind = "embedding"`` uses hidden
state 0, the input embeddings as the first decoder layer receives them) on the prompt tokens (all
tokens before the response), initialised at zero, kept in fp32, projected after every step onto the
bound (L2 <= eps ||h|| or L-infinity <= eps rms(h), relative to the clean states of the batch), and
optimised by Adam to minimise the cross-entropy of the harmful response under the current defended
model (adapter on, eval mode; gradients go to the perturbation only, never to the LoRA weights).

Persistence: one *universal* perturbation per attackable layer ([1, 1, d], shared by all samples)
with its own Adam, both kept across refreshes and micro-batches, since the attacked samples change
every micro-batch: a per-sample delta would need [pool, T, d] fp32 state plus Adam moments (for
SmolLM2 and 1000 samples of 96 tokens, 0.7 GB; for an 8B model 5 GB), and most of it would be stale
by the next visit. The universal delta is the attack that works for the harmful region as a whole,
refined a few steps at a time as the defence moves (like a universal adversarial perturbation).
Before it is applied to a new batch it is projected onto that batch's bound (in place).
With ``persistence = "per_sample"`` each attacked micro-batch instead gets a fresh per-token delta
([B, T, d], from zero, with its own Adam) and `steps` Adam steps: the attack the evaluation runs
(`crl.attacks.latent.LatentAttack`), at `steps` extra forward and backward passes of the attacked
samples per micro-batch; nothing of it persists, so the checkpoint holds only the universal state.

Schedule: every `refresh_every` optimizer steps (at the first micro-batch of that step) the
perturbation gets `steps` Adam steps; the attacked layer is drawn from `layers` once per refresh
period; a micro-batch uses the attack with probability `probability`. Every draw comes from a
generator seeded by (run seed, step, micro-batch), never from the global RNG, so the schedule is a
pure function of the step. The perturbations, their Adam states and the last refresh step are saved
in every checkpoint (`state_dict`), so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from crl.attacks.latent import ResidualPerturbation
from crl.data import Batch, collate
from crl.data.encoding import EncodedExample
from crl.losses.objectives import RowIndex
from crl.models import capture_hidden_states, hidden_size, num_hidden_layers, unwrap_model
from crl.mining.config import RefinementConfig

if TYPE_CHECKING:
    from crl.training.distributed import DistributedContext


@dataclass
class Refined:
    trained: dict[int, torch.Tensor]
    """{layer: [B, T, d]} states of the attacked samples under the trained model (grad to LoRA)."""
    frozen: dict[int, torch.Tensor]
    """{layer: [B, T, d]} clean states under the frozen model (no grad)."""
    selection: torch.Tensor
    """[B, T] bool: the tokens that enter the loss."""
    sample_ids: torch.Tensor
    """[B] int64 (host): harmful-pool indices of the attacked samples."""
    values: dict[str, Any] = field(default_factory=dict)
    """The metrics as computed: 0-dim device tensors (attack losses, relative norm) and host floats."""
    rows: RowIndex | None = None
    """`selection` as flat row indices on the device (built on the host)."""

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics as host floats (one device read)."""
        from crl.training.metrics import read_values

        return read_values([self.values])[0][0]


def hardest_owners(pools: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], n: int) -> list[int]:
    """Up to n distinct sample ids owning the hardest negatives, taken in turn from each pool.

    `pools`: per pool (benign anchors' negatives, harmful anchors' negatives), (owners, scores) arrays
    of the top-1 negatives (any shape; id -1 ignored). Each pool is ranked by its own scores (best
    first, ties to the smaller id), then the pools give one owner each in turn: the two pools'
    similarities are not on one scale (benign-to-queue scores run lower than harmful-to-bank ones,
    which would otherwise nearly always win)."""
    ranked_pools = []
    for pool in pools:
        best: dict[int, float] = {}
        for owners, scores in pool:
            for o, sc in zip(np.asarray(owners).reshape(-1).tolist(), np.asarray(scores).reshape(-1).tolist()):
                if o >= 0 and np.isfinite(sc) and sc > best.get(o, -np.inf):
                    best[o] = sc
        ranked_pools.append([o for o, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))])
    chosen: list[int] = []
    position = [0] * len(ranked_pools)
    while len(chosen) < n and any(p < len(r) for p, r in zip(position, ranked_pools)):
        for i, ranked in enumerate(ranked_pools):
            while position[i] < len(ranked) and ranked[position[i]] in chosen:
                position[i] += 1
            if position[i] < len(ranked) and len(chosen) < n:
                chosen.append(ranked[position[i]])
                position[i] += 1
    return chosen


def response_targets(input_ids: torch.Tensor, response_mask: torch.Tensor) -> tuple[RowIndex, torch.Tensor]:
    """The positions that predict a response token (a `RowIndex` over [B, T]) and the token each one
    predicts [N]. Build them from host tensors: from device ones they cost a device-to-host copy."""
    predicting = torch.zeros_like(response_mask, device="cpu")
    predicting[:, :-1] = response_mask[:, 1:].detach().cpu()
    rows = RowIndex.from_mask(predicting)
    targets = input_ids.detach().cpu().reshape(-1).index_select(0, rows.flat + 1)
    return rows, targets


def response_cross_entropy(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_mask: torch.Tensor, *, targets: tuple[RowIndex, torch.Tensor] | None = None,
                           padded: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy of the response tokens [B] (logits only at the predicting positions).
    `targets`: `response_targets` of the batch, on its device (else computed here, through the host)."""
    if targets is None:
        rows, tokens = response_targets(input_ids, response_mask)
        rows, tokens = rows.to(input_ids.device), tokens.to(input_ids.device)
    else:
        rows, tokens = targets
    last = num_hidden_layers(model)
    hidden = capture_hidden_states(model, input_ids, attention_mask, [last], padded=padded)[last]  # after the final norm
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.flat)
    logits = unwrap_model(model).get_output_embeddings()(states).float()
    ce = torch.nn.functional.cross_entropy(logits, tokens, reduction="none")
    batch = input_ids.shape[0]
    sums = torch.zeros(batch, device=ce.device).index_add(0, rows.row_sample, ce)
    counts = torch.zeros(batch, device=ce.device).index_add(0, rows.row_sample, torch.ones_like(ce)).clamp_min(1)
    return sums / counts


class AdversarialRefiner:
    """Owns the persistent perturbations and their optimisers (see the module docstring)."""

    def __init__(
        self,
        config: RefinementConfig,
        model: torch.nn.Module,
        examples: Sequence[Any],
        pad_token_id: int,
        select_tokens: Callable[[Any], torch.Tensor],
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
        amp: Callable[[], Any] | None = None,
        benign_examples: Sequence[Any] | None = None,
    ) -> None:
        self.config = config
        self.examples = examples
        self.benign_examples = benign_examples
        """Benign-pool samples with `refusal_text` as their response (`benign_perturbation = "refusal"`)."""
        self.pad_token_id = pad_token_id
        self.select_tokens = select_tokens
        self.seed = int(seed)
        self.device = torch.device(device)
        self.amp = amp or nullcontext
        n = num_hidden_layers(model)
        if config.kind == "embedding":
            self.layers = [0]
        else:
            low, high = config.layers
            if high >= n:
                raise ValueError(f"refinement.layers: hidden states up to {n - 1} can be perturbed (the model has {n} decoder layers), got {config.layers}")
            self.layers = list(range(low, high + 1))
        self.hidden = d = hidden_size(model)
        self.perturbations = {
            l: ResidualPerturbation(l, 1, 1, d, eps=config.eps, norm=config.norm, shape="universal", device=self.device)
            for l in self.layers
        }
        self.optimizers = {l: p.make_optimizer(lr=1e-3) for l, p in self.perturbations.items()}
        self.last_refresh_step = -1
        self.benign_perturbations: dict[int, ResidualPerturbation] = {}
        self.benign_optimizers: dict[int, torch.optim.Optimizer] = {}
        if config.benign_invariance > 0 and config.benign_perturbation in ("refusal", "triplet"):
            if config.benign_perturbation == "refusal" and benign_examples is None:
                raise ValueError('refinement.benign_perturbation = "refusal" needs the benign samples (benign_examples)')
            self.benign_perturbations = {
                l: ResidualPerturbation(l, 1, 1, d, eps=config.eps, norm=config.norm, shape="universal", device=self.device)
                for l in self.layers
            }
            self.benign_optimizers = {l: p.make_optimizer(lr=1e-3) for l, p in self.benign_perturbations.items()}
        self.last_benign_refresh_step = -1

    # --- the schedule (pure functions of the step) -------------------------------------------------

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *[int(k) for k in keys]])

    def use_at(self, step: int, micro: int) -> bool:
        if step < self.config.start_step:
            return False
        p = self.config.probability
        return p >= 1.0 or (p > 0.0 and self._rng(1, step, micro).random() < p)

    def layer_at(self, step: int) -> int:
        if len(self.layers) == 1:
            return self.layers[0]
        period = step // self.config.refresh_every
        return int(self.layers[self._rng(2, period).integers(len(self.layers))])

    def refresh_due(self, step: int) -> bool:
        return self._refresh_due(step, self.last_refresh_step)

    def _refresh_due(self, step: int, last_refresh_step: int) -> bool:
        return step % self.config.refresh_every == 0 and step != last_refresh_step

    # --- the attack --------------------------------------------------------------------------------

    def refine(self, model: torch.nn.Module, sample_ids: Sequence[int], step: int, layers: Sequence[int]) -> Refined:
        """Attack `sample_ids` (harmful-pool indices) and return their states at `layers`."""
        t0 = time.perf_counter()
        cfg = self.config
        attacked = self._attack_batch(self.examples, sample_ids)
        assert attacked.host is not None  # collated on the host by _attack_batch
        host_selection = self.select_tokens(attacked.host)
        selection = self._to_device(host_selection)
        rows = RowIndex.from_mask(host_selection).to(self.device, non_blocking=True)
        batch, prompt_rows = attacked.batch, attacked.prompt_rows
        attn = batch.attention_mask
        layer = self.layer_at(step)
        per_sample = cfg.persistence == "per_sample"
        pert, opt, attack_now = self._perturbation(layer, batch.input_ids.shape, attacked.prompt, step)
        values: dict[str, Any] = {"attack_layer": float(layer), "attack_samples": float(len(sample_ids))}
        losses, adam_steps = self._attack(model, pert, opt, attacked, layer, attack=attack_now,
                                          budget=cfg.step_budget, min_steps=cfg.steps)
        if attack_now:
            if not per_sample:
                self.last_refresh_step = step
            values["attack_loss_start"] = losses[0]
            values["attack_loss"] = losses[-1]
            if cfg.max_steps is not None:
                values["attack_steps"] = float(adam_steps)
        # The attacked states (grad to LoRA, not to the perturbation), and the clean frozen ones.
        pert.delta.requires_grad_(False)
        try:
            with pert.install(model), self.amp():
                trained = capture_hidden_states(model, batch.input_ids, attn, layers, padded=batch.padded)
        finally:
            pert.delta.requires_grad_(True)
        with torch.no_grad(), model.disable_adapter(), self.amp():
            frozen = capture_hidden_states(model, batch.input_ids, attn, layers, padded=batch.padded)
        rel = pert.relative_norm()
        values["attack_rel_norm"] = rel.reshape(-1).index_select(0, prompt_rows.flat).max() if attacked.has_prompt else 0.0
        values["seconds_refinement"] = time.perf_counter() - t0
        ids = torch.as_tensor(list(sample_ids), dtype=torch.int64)
        return Refined(trained, frozen, selection, ids, values, rows)

    def refine_benign(self, model: torch.nn.Module, sample_ids: Sequence[int], step: int) -> dict[str, Any]:
        """`benign_perturbation = "refusal"`: when a refresh is due, `steps` Adam steps on the benign
        universal perturbation of this step's layer, lowering the cross-entropy of `refusal_text` after
        the prompts of benign-pool samples `sample_ids` under the defended model (eval mode; gradient to
        the perturbation only). Under several processes every rank passes the same (global) ids, so the
        perturbation stays identical. Returns the attack's metrics ({} when no refresh is due)."""
        if not self._benign_refresh_due(step):
            return {}
        assert self.benign_examples is not None
        losses = self._attack_benign(model, self._attack_batch(self.benign_examples, sample_ids), step)
        return {"benign_attack_loss_start": losses[0], "benign_attack_loss": losses[-1]}

    def refine_benign_triplet(self, model: torch.nn.Module, benign: Batch, step: int,
                              objective: Callable[[], torch.Tensor],
                              dist: DistributedContext | None = None) -> dict[str, Any]:
        """`benign_perturbation = "triplet"`: when a refresh is due, `steps` Adam steps on the benign
        universal perturbation of this step's layer (on the prompt tokens of `benign`, the micro-batch's
        benign samples, within the bound of their clean states) lowering `objective()`, which the loss
        computes with the perturbation installed: the negated benign gap (crl.methods.crl), so that the
        perturbation moves the benign states toward the harmful centroid and away from their frozen
        states in the loss's own frame. Under several processes (`dist`) each rank attacks its own benign
        samples: the objective (each rank's share of the global mean) and its gradient are summed over
        ranks, and the bound and the step size come from every rank's clean states, so every rank
        takes the same steps and keeps the same perturbation.
        Returns the attack's metrics: the gap (the negated objective) at the first and the last Adam
        step ({} when no refresh is due)."""
        if not self._benign_refresh_due(step):
            return {}
        prompt = benign.attention_mask.bool() & ~benign.response_mask.bool()
        # Already on the device: no host copy, and every benign sample has a prompt (its chat turn).
        attacked = _AttackBatch(host=None, batch=benign, prompt=prompt, prompt_rows=RowIndex.from_mask(prompt),
                                has_prompt=True, targets=None)
        losses = self._attack_benign(model, attacked, step, objective=objective, dist=dist)
        return {"benign_attack_gap_start": -losses[0], "benign_attack_gap": -losses[-1]}

    def _benign_refresh_due(self, step: int) -> bool:
        return bool(self.benign_perturbations) and self.config.steps > 0 and \
            self._refresh_due(step, self.last_benign_refresh_step)

    def _attack_benign(self, model: torch.nn.Module, attacked: _AttackBatch, step: int,
                       objective: Callable[[], torch.Tensor] | None = None,
                       dist: DistributedContext | None = None) -> list[torch.Tensor]:
        """Exactly `steps` Adam steps (no early stop) on the benign universal perturbation of this
        step's layer, fitted to `attacked`; the refresh recorded. Returns the losses seen."""
        steps = self.config.steps
        layer = self.layer_at(step)
        pert, opt = self.benign_perturbations[layer], self.benign_optimizers[layer]
        self._resize_universal(pert, opt, attacked.batch.input_ids.shape, attacked.prompt)
        try:
            losses, _ = self._attack(model, pert, opt, attacked, layer, attack=True, budget=steps, min_steps=steps,
                                     objective=objective, dist=dist)
        finally:
            pert.delta.requires_grad_(False)
        self.last_benign_refresh_step = step
        return losses

    @contextmanager
    def universal_installed(self, model: torch.nn.Module, batch: Batch, step: int) -> Iterator[None]:
        """While inside, `model` gets a copy of this step's universal perturbation (as last projected,
        onto the attacked batch's bound) on the prompt tokens of `batch`, without gradient: the pass
        of `benign_invariance`. The harmful attack's perturbation (`benign_perturbation = "shared"`,
        call after `refine` at the same step) or the benign one (`"refusal"`, after `refine_benign`;
        `"triplet"`, after `refine_benign_triplet`)."""
        if self.config.persistence != "universal":
            raise ValueError("refinement.benign_invariance: needs persistence = 'universal'")
        layer = self.layer_at(step)
        source = self.benign_perturbations or self.perturbations
        batch_size, seq_len = batch.input_ids.shape
        prompt = batch.attention_mask.bool() & ~batch.response_mask.bool()
        pert = ResidualPerturbation(layer, batch_size, seq_len, self.hidden, eps=self.config.eps, norm=self.config.norm,
                                    shape="universal", mask=prompt, device=self.device)
        with torch.no_grad():
            pert.delta.copy_(source[layer].delta.detach())
        pert.delta.requires_grad_(False)
        with pert.install(model):
            yield

    def _attack_batch(self, examples: Sequence[Any], sample_ids: Sequence[int]) -> _AttackBatch:
        """The samples collated, and everything the host needs to know about them computed on the CPU
        batch, before it goes to the device (no synchronisation): the prompt positions, the targets."""
        host = collate([examples[i] for i in sample_ids], self.pad_token_id)
        host_prompt = host.attention_mask.bool() & ~host.response_mask
        pred_rows, pred_tokens = response_targets(host.input_ids, host.response_mask)
        return _AttackBatch(
            host=host, batch=self._to_device(host), prompt=self._to_device(host_prompt),
            prompt_rows=RowIndex.from_mask(host_prompt).to(self.device, non_blocking=True),
            has_prompt=bool(host_prompt.any()),
            targets=(pred_rows.to(self.device, non_blocking=True), self._to_device(pred_tokens)),
        )

    def _attack(self, model: torch.nn.Module, pert: ResidualPerturbation, opt: torch.optim.Optimizer,
                attacked: _AttackBatch, layer: int, *, attack: bool, budget: int, min_steps: int,
                objective: Callable[[], torch.Tensor] | None = None,
                dist: DistributedContext | None = None) -> tuple[list[torch.Tensor], int]:
        """Project `pert` onto the bound of the batch's clean states at `layer` (defended model, eval
        mode) and, when `attack`, take up to `budget` Adam steps lowering the response cross-entropy
        (or `objective()`, computed with the perturbation installed; with `dist`, a rank's share, summed
        over processes with its gradient, the bound and the step size taken over every rank's batch),
        stopping once past `min_steps` when it is below `stop_loss`. Returns the losses seen (device
        tensors, read with the step's metrics) and the Adam steps taken. Leaves the delta requiring
        grad when it attacked."""
        cfg = self.config
        batch, attn = attacked.batch, attacked.batch.attention_mask
        losses: list[torch.Tensor] = []
        adam_steps = 0
        was_training = model.training
        try:
            model.train(False)
            with torch.no_grad(), self.amp():
                clean = capture_hidden_states(model, batch.input_ids, attn, [layer], padded=batch.padded)[layer].float()
            clean_norm = clean.norm(dim=-1)  # [B, T]
            prompt_norms = clean_norm.reshape(-1).index_select(0, attacked.prompt_rows.flat)
            if dist is not None:  # the universal bound (smallest prompt norm) over every rank's batch
                low = prompt_norms.min() if attacked.has_prompt else clean_norm.new_tensor(float("inf"))
                clean_norm = torch.full_like(clean_norm, float(dist.min_(low.reshape(1))))
            pert.project_(clean_norm)
            if attack:
                # The one read of an attack: Adam's learning rate, relative to the clean states' scale,
                # is a host number for torch's Adam (a tensor lr needs capturable Adam, CUDA only).
                if dist is not None:
                    total = dist.sum_(torch.stack([prompt_norms.sum(), prompt_norms.new_tensor(float(prompt_norms.numel()))]))
                    rms = float(total[0] / total[1].clamp_min(1.0)) / pert.hidden**0.5
                else:
                    rms = float(prompt_norms.mean()) / pert.hidden**0.5 if attacked.has_prompt else 1.0
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * cfg.eps * rms
                pert.delta.requires_grad_(True)
                with pert.install(model):
                    for i in range(budget):
                        if objective is None:
                            with self.amp():
                                ce = response_cross_entropy(model, batch.input_ids, attn, batch.response_mask,
                                                            targets=attacked.targets, padded=batch.padded).mean()
                        else:
                            ce = objective()
                        value = ce.detach() if dist is None else dist.sum_(ce.detach().clone())
                        losses.append(value)
                        if i >= min_steps and float(value) < cfg.stop_loss:
                            break  # the adaptive attack succeeds with the current perturbation
                        adam_steps = i + 1
                        (grad,) = torch.autograd.grad(ce, [pert.delta])
                        if dist is not None:
                            grad = dist.sum_(grad)
                        opt.zero_grad(set_to_none=True)
                        pert.delta.grad = grad
                        opt.step()
                        pert.delta.grad = None
                        pert.project_(clean_norm)
        finally:
            model.train(was_training)
        return losses, adam_steps

    def _perturbation(self, layer: int, shape: Sequence[int], prompt: torch.Tensor, step: int):
        """(perturbation, its optimizer, whether to attack now) for a batch of `shape` [B, T]: a fresh
        per-token one (per_sample: attacked from zero, nothing persists), or the layer's universal
        one, resized to the batch with its values kept (attacked when a refresh is due)."""
        cfg = self.config
        if cfg.persistence == "per_sample":
            pert = ResidualPerturbation(layer, shape[0], shape[1], self.hidden, eps=cfg.eps, norm=cfg.norm,
                                        shape="token", mask=prompt, device=self.device)
            return pert, pert.make_optimizer(lr=1e-3), cfg.step_budget > 0
        pert, opt = self.perturbations[layer], self.optimizers[layer]
        self._resize_universal(pert, opt, shape, prompt)
        return pert, opt, self.refresh_due(step) and cfg.step_budget > 0

    @staticmethod
    def _resize_universal(pert: ResidualPerturbation, opt: torch.optim.Optimizer, shape: Sequence[int],
                          prompt: torch.Tensor) -> None:
        """A universal perturbation fitted to a batch of `shape` [B, T] and its prompt mask, its delta kept."""
        saved = pert.delta.detach().clone()
        pert.resize_(shape[0], shape[1], mask=prompt, optimizer=opt)
        with torch.no_grad():
            pert.delta.copy_(saved)  # resize_ zeroes it; the universal delta persists

    def _to_device(self, x):
        """A host tensor or batch on the device without a blocking copy (pinned on a GPU)."""
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    # --- checkpointing -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = {"last_refresh_step": self.last_refresh_step,
                 "layers": _layer_states(self.perturbations, self.optimizers)}
        if self.benign_perturbations:
            state["last_benign_refresh_step"] = self.last_benign_refresh_step
            state["benign_layers"] = _layer_states(self.benign_perturbations, self.benign_optimizers)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_refresh_step = int(state["last_refresh_step"])
        self._load_layers(state["layers"], self.perturbations, self.optimizers)
        if self.benign_perturbations:
            if "benign_layers" not in state:
                raise ValueError('refinement state has no benign perturbation (benign_perturbation = "refusal" or "triplet")')
            self.last_benign_refresh_step = int(state["last_benign_refresh_step"])
            self._load_layers(state["benign_layers"], self.benign_perturbations, self.benign_optimizers)

    def _load_layers(self, entries: dict[Any, dict[str, Any]], perturbations: dict[int, ResidualPerturbation],
                     optimizers: dict[int, torch.optim.Optimizer]) -> None:
        for l, entry in entries.items():
            l = int(l)
            if l not in perturbations:
                raise ValueError(f"refinement state has layer {l}, not in the configured range {self.layers}")
            pert = perturbations[l]
            with torch.no_grad():
                pert.delta.data = entry["delta"].to(self.device, torch.float32).clone()
            opt = pert.make_optimizer(lr=1e-3)
            opt.load_state_dict(entry["optimizer"])
            optimizers[l] = opt


@dataclass
class _AttackBatch:
    """A collated batch to attack, on the device, with what was computed about it on the host."""

    host: Batch | None
    """The batch as collated on the host (None: it came from the device, and nothing is read on the host)."""
    batch: Batch
    prompt: torch.Tensor
    """[B, T] bool on the device: the prompt tokens (what the perturbation touches)."""
    prompt_rows: RowIndex
    has_prompt: bool
    targets: tuple[RowIndex, torch.Tensor] | None
    """`response_targets` of the batch, on the device (None: the attack has its own objective)."""


def _layer_states(perturbations: dict[int, ResidualPerturbation],
                  optimizers: dict[int, torch.optim.Optimizer]) -> dict[int, dict[str, Any]]:
    """{layer: {delta, optimizer state}} of persistent perturbations, for a checkpoint."""
    return {l: {"delta": p.delta.detach().clone(), "optimizer": optimizers[l].state_dict()}
            for l, p in perturbations.items()}


def with_response_tokens(example: EncodedExample, response_ids: Sequence[int]) -> EncodedExample:
    """`example`'s prompt (everything before its response) followed by `response_ids` as the response."""
    n = example.prompt_length
    ids = list(response_ids)
    return EncodedExample(
        input_ids=list(example.input_ids[:n]) + ids, request_mask=list(example.request_mask[:n]) + [False] * len(ids),
        response_mask=[False] * n + [True] * len(ids), prompt_length=n, example_id=example.example_id,
        index=example.index,
    )


__all__ = ["AdversarialRefiner", "Refined", "hardest_owners", "response_cross_entropy", "response_targets",
           "with_response_tokens"]
