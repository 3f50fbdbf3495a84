"""Data: examples and file formats, chat-template encoding with token masks, batching, the training
pools and how they are built (generation, elicitation of harmful completions, imported completions),
refusal templates and the built-in demo data set.

Light modules (formats, pools, refusals, demo) are imported eagerly; the others (encoding, batching,
build, generating, elicitation, completions) load on first use.
"""

from __future__ import annotations

from typing import Any

from crl.data.demo import load_demo
from crl.data.formats import Example, load_examples, write_jsonl
from crl.data.pools import Pools, load_pools, save_pools
from crl.data.refusals import REFUSALS, refusal_for

_LAZY = {
    "EncodedExample": "crl.data.encoding",
    "encode_example": "crl.data.encoding",
    "encode_examples": "crl.data.encoding",
    "Batch": "crl.data.batching",
    "collate": "crl.data.batching",
    "LengthGroupedBatchSampler": "crl.data.batching",
    "build_pools": "crl.data.build",
    "BuildStopped": "crl.data.generating",
    "Elicitation": "crl.data.elicitation",
    "TooFewHarmfulCompletions": "crl.data.elicitation",
    "ImportedCompletions": "crl.data.completions",
    "load_completions": "crl.data.completions",
}

__all__ = [
    "REFUSALS",
    "Example",
    "Pools",
    "load_demo",
    "load_examples",
    "load_pools",
    "refusal_for",
    "save_pools",
    "write_jsonl",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crl.data' has no attribute {name!r}")
