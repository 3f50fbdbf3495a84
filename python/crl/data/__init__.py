"""Data: examples and file formats, chat-template encoding with token masks, batching, the training
pools and how they are built, refusal templates and the built-in demo data set.

Light modules (formats, pools, refusals, demo) are imported eagerly; the ones that need torch or
transformers (encoding, batching, build) load on first use.
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
