"""Chat-templated tokenisation with token masks for the request and the response.

How the masks are found (robust to any chat template that renders message contents verbatim or
trimmed): the conversation is rendered as text twice, once with the content under study replaced by
a sentinel, which locates the content's character span in the real rendering; the full text is
tokenised with character offsets and a token belongs to a span when its characters overlap it. The
prompt part (the conversation up to and including the generation prompt, i.e. what the model sees
at generation time) is tokenised alone as well and must be a token prefix of the full conversation,
otherwise a TemplateMismatchError explains the problem.

Conventions:
- ``request_mask``: the tokens of the content of the last user message (not the role header, not the
  end-of-turn token).
- ``response_mask``: the tokens of the content of the final assistant message only: not the template
  tokens before it and NOT the end-of-turn token after it (``<|im_end|>``): the representation losses
  act on what the model says, and the end-of-turn token's state is shared by every answer. A token
  that straddles the boundary between template text and content (e.g. " Sure" after a template space)
  counts as content.
- Truncation to ``max_length`` keeps the whole prompt and cuts the end of the response (the
  end-of-turn token goes first); a prompt longer than ``max_length`` raises EncodingTooLongError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from crl.data.formats import Example
from crl.generation import chat_messages, render_chat

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EncodedExample",
    "EncodingTooLongError",
    "TemplateMismatchError",
    "encode_example",
    "encode_examples",
]

_SENTINEL = "\ue000crl-content\ue001"


class TemplateMismatchError(ValueError):
    """The chat template or tokenizer does not allow locating the request/response tokens reliably."""


class EncodingTooLongError(ValueError):
    """The prompt alone is longer than ``max_length`` (only the response may be truncated)."""


@dataclass
class EncodedExample:
    input_ids: list[int]
    request_mask: list[bool]
    response_mask: list[bool]
    prompt_length: int  # tokens up to and including the generation prompt (where the response starts)
    example_id: str = ""
    index: int | None = None  # position in the data set it came from, when known
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def has_response(self) -> bool:
        return any(self.response_mask)


def _content_span(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    idx: int,
    rendered: str,
    *,
    add_generation_prompt: bool,
    example_id: str,
) -> tuple[int, int]:
    """Character span of ``messages[idx]``'s content inside ``rendered`` (the rendering of messages)."""
    if _SENTINEL in messages[idx]["content"]:  # pragma: no cover - absurd input
        raise TemplateMismatchError(f"example {example_id!r}: content contains crl's sentinel")
    probe = [dict(m) for m in messages]
    probe[idx]["content"] = _SENTINEL
    text = render_chat(tokenizer, probe, add_generation_prompt=add_generation_prompt)
    if text.count(_SENTINEL) != 1:
        raise TemplateMismatchError(
            f"example {example_id!r}: the chat template renders the {messages[idx]['role']} content "
            f"{text.count(_SENTINEL)} times; crl needs it exactly once to build token masks"
        )
    p = text.index(_SENTINEL)
    before, after = text[:p], text[p + len(_SENTINEL) :]
    if not (rendered.startswith(before) and rendered.endswith(after) and len(before) + len(after) <= len(rendered)):
        raise TemplateMismatchError(
            f"example {example_id!r}: the chat template changes the text around the "
            f"{messages[idx]['role']} message depending on its content; cannot locate its tokens"
        )
    return p, len(rendered) - len(after)


def _overlap_mask(offsets: Sequence[tuple[int, int]], span: tuple[int, int], start_token: int = 0) -> list[bool]:
    s, e = span
    return [i >= start_token and b > a and a < e and b > s for i, (a, b) in enumerate(offsets)]


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    *,
    max_length: int | None = None,
    system_prompt: str | None = None,
    index: int | None = None,
) -> EncodedExample:
    """Tokenise ``example`` with the tokenizer's chat template and mark its request and response tokens
    (see the module docstring for the exact conventions). ``system_prompt`` is prepended when the
    conversation has no system message. A prompt-only example ends with the generation prompt."""
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateMismatchError("encode_example needs a fast tokenizer (character offsets)")
    messages = chat_messages(example.messages, system_prompt)
    has_response = messages[-1]["role"] == "assistant"
    prompt_msgs = messages[:-1] if has_response else messages
    users = [i for i, m in enumerate(prompt_msgs) if m["role"] == "user"]
    if not users:
        raise ValueError(f"example {example.id!r} has no user message")
    u = users[-1]

    prefix_text = render_chat(tokenizer, prompt_msgs, add_generation_prompt=True)
    req_span = _content_span(
        tokenizer, prompt_msgs, u, prefix_text, add_generation_prompt=True, example_id=example.id
    )
    if has_response:
        full_text = render_chat(tokenizer, messages, add_generation_prompt=False)
        if not full_text.startswith(prefix_text):
            raise TemplateMismatchError(
                f"example {example.id!r}: the chat template renders the conversation differently when the "
                "response is present (the generation prompt is not a prefix of the full conversation)"
            )
        resp_span = _content_span(
            tokenizer, messages, len(messages) - 1, full_text, add_generation_prompt=False, example_id=example.id
        )
        if resp_span[0] < len(prefix_text):
            raise TemplateMismatchError(
                f"example {example.id!r}: the response text starts inside the generation prompt"
            )
    else:
        full_text = prefix_text
        resp_span = (len(full_text), len(full_text))

    enc = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    prefix_ids = list(tokenizer(prefix_text, add_special_tokens=False)["input_ids"])
    n_prompt = len(prefix_ids)
    if ids[:n_prompt] != prefix_ids:
        k = next((i for i, (a, b) in enumerate(zip(ids, prefix_ids)) if a != b), min(len(ids), n_prompt))
        raise TemplateMismatchError(
            f"example {example.id!r}: the prompt tokenises differently alone ({n_prompt} tokens) and inside the "
            f"full conversation (first difference at token {k}: the response merges with the end of the "
            "generation prompt); training tokens would not match what the model sees when generating"
        )
    request_mask = _overlap_mask(offsets, req_span)
    response_mask = _overlap_mask(offsets, resp_span, start_token=n_prompt) if has_response else [False] * len(ids)
    if not any(request_mask) and example.prompt.strip():
        raise TemplateMismatchError(f"example {example.id!r}: no request tokens found")

    truncated = False
    if max_length is not None and len(ids) > max_length:
        if n_prompt > max_length:
            raise EncodingTooLongError(
                f"example {example.id!r}: the prompt has {n_prompt} tokens, more than max_length={max_length}"
            )
        ids, request_mask, response_mask = ids[:max_length], request_mask[:max_length], response_mask[:max_length]
        truncated = True
    return EncodedExample(
        input_ids=ids,
        request_mask=request_mask,
        response_mask=response_mask,
        prompt_length=n_prompt,
        example_id=example.id,
        index=index,
        truncated=truncated,
    )


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int | None = None,
    system_prompt: str | None = None,
    skip_too_long: bool = False,
) -> list[EncodedExample]:
    """Encode many examples (``index`` = position in ``examples``). With ``skip_too_long`` the examples
    whose prompt exceeds ``max_length`` are left out instead of raising."""
    out = []
    for i, ex in enumerate(examples):
        try:
            out.append(encode_example(tokenizer, ex, max_length=max_length, system_prompt=system_prompt, index=i))
        except EncodingTooLongError:
            if not skip_too_long:
                raise
    return out
