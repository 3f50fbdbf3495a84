"""Greedy Coordinate Gradient (GCG; Zou et al. 2023), crl's own implementation.

The PyPI ``nanogcg`` pins transformers<=4.47.1 and fails on transformers 5, hence this one. Per step:
the gradient of the target's cross-entropy with respect to the one-hot encoding of the suffix gives,
for each suffix position, the ``topk`` most promising replacement tokens; ``search_width`` candidate
suffixes are sampled, each replacing ``n_replace`` random positions with one of those tokens;
candidates that do not survive a decode/encode round trip are dropped; all are scored in batched
forward passes and the best becomes the new suffix (if it improves, or always — GCG's rule is to
take the best candidate). Early stopping when the greedy prediction reproduces the target. The
default search width (64) fits a CPU; the paper uses 512.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from crl.attacks.base import (DEFAULT_TARGET, AttackPrompt, AttackResult, Timer, build_layout, greedy_from_ids,
                              model_device, progress_iter, target_loss_from_logits)


def allowed_token_mask(tokenizer: Any, vocab_size: int, *, ascii_only: bool = True) -> torch.Tensor:
    """Tokens a suffix may use: not special, printable ASCII (when asked), decodable."""
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i in range(min(vocab_size, len(tokenizer))):
        if i in special:
            continue
        s = tokenizer.decode([i])
        if not s or not s.strip():
            continue
        if ascii_only and not (s.isascii() and s.isprintable()):
            continue
        allowed[i] = True
    return allowed


class GCGAttack:
    name = "gcg"

    def __init__(self, *, n_tokens: int = 20, steps: int = 50, search_width: int = 64, topk: int = 64, n_replace: int = 1,
                 batch_size: int = 64, init: str = "! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! !", early_stop: bool = True,
                 max_new_tokens: int = 64, seed: int = 0, system_prompt: str | None = None):
        self.n_tokens = n_tokens
        self.steps = steps
        self.search_width = search_width
        self.topk = topk
        self.n_replace = n_replace
        self.batch_size = batch_size
        self.init = init
        self.early_stop = early_stop
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.system_prompt = system_prompt
        self._allowed: torch.Tensor | None = None
        self._allowed_key: Any = None

    def _init_ids(self, tokenizer: Any, allowed: torch.Tensor) -> torch.Tensor:
        ids = tokenizer(self.init, add_special_tokens=False)["input_ids"]
        if not ids:
            ids = [int(allowed.nonzero()[0])]
        ids = (ids * (self.n_tokens // len(ids) + 1))[: self.n_tokens]
        return torch.tensor(ids, dtype=torch.long)

    def _losses(self, model: Any, before: torch.Tensor, suffixes: torch.Tensor, after: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target losses [N] of candidate suffixes [N, n], and whether each reproduces the target greedily."""
        dev = model_device(model)
        n = suffixes.shape[0]
        start = len(before) + suffixes.shape[1] + len(after)
        losses, matched = [], []
        for i in range(0, n, self.batch_size):
            s = suffixes[i : i + self.batch_size]
            b = s.shape[0]
            ids = torch.cat([before.expand(b, -1), s, after.expand(b, -1), target.expand(b, -1)], 1).to(dev)
            logits = model(input_ids=ids, use_cache=False).logits
            losses.append(target_loss_from_logits(logits, target.to(dev), start).float().cpu())
            pred = logits[:, start - 1 : start - 1 + len(target)].argmax(-1).cpu()
            matched.append((pred == target).all(-1))
        return torch.cat(losses), torch.cat(matched)

    def attack_one(self, model: Any, tokenizer: Any, p: AttackPrompt) -> AttackResult:
        timer = Timer()
        target_text = p.target or DEFAULT_TARGET
        lay = build_layout(tokenizer, p.prompt, target_text, system_prompt=self.system_prompt)
        dev = model_device(model)
        weight = model.get_input_embeddings().weight
        vocab = weight.shape[0]
        key = (id(tokenizer), vocab)
        if self._allowed is None or self._allowed_key != key:
            self._allowed, self._allowed_key = allowed_token_mask(tokenizer, vocab), key
        allowed = self._allowed
        gen = torch.Generator().manual_seed(self.seed)
        suffix = self._init_ids(tokenizer, allowed)
        before, after, target = lay.before, lay.after, lay.target
        e_before = weight[before.to(dev)].detach()
        e_after = weight[after.to(dev)].detach()
        e_target = weight[target.to(dev)].detach()
        start = len(before) + self.n_tokens + len(after)
        curve: list[float] = []
        best_loss, best_suffix = float("inf"), suffix.clone()
        forward_passes = 0
        requires = [q.requires_grad for q in model.parameters()]
        for q in model.parameters():
            q.requires_grad_(False)
        try:
            for step in range(self.steps):
                # 1. gradient wrt the one-hot suffix
                one_hot = torch.nn.functional.one_hot(suffix.to(dev), vocab).to(weight.dtype).requires_grad_(True)
                inp = torch.cat([e_before, one_hot @ weight, e_after, e_target], 0).unsqueeze(0)
                logits = model(inputs_embeds=inp, use_cache=False).logits
                loss = target_loss_from_logits(logits, target.to(dev), start)[0]
                forward_passes += 1
                cur = float(loss.detach())
                if step == 0:
                    curve.append(cur)
                    best_loss = cur
                    if self.early_stop and bool((logits[0, start - 1 : start - 1 + len(target)].argmax(-1).cpu() == target).all()):
                        break
                (grad,) = torch.autograd.grad(loss, one_hot)
                grad = grad.float().cpu()
                grad[:, ~allowed] = float("inf")
                top = (-grad).topk(min(self.topk, int(allowed.sum())), dim=-1).indices  # [n, k]
                # 2. sample candidates
                cands = suffix.expand(self.search_width, -1).clone()
                for c in range(self.search_width):
                    pos = torch.randperm(self.n_tokens, generator=gen)[: self.n_replace]
                    choice = torch.randint(0, top.shape[1], (len(pos),), generator=gen)
                    cands[c, pos] = top[pos, choice]
                # 3. keep candidates that survive a decode/encode round trip
                keep = []
                for c in range(cands.shape[0]):
                    re_ids = tokenizer(tokenizer.decode(cands[c]), add_special_tokens=False)["input_ids"]
                    if len(re_ids) == self.n_tokens and re_ids == cands[c].tolist():
                        keep.append(c)
                if not keep:
                    keep = list(range(cands.shape[0]))
                cands = torch.unique(cands[keep], dim=0)
                # 4. score
                with torch.no_grad():
                    losses, matched = self._losses(model, before, cands, after, target)
                forward_passes += cands.shape[0]
                j = int(losses.argmin())
                suffix = cands[j].clone()
                lv = float(losses[j])
                curve.append(lv)
                if lv < best_loss:
                    best_loss, best_suffix = lv, suffix.clone()
                if self.early_stop and bool(matched[j]):
                    break
        finally:
            for q, r in zip(model.parameters(), requires):
                q.requires_grad_(r)
        ids = torch.cat([before, best_suffix, after])
        response = greedy_from_ids(model, tokenizer, ids, max_new_tokens=self.max_new_tokens)
        return AttackResult(
            attack=self.name, prompt_id=p.id, prompt=p.prompt, target=p.target, final_input=tokenizer.decode(ids),
            response=response, budget={"steps": len(curve) - 1, "forward_passes": forward_passes, "seconds": timer.seconds},
            loss_curve=curve, best_loss=best_loss, extra={"suffix": tokenizer.decode(best_suffix), "search_width": self.search_width},
        )

    def run(self, model: Any, tokenizer: Any, prompts: Sequence[AttackPrompt], *, progress: bool = False) -> list[AttackResult]:
        return [self.attack_one(model, tokenizer, p) for p in progress_iter(prompts, progress, self.name)]


__all__ = ["GCGAttack", "allowed_token_mask"]
