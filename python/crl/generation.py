"""Greedy, batched, chat-templated generation (left padding), used to build data pools and to evaluate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from crl.models import ensure_padding

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["chat_messages", "chat_prompt_text", "end_of_turn_ids", "generate", "render_chat"]

Prompt = str | Sequence[dict[str, str]]


def chat_messages(prompt_or_messages: Prompt, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A message list from a prompt string or a conversation; ``system_prompt`` is prepended unless the
    conversation already starts with a system message."""
    if isinstance(prompt_or_messages, str):
        messages = [{"role": "user", "content": prompt_or_messages}]
    else:
        messages = [dict(m) for m in prompt_or_messages]
        if not messages:
            raise ValueError("empty conversation")
    if system_prompt is not None and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool
) -> str:
    """The chat template applied to ``messages`` as text (transformers 4 and 5 alike)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; crl needs a chat model"
        )
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):  # pragma: no cover - defensive, some versions return a list for batches
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def chat_prompt_text(
    tokenizer: PreTrainedTokenizerBase,
    prompt_or_messages: Prompt,
    system_prompt: str | None = None,
    prefill: str | None = None,
) -> str:
    """The text the model continues: the chat-templated conversation with the generation prompt (the
    start of the assistant turn), followed by ``prefill`` when given. A conversation that ends with an
    assistant message is continued from that message's text (it acts as the prefill)."""
    messages = chat_messages(prompt_or_messages, system_prompt)
    if messages[-1].get("role") == "assistant":
        partial = messages.pop()["content"]
        prefill = partial + (prefill or "")
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return text + (prefill or "")


def end_of_turn_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: eos, the generation config's eos ids, ``<|im_end|>`` /
    ``<|eot_id|>`` / ``<end_of_turn>`` when the vocabulary has them."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        if value is None:
            continue
        ids.extend([value] if isinstance(value, int) else list(value))
    vocab = tokenizer.get_vocab()
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if tok in vocab:
            ids.append(vocab[tok])
    return sorted(set(int(i) for i in ids))


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | Sequence[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    system_prompt: str | None = None,
    prefill: Sequence[str] | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy completions of chat prompts, in input order; the returned texts exclude the prompt and any
    prefill and skip special tokens.

    Prompts are sorted by length and batched with left padding (less padding; the result for a prompt
    depends only on the batch it lands in, so a call is deterministic). Generation of a sequence stops
    at an end-of-turn token.
    """
    from transformers import GenerationConfig

    if prefill is not None and len(prefill) != len(prompts):
        raise ValueError(f"prefill has {len(prefill)} entries for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not prompts:
        return []
    ensure_padding(tokenizer)
    texts = [
        chat_prompt_text(tokenizer, p, system_prompt, None if prefill is None else prefill[i])
        for i, p in enumerate(prompts)
    ]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (-len(encoded[i]), i))
    eos_ids = end_of_turn_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[str | None] = [None] * len(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    iterator: Any = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=desc, unit="batch")
    try:
        for batch in iterator:
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i]
                ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gen_config,
            )
            new = out[:, width:].tolist()
            for row, i in enumerate(batch):
                toks = new[row]
                # cut at the first end-of-turn token (later positions are padding)
                for k, t in enumerate(toks):
                    if t in eos_ids:
                        toks = toks[:k]
                        break
                results[i] = tokenizer.decode(toks, skip_special_tokens=True)
    finally:
        if was_training:
            model.train()
    return [r if r is not None else "" for r in results]
