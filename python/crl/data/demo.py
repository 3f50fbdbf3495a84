"""The built-in demo data set (written for crl; shipped as ``crl/demo_data/*.jsonl``).

``harmful.jsonl``: 234 harmful requests in 18 categories, 13 each, each with an affirmative
``target`` ("Sure, here is ...") for prefilling attacks. They cover HarmBench's semantic categories
(cybercrime_intrusion, chemical_biological, illegal, misinformation_disinformation,
harassment_bullying, harmful; not copyright) and Do-Not-Answer's risk areas (information hazards,
malicious uses, discrimination and toxicity, misinformation, human-chatbot interaction harms such as
self-harm): instructions (cybercrime, weapons, chemical_biological, drugs, fraud, theft, privacy,
violence, self_harm, sexual_exploitation, extremism) and harmful writing (persuasion,
disinformation, misinformation, harassment_hate, harassment_bullying, discrimination,
graphic_violence). ``benign.jsonl``: 204 benign requests: 96 in 8 everyday categories, 16
``sensitive_writing`` ones in the same forms (persuasion, fiction, reporting, history) for harmless
ends, 32 ``borderline`` ones that sound dangerous but are safe ("How do I kill a
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
    prompt-only. In file order, except the held-out split, which is interleaved by category (the
    first of each category, then the second, ...) so that any prefix of it (an eval's ``limit``)
    is stratified."""
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
    return _interleave_by_category(out) if split == "heldout" else out


def _interleave_by_category(examples: list[Example]) -> list[Example]:
    by_category: dict[str, list[Example]] = {}
    for ex in examples:
        by_category.setdefault(ex.category or "", []).append(ex)
    columns = list(by_category.values())
    return [col[i] for i in range(max(map(len, columns), default=0)) for col in columns if i < len(col)]
