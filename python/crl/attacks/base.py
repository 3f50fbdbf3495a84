"""What every attack records, and the shared plumbing of the optimisation attacks.

An attack takes a model, its tokenizer and a list of `AttackPrompt` (a request, optionally with the
affirmative target an optimisation attack aims for, e.g. AdvBench's "Sure, here is ...") and returns
one `AttackResult` per prompt: the final input the model saw, the generated text, the budget spent and
the loss curve. Success is decided afterwards by a judge (crl.evaluation.judges), so that every attack
is scored by the same rule; `AttackResult.success` holds that decision once made.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

import torch

from crl.generation import chat_prompt_text, end_of_turn_ids

#: Stands for the adversarial suffix in the chat-templated text before it is split into token ids.
SUFFIX_PLACEHOLDER = "\x00ADV_SUFFIX\x00"
DEFAULT_TARGET = "Sure, here is"


@dataclass
class AttackPrompt:
    id: str
    prompt: str
    target: str | None = None
    category: str | None = None


@dataclass
class AttackResult:
    attack: str
    prompt_id: str
    prompt: str
    target: str | None
    final_input: str  # the text given to the model (for soft/latent attacks: the text, with a description of the perturbation)
    response: str  # the generated text (after any prefill; the prefill is in final_input)
    budget: dict[str, float] = field(default_factory=dict)  # steps, forward passes, seconds, configurations tried
    loss_curve: list[float] = field(default_factory=list)
    best_loss: float | None = None
    success: bool | None = None  # set by a judge
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttackResult":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Attack(Protocol):
    name: str

    def run(self, model: Any, tokenizer: Any, prompts: Sequence[AttackPrompt], *, progress: bool = False) -> list[AttackResult]: ...


# --------------------------------------------------------------------------------------------------
# Token layout of an attacked conversation: [before][suffix][after][target]
# --------------------------------------------------------------------------------------------------


@dataclass
class AttackLayout:
    before: torch.Tensor  # [Tb] chat template up to and including the user's request (and a space)
    after: torch.Tensor  # [Ta] the rest of the user turn and the start of the assistant turn
    target: torch.Tensor  # [Tt] the target response tokens (may be empty)
    text_before: str
    text_after: str


def build_layout(tokenizer: Any, prompt: str, target: str | None, *, system_prompt: str | None = None) -> AttackLayout:
    """Split the chat-templated request into the token ids before and after an adversarial suffix slot
    placed right after the request text, plus the target's ids (tokenised in context)."""
    text = chat_prompt_text(tokenizer, prompt + " " + SUFFIX_PLACEHOLDER, system_prompt)
    if SUFFIX_PLACEHOLDER not in text:  # pragma: no cover - a template that rewrites the content
        raise ValueError("the chat template dropped the suffix placeholder")
    text_before, text_after = text.split(SUFFIX_PLACEHOLDER, 1)
    before = tokenizer(text_before, add_special_tokens=False)["input_ids"]
    after = tokenizer(text_after, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"] if target else []
    return AttackLayout(
        torch.tensor(before, dtype=torch.long), torch.tensor(after, dtype=torch.long), torch.tensor(tgt, dtype=torch.long),
        text_before, text_after,
    )


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def embed_tokens(model: Any, ids: torch.Tensor) -> torch.Tensor:
    from crl.models import input_embeddings

    emb = input_embeddings(model)
    return emb(ids.to(emb.weight.device))


def target_loss_from_logits(logits: torch.Tensor, target: torch.Tensor, target_start: int) -> torch.Tensor:
    """Mean cross-entropy of `target` [Tt] (or [B, Tt]) predicted from logits [B, T, V] whose position
    target_start - 1 predicts the first target token. Returns [B]."""
    tt = target.shape[-1]
    pred = logits[:, target_start - 1 : target_start - 1 + tt, :].float()
    tgt = target.expand(pred.shape[0], tt) if target.dim() == 1 else target
    ce = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), tgt.reshape(-1).to(pred.device), reduction="none")
    return ce.view(pred.shape[0], tt).mean(-1)


@torch.no_grad()
def greedy_from_embeds(model: Any, tokenizer: Any, inputs_embeds: torch.Tensor, *, max_new_tokens: int) -> str:
    """Greedy continuation of one sequence given as input embeddings [1, T, d] (the new text only)."""
    from transformers import GenerationConfig

    eos = end_of_turn_ids(model, tokenizer)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id)
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    out = model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, generation_config=cfg)
    toks = out[0].tolist()
    for k, t in enumerate(toks):
        if t in eos:
            toks = toks[:k]
            break
    return tokenizer.decode(toks, skip_special_tokens=True)


@torch.no_grad()
def greedy_from_ids(model: Any, tokenizer: Any, ids: torch.Tensor, *, max_new_tokens: int) -> str:
    """Greedy continuation of one token sequence [T] (the new text only)."""
    from transformers import GenerationConfig

    eos = end_of_turn_ids(model, tokenizer)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id)
    dev = model_device(model)
    ids = ids.view(1, -1).to(dev)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    toks = out[0, ids.shape[1]:].tolist()
    for k, t in enumerate(toks):
        if t in eos:
            toks = toks[:k]
            break
    return tokenizer.decode(toks, skip_special_tokens=True)


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def progress_iter(items: Sequence[Any], progress: bool, desc: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="prompt", leave=False)


__all__ = [
    "AttackPrompt", "AttackResult", "Attack", "AttackLayout", "build_layout", "target_loss_from_logits",
    "greedy_from_embeds", "greedy_from_ids", "embed_tokens", "SUFFIX_PLACEHOLDER", "DEFAULT_TARGET",
]
