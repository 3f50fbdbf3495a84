"""Embedding-space attack (Schwinn et al. 2024; as used by Circuit Breakers and Simko et al.).

A soft suffix of ``n_tokens`` free embedding vectors is placed after the request, inside the user
turn, and optimised with Adam to minimise the cross-entropy of the target response ("Sure, here is
..."). Several configurations (learning rate x initialisation) are tried per prompt, each with early
stopping (when the greedy prediction reproduces the whole target, which also ends the search over
configurations, or when the loss stops improving for ``patience`` steps); the configuration with
the lowest loss is kept and the model's greedy
continuation from it is recorded. The budget is the total number of optimisation steps.

Initialisations: ``"bang"`` (the embedding of "!" repeated), ``"random_tokens"`` (embeddings of
random vocabulary tokens), ``"zeros"`` (small Gaussian noise scaled to the embedding norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from crl.attacks.base import (DEFAULT_TARGET, AttackPrompt, AttackResult, Timer, build_layout, embed_tokens,
                              greedy_from_embeds, model_device, progress_iter, target_loss_from_logits)


@dataclass
class EmbeddingRunConfig:
    lr: float = 1e-3
    init: str = "bang"  # bang | random_tokens | zeros


def default_embedding_configs() -> list[EmbeddingRunConfig]:
    # Strongest first: once a configuration reproduces the target, the others are skipped.
    return [EmbeddingRunConfig(1e-2, "bang"), EmbeddingRunConfig(3e-2, "random_tokens"), EmbeddingRunConfig(1e-3, "bang")]


class EmbeddingAttack:
    name = "embedding"

    def __init__(self, *, n_tokens: int = 20, steps: int = 100, configs: Sequence[EmbeddingRunConfig] | None = None,
                 patience: int = 20, early_stop_loss: float = 0.05, max_new_tokens: int = 64, seed: int = 0,
                 system_prompt: str | None = None, relative_lr: bool = True):
        self.n_tokens = n_tokens
        self.steps = steps
        self.configs = list(configs) if configs else default_embedding_configs()
        self.patience = patience
        self.early_stop_loss = early_stop_loss
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.system_prompt = system_prompt
        # Adam's step is ~lr per coordinate; scaling lr by the typical embedding coordinate size makes
        # the same configuration mean the same on models with very different embedding scales.
        self.relative_lr = relative_lr

    def _init_suffix(self, model: Any, tokenizer: Any, init: str, gen: torch.Generator) -> torch.Tensor:
        weight = model.get_input_embeddings().weight.detach()
        if init == "bang":
            ids = tokenizer("!", add_special_tokens=False)["input_ids"][:1] or [0]
            vec = weight[ids[0]].float()
            return vec.expand(self.n_tokens, -1).clone()
        if init == "random_tokens":
            n_special = len(getattr(tokenizer, "all_special_ids", []) or [])
            ids = torch.randint(n_special, weight.shape[0], (self.n_tokens,), generator=gen)
            return weight[ids.to(weight.device)].float().clone()
        if init == "zeros":
            scale = weight.float().norm(dim=-1).mean() / weight.shape[1] ** 0.5
            return (torch.randn(self.n_tokens, weight.shape[1], generator=gen) * 0.1 * scale).to(weight.device)
        raise ValueError(f"embedding attack: unknown init {init!r} (expected bang, random_tokens or zeros)")

    def attack_one(self, model: Any, tokenizer: Any, p: AttackPrompt) -> AttackResult:
        timer = Timer()
        target = p.target or DEFAULT_TARGET
        lay = build_layout(tokenizer, p.prompt, target, system_prompt=self.system_prompt)
        dev = model_device(model)
        with torch.no_grad():
            e_before = embed_tokens(model, lay.before).detach()
            e_after = embed_tokens(model, lay.after).detach()
            e_target = embed_tokens(model, lay.target).detach()
        dtype = e_before.dtype
        weight = model.get_input_embeddings().weight
        coord_scale = float(weight.detach().float().std()) if self.relative_lr else 1.0
        tgt = lay.target.to(dev)
        target_start = len(lay.before) + self.n_tokens + len(lay.after)
        gen = torch.Generator().manual_seed(self.seed)
        best = (float("inf"), None, -1)
        reproduced = False
        curves: list[list[float]] = []
        steps_total = 0
        requires = [q.requires_grad for q in model.parameters()]
        for q in model.parameters():
            q.requires_grad_(False)
        try:
            for ci, cfg in enumerate(self.configs):
                suffix = self._init_suffix(model, tokenizer, cfg.init, gen).to(dev).float().requires_grad_(True)
                opt = torch.optim.Adam([suffix], lr=cfg.lr * coord_scale)
                curve: list[float] = []
                since_best, cfg_best = 0, float("inf")
                for step in range(self.steps):
                    inp = torch.cat([e_before, suffix.to(dtype), e_after, e_target], 0).unsqueeze(0)
                    logits = model(inputs_embeds=inp, use_cache=False).logits
                    loss = target_loss_from_logits(logits, tgt, target_start)[0]
                    lv = float(loss.detach())
                    curve.append(lv)
                    steps_total += 1
                    matched = bool((logits[0, target_start - 1 : target_start - 1 + len(tgt)].argmax(-1) == tgt).all())
                    if lv < best[0]:
                        best = (lv, suffix.detach().clone(), ci)
                    if lv < cfg_best - 1e-4:
                        cfg_best, since_best = lv, 0
                    else:
                        since_best += 1
                    if matched:
                        reproduced = True
                        break
                    if lv < self.early_stop_loss or since_best >= self.patience:
                        break
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                curves.append(curve)
                if reproduced or best[0] < self.early_stop_loss:
                    break  # the target is reproduced: the remaining configurations are not needed
        finally:
            for q, r in zip(model.parameters(), requires):
                q.requires_grad_(r)
        suffix = best[1]
        with torch.no_grad():
            inp = torch.cat([e_before, suffix.to(dtype), e_after], 0).unsqueeze(0)
            response = greedy_from_embeds(model, tokenizer, inp, max_new_tokens=self.max_new_tokens)
            # The nearest vocabulary tokens of the soft suffix (for the record only).
            w = weight.detach().float()
            nearest = torch.cdist(suffix.float(), w).argmin(-1).tolist()
        return AttackResult(
            attack=self.name, prompt_id=p.id, prompt=p.prompt, target=p.target,
            final_input=lay.text_before + f"<{self.n_tokens} soft embeddings>" + lay.text_after,
            response=response,
            budget={"steps": steps_total, "configurations": len(curves), "seconds": timer.seconds},
            loss_curve=curves[best[2]] if best[2] >= 0 else [],
            best_loss=best[0],
            extra={
                "best_configuration": {"lr": self.configs[best[2]].lr, "init": self.configs[best[2]].init},
                "loss_curves": curves,
                "nearest_tokens": tokenizer.decode(nearest),
                "suffix_norm": float(suffix.norm(dim=-1).mean()),
                "target_reproduced": reproduced,
            },
        )

    def run(self, model: Any, tokenizer: Any, prompts: Sequence[AttackPrompt], *, progress: bool = False) -> list[AttackResult]:
        return [self.attack_one(model, tokenizer, p) for p in progress_iter(prompts, progress, self.name)]


__all__ = ["EmbeddingAttack", "EmbeddingRunConfig", "default_embedding_configs"]
