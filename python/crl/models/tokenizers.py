"""Tokenizer set-up shared by every loading path."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase


def ensure_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token if it has none (the eos token, else ``<|pad|>`` added)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:  # pragma: no cover - unusual tokenizers
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


__all__ = ["ensure_padding"]
