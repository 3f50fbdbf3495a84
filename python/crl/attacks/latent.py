"""Latent-space attack: a bounded perturbation of the residual stream at one layer.

`ResidualPerturbation` adds a learnable delta to hidden state ``layer`` (crl's numbering: hidden
state l = ``hidden_states[l]``; 0 = the embeddings fed to decoder layer 0, l >= 1 = the output of
decoder layer l - 1). It is used twice:

- by `LatentAttack` at evaluation time (a stronger budget than in training), and
- by the adversarial refinement of training (hardest harmful samples attacked before they enter the
  loss). For that use the delta starts at zero, is kept in fp32 whatever the model's dtype, is
  projected after each optimiser step onto an L2 ball of radius ``eps * ||h||`` per token (relative
  to the clean hidden norm, measured in the same forward pass) or onto an L-infinity box of
  half-width ``eps * rms(h)`` per token, and the caller owns the optimiser (`make_optimizer`), so
  that Adam's moments persist across calls; `state_dict()` / `load_state_dict()` carry the delta.

Shapes: ``"token"`` ([B, T, d], one delta per position), ``"sequence"`` ([B, 1, d], broadcast over
positions) or ``"universal"`` ([1, 1, d], shared by the batch). A token mask [B, T] restricts where
the delta is added (e.g. the request tokens only). During generation with a KV cache the delta is
added in the prefill pass (whose length equals the mask's) and not to the generated tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from crl.attacks.base import (DEFAULT_TARGET, AttackPrompt, AttackResult, Timer, build_layout, greedy_from_ids,
                              model_device, progress_iter, target_loss_from_logits)
from crl.models import first_tensor, replace_first_tensor  # the readers of a decoder layer's output


class ResidualPerturbation(nn.Module):
    """A learnable, bounded additive perturbation of hidden state ``layer`` (see the module docstring).

    Parameters
    ----------
    layer: hidden-state index (0 = embeddings, l >= 1 = output of decoder layer l - 1).
    batch, seq_len, hidden: the delta's extent ([batch, seq_len, hidden] for shape "token").
    eps: the radius, relative to the clean hidden state (see `norm`).
    norm: "l2" (ball of radius eps * ||h_t|| per token) or "linf" (box of half-width eps * rms(h_t)).
    shape: "token", "sequence" or "universal".
    mask: [batch, seq_len] (bool/0-1) positions that receive the delta; None = all.
    """

    def __init__(self, layer: int, batch: int, seq_len: int, hidden: int, *, eps: float = 0.1, norm: str = "l2",
                 shape: str = "token", mask: torch.Tensor | None = None, device: Any = None):
        super().__init__()
        if norm not in ("l2", "linf"):
            raise ValueError(f"ResidualPerturbation: norm must be 'l2' or 'linf', got {norm!r}")
        if shape not in ("token", "sequence", "universal"):
            raise ValueError(f"ResidualPerturbation: shape must be token, sequence or universal, got {shape!r}")
        if eps < 0:
            raise ValueError("ResidualPerturbation: eps must be >= 0")
        self.layer = int(layer)
        self.eps = float(eps)
        self.norm = norm
        self.shape = shape
        self.hidden = int(hidden)
        self.delta = nn.Parameter(torch.zeros(self._delta_shape(batch, seq_len), dtype=torch.float32, device=device))
        self.register_buffer("mask", torch.ones(batch, seq_len, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("clean_norm", torch.zeros(batch, seq_len, dtype=torch.float32, device=device), persistent=False)
        self.batch, self.seq_len = batch, seq_len
        if mask is not None:
            self.set_mask(mask)
        self.enabled = True

    def _delta_shape(self, batch: int, seq_len: int) -> tuple[int, int, int]:
        if self.shape == "token":
            return (batch, seq_len, self.hidden)
        if self.shape == "sequence":
            return (batch, 1, self.hidden)
        return (1, 1, self.hidden)

    # -- state --------------------------------------------------------------------------------

    def set_mask(self, mask: torch.Tensor) -> None:
        if tuple(mask.shape) != (self.batch, self.seq_len):
            raise ValueError(f"mask shape {tuple(mask.shape)} != ({self.batch}, {self.seq_len})")
        self.mask = mask.to(device=self.delta.device, dtype=torch.float32)

    @torch.no_grad()
    def resize_(self, batch: int, seq_len: int, *, mask: torch.Tensor | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the delta for a new batch of another size; the Parameter object stays the same, and
        when its shape changes the optimiser's state for it (moments) is dropped, since they no
        longer match (with shape "universal" they always persist)."""
        new_shape = self._delta_shape(batch, seq_len)
        if tuple(self.delta.shape) != new_shape:
            self.delta.data = torch.zeros(new_shape, dtype=torch.float32, device=self.delta.device)
            if optimizer is not None:
                optimizer.state.pop(self.delta, None)
        else:
            self.delta.zero_()
        self.batch, self.seq_len = batch, seq_len
        self.mask = torch.ones(batch, seq_len, dtype=torch.float32, device=self.delta.device)
        self.clean_norm = torch.zeros(batch, seq_len, dtype=torch.float32, device=self.delta.device)
        if mask is not None:
            self.set_mask(mask)

    def make_optimizer(self, lr: float = 1e-2, **kwargs: Any) -> torch.optim.Adam:
        """An Adam over the delta, to be kept by the caller across calls (its moments persist)."""
        return torch.optim.Adam([self.delta], lr=lr, **kwargs)

    # -- the perturbation -----------------------------------------------------------------------

    def full_delta(self) -> torch.Tensor:
        """The delta as added: [B, T, d] (broadcast), times the mask."""
        return self.delta.expand(self.batch, self.seq_len, self.hidden) * self.mask.unsqueeze(-1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] -> h + delta (masked); records the clean per-token norm for the projection."""
        if not self.enabled or h.shape[1] != self.seq_len or h.shape[0] != self.batch:
            return h  # decode steps of generation, or another batch: untouched
        with torch.no_grad():
            self.clean_norm = h.detach().float().norm(dim=-1)
        return (h.float() + self.full_delta()).to(h.dtype)

    @torch.no_grad()
    def project_(self, clean_norm: torch.Tensor | None = None) -> None:
        """Project the delta onto the allowed set, using the clean hidden norms of the last forward
        pass (or `clean_norm` [B, T]). Per token for shape "token"; for the broadcast shapes the
        smallest radius over the masked positions is used (a conservative bound)."""
        cn = (clean_norm if clean_norm is not None else self.clean_norm).to(self.delta.device).float()
        if cn.shape != (self.batch, self.seq_len):
            raise ValueError("project_: run a forward pass first (no clean hidden norms recorded)")
        if self.norm == "l2":
            radius = self.eps * cn  # [B, T]
        else:
            radius = self.eps * cn / self.hidden ** 0.5  # eps * rms(h)
        if self.shape != "token":
            big = torch.where(self.mask > 0, radius, torch.full_like(radius, float("inf")))
            radius = big.amin(dim=1, keepdim=True)  # [B, 1]
            radius = torch.where(torch.isfinite(radius), radius, torch.zeros_like(radius))
            if self.shape == "universal":
                radius = radius.amin(dim=0, keepdim=True)  # [1, 1]
        r = radius.unsqueeze(-1)
        if self.norm == "l2":
            n = self.delta.norm(dim=-1, keepdim=True)
            self.delta.mul_(torch.clamp(r / n.clamp_min(1e-12), max=1.0))
        else:
            self.delta.copy_(torch.maximum(torch.minimum(self.delta, r), -r))

    def relative_norm(self) -> torch.Tensor:
        """||delta_t|| / ||h_t|| per token [B, T] (masked positions; 0 elsewhere)."""
        d = self.full_delta().detach().norm(dim=-1)
        return torch.where(self.mask > 0, d / self.clean_norm.clamp_min(1e-12), torch.zeros_like(d))

    # -- installation -------------------------------------------------------------------------

    def _hook_module(self, model: nn.Module) -> tuple[nn.Module, str]:
        from crl.models import decoder_layers

        layers = decoder_layers(model)
        n = len(layers)
        if not 0 <= self.layer < n:
            raise ValueError(f"ResidualPerturbation: layer {self.layer} out of range 0..{n - 1} (the final hidden state {n} is not a residual input to any layer)")
        if self.layer == 0:
            return layers[0], "pre"
        return layers[self.layer - 1], "post"

    @contextmanager
    def install(self, model: nn.Module) -> Iterator["ResidualPerturbation"]:
        """Context manager: while inside, hidden state `layer` of `model` is perturbed."""
        module, kind = self._hook_module(model)
        if kind == "pre":
            def pre_hook(mod, args, kwargs):
                if "hidden_states" in kwargs:
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = self(kwargs["hidden_states"])
                    return args, kwargs
                return (self(args[0]),) + tuple(args[1:]), kwargs

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:
            def hook(mod, args, output):
                return replace_first_tensor(output, self(first_tensor(output)))

            handle = module.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()


class LatentAttack:
    """Per prompt: a perturbation of hidden state ``layer`` on the request tokens (by default; or all
    positions of the prompt), optimised with Adam for ``steps`` steps on the target's cross-entropy
    and projected onto an L2 ball of radius ``eps * ||h||`` per token; early stopping when the target
    is reproduced greedily or the loss stops improving; then a greedy generation with the perturbation
    in place. Training uses a smaller eps; evaluation defaults are stronger."""

    name = "latent"

    def __init__(self, *, layer: int | None = None, eps: float = 0.5, norm: str = "l2", steps: int = 50, lr: float = 0.05,
                 positions: str = "prompt", patience: int = 15, early_stop_loss: float = 0.05, max_new_tokens: int = 64,
                 system_prompt: str | None = None):
        if positions not in ("request", "prompt"):
            raise ValueError("LatentAttack: positions must be 'request' or 'prompt'")
        self.layer = layer
        self.eps = eps
        self.norm = norm
        self.steps = steps
        self.lr = lr
        self.positions = positions
        self.patience = patience
        self.early_stop_loss = early_stop_loss
        self.max_new_tokens = max_new_tokens
        self.system_prompt = system_prompt

    def resolve_layer(self, model: Any) -> int:
        from crl.models import num_hidden_layers

        n = num_hidden_layers(model)
        return self.layer if self.layer is not None else max(1, n // 4)

    def attack_one(self, model: Any, tokenizer: Any, p: AttackPrompt) -> AttackResult:
        timer = Timer()
        target = p.target or DEFAULT_TARGET
        lay = build_layout(tokenizer, p.prompt, target, system_prompt=self.system_prompt)
        dev = model_device(model)
        # No suffix: prompt = before (ends with the request and a space) + after.
        before = torch.tensor(tokenizer(lay.text_before.rstrip(" "), add_special_tokens=False)["input_ids"], dtype=torch.long)
        prompt_ids = torch.cat([before, lay.after])
        ids = torch.cat([prompt_ids, lay.target]).to(dev).unsqueeze(0)
        tp = len(prompt_ids)
        layer = self.resolve_layer(model)
        from crl.models import hidden_size

        mask = torch.zeros(1, ids.shape[1])
        if self.positions == "request":
            # the user turn's content: from the end of the template's user header to the end of the request
            user_text = lay.text_before.rstrip(" ")
            head = user_text[: len(user_text) - len(p.prompt)]
            start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
            mask[0, start:len(before)] = 1
        else:
            mask[0, :tp] = 1
        pert = ResidualPerturbation(layer, 1, ids.shape[1], hidden_size(model), eps=self.eps, norm=self.norm, mask=mask, device=dev)
        opt = pert.make_optimizer(self.lr)
        tgt = lay.target.to(dev)
        curve: list[float] = []
        best_loss, best_delta = float("inf"), pert.delta.detach().clone()
        since = 0
        requires = [q.requires_grad for q in model.parameters()]
        for q in model.parameters():
            q.requires_grad_(False)
        try:
            with pert.install(model):
                for step in range(self.steps):
                    logits = model(input_ids=ids, use_cache=False).logits
                    loss = target_loss_from_logits(logits, tgt, tp)[0]
                    lv = float(loss.detach())
                    curve.append(lv)
                    matched = bool((logits[0, tp - 1 : tp - 1 + len(tgt)].argmax(-1) == tgt).all())
                    if lv < best_loss - 1e-4:
                        best_loss, best_delta, since = lv, pert.delta.detach().clone(), 0
                    else:
                        since += 1
                    if matched or lv < self.early_stop_loss or since >= self.patience:
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    pert.project_()
                with torch.no_grad():
                    pert.delta.copy_(best_delta)
                    # generation: the prompt without the target, same length-T prefill -> perturbation
                    # on the prompt positions only
                    pert.resize_(1, tp, mask=mask[:, :tp])
                    pert.delta.copy_(best_delta[:, :tp] if pert.shape == "token" else best_delta)
                    response = greedy_from_ids(model, tokenizer, prompt_ids, max_new_tokens=self.max_new_tokens)
                    rel = float(pert.relative_norm()[mask[:, :tp].to(dev) > 0].max()) if mask.sum() > 0 else 0.0
        finally:
            for q, r in zip(model.parameters(), requires):
                q.requires_grad_(r)
        return AttackResult(
            attack=self.name, prompt_id=p.id, prompt=p.prompt, target=p.target,
            final_input=tokenizer.decode(prompt_ids) + f"  [residual perturbation at hidden state {layer}, {self.norm} eps={self.eps} relative, on {self.positions} tokens]",
            response=response, budget={"steps": len(curve), "seconds": timer.seconds}, loss_curve=curve, best_loss=best_loss,
            extra={"layer": layer, "eps": self.eps, "max_relative_norm": rel},
        )

    def run(self, model: Any, tokenizer: Any, prompts: Sequence[AttackPrompt], *, progress: bool = False) -> list[AttackResult]:
        return [self.attack_one(model, tokenizer, p) for p in progress_iter(prompts, progress, self.name)]


__all__ = ["ResidualPerturbation", "LatentAttack"]
