"""The three training pools: harmful conversations, benign conversations (including refusals of
harmful requests) and retain conversations (for the KL term)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from crl.data.formats import Example, load_examples, write_jsonl

__all__ = ["POOL_FILES", "Pools", "load_pools", "save_pools"]

POOL_FILES = {"harmful": "harmful.jsonl", "benign": "benign.jsonl", "retain": "retain.jsonl"}


@dataclass
class Pools:
    harmful: list[Example] = field(default_factory=list)
    benign: list[Example] = field(default_factory=list)
    retain: list[Example] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"harmful": len(self.harmful), "benign": len(self.benign), "retain": len(self.retain)}

    def __iter__(self):
        yield from (("harmful", self.harmful), ("benign", self.benign), ("retain", self.retain))


def load_pools(directory: str | Path) -> Pools:
    """Read ``harmful.jsonl``, ``benign.jsonl`` and ``retain.jsonl`` from ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"pool folder {directory} does not exist (build it with `crl data build --out {directory}`)")
    pools = {}
    for name, fname in POOL_FILES.items():
        path = directory / fname
        if not path.is_file():
            raise FileNotFoundError(
                f"pool file {path} is missing: a pool folder holds {', '.join(POOL_FILES.values())} "
                f"(build it with `crl data build --out {directory}`)"
            )
        pools[name] = load_examples(path, format="jsonl")
    return Pools(**pools)


def save_pools(pools: Pools, directory: str | Path) -> Path:
    """Write the three pool files into ``directory`` (each atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, examples in pools:
        write_jsonl(directory / POOL_FILES[name], examples)
    return directory
