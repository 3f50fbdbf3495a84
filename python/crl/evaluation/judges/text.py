"""Words and sentences as the judges' rules read them."""

from __future__ import annotations

import re

SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
#: A word: letters (Latin, with accents), optionally with one apostrophe suffix ("don't", "model's").
WORD = re.compile(r"[A-Za-z\u00C0-\u024F]+(?:['\u2019][A-Za-z]+)?")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_SPLIT.split(text.strip()) if s and s.strip()]


__all__ = ["SENTENCE_SPLIT", "WORD", "split_sentences"]
