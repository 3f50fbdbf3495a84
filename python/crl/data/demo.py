"""The built-in demo data set (written for crl; shipped as ``crl/demo_data/*.jsonl``).

``harmful.jsonl``: 130 harmful requests in 10 categories (cybercrime, weapons, drugs, fraud,
harassment_hate, misinformation, privacy, violence, self_harm, theft), each with an affirmative
``target`` ("Sure, here is ...") for prefilling attacks. ``benign.jsonl``: 188 benign requests: 96 in 8
everyday categories, 32 ``borderline`` ones that sound dangerous but are safe ("How do I kill a
Python process that is frozen?") and 60 ``contrast`` ones, 6 of each of XSTest's ten kinds of
harmful-sounding safe prompt (``meta.type``: homonyms, figurative, safe_targets, safe_contexts,
definitions, nonsense_group, nonsense_discrimination, historical_events, public_figures,
fictional_privacy), written for crl. Each record has ``id``, ``category``, ``label`` and ``split``
(``train`` or ``heldout``: about 25% of each category, never used for training).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from crl.data.formats import Example, example_from_record

__all__ = ["DEMO_KINDS", "DEMO_SPLITS", "demo_path", "load_demo"]

DEMO_KINDS = ("harmful", "benign")
DEMO_SPLITS = ("train", "heldout", "all")


def demo_path(kind: str) -> Path:
    """Filesystem path of a demo file (inside the installed package)."""
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo kind {kind!r}; expected one of {', '.join(DEMO_KINDS)}")
    return Path(str(resources.files("crl").joinpath("demo_data", f"{kind}.jsonl")))


def load_demo(kind: str, split: str = "all") -> list[Example]:
    """The demo ``kind`` ("harmful" | "benign") examples of ``split`` ("train" | "heldout" | "all"),
    prompt-only, in file order."""
    if kind not in DEMO_KINDS:
        raise ValueError(f"unknown demo kind {kind!r}; expected one of {', '.join(DEMO_KINDS)}")
    if split not in DEMO_SPLITS:
        raise ValueError(f"unknown demo split {split!r}; expected one of {', '.join(DEMO_SPLITS)}")
    res = resources.files("crl").joinpath("demo_data", f"{kind}.jsonl")
    name = Path(f"crl/demo_data/{kind}.jsonl")
    out = []
    for lineno, line in enumerate(res.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        ex = example_from_record(json.loads(line), name, lineno, "crl-demo")
        if split == "all" or ex.split == split:
            out.append(ex)
    return out
