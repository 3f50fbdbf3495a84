"""Training metrics, kept on the device until one read per optimizer step.

Each micro-batch's step (`crl.training.step.LossComputer`) returns its metrics as a dict of *values*:
0-dim detached device tensors (loss terms, active fractions, distances), host floats (`seconds_*`,
`coef_*`, the mining statistics, which the host computes anyway) or None (a key this micro-batch does
not log on this process, kept so that every process emits the same keys). Reading a device tensor on
the host (`float(t)`, `t.item()`) waits until the device has run everything queued before it: a host
synchronisation, after which the host has nothing queued ahead of the device. The trainer therefore
collects the values of all micro-batches of an optimizer step and reads them, with the gradient
norm, in one copy (`read_values`); under several processes one all-gather of one tensor comes first
(`DistributedContext.gather_metrics`), then the same single read.

The logged numbers are the ones a per-value read gave: every tensor is read as float64 (exact for
fp32 and bf16 values), then combined on the host in the same order as before.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence, Union

import torch

Value = Union[torch.Tensor, float, int, None]

# Metric keys of the crl method that are additive partials under several processes (global value =
# sum over ranks of each rank's share; see crl.training.distributed).
ADDITIVE_PREFIXES = ("loss", "active_", "benign_d_", "harmful_d_", "benign_perturbed_d_")


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors])


def read_tensors(tensors: Sequence[torch.Tensor]) -> list[float]:
    """Host floats of 0-dim tensors: one copy per device they live on (on a GPU: one synchronisation)."""
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = [0.0] * len(tensors)
    for positions in by_device.values():
        for i, number in zip(positions, _stacked([tensors[i] for i in positions]).tolist()):
            out[i] = number
    return out


def read_values(
    micros: Sequence[Mapping[str, Value]], extra: Sequence[Value] = ()
) -> tuple[list[dict[str, float]], list[float | None]]:
    """Host floats of every micro-batch's values (None dropped, key order kept) and of `extra`, with
    one device read for all of them."""
    tensors: list[torch.Tensor] = []
    for values in micros:
        tensors.extend(v for v in values.values() if isinstance(v, torch.Tensor))
    tensors.extend(v for v in extra if isinstance(v, torch.Tensor))
    numbers = iter(read_tensors(tensors))
    out: list[dict[str, float]] = []
    for values in micros:
        floats: dict[str, float] = {}
        for key, v in values.items():
            if isinstance(v, torch.Tensor):
                floats[key] = next(numbers)
            elif v is not None:
                floats[key] = float(v)
        out.append(floats)
    extras = [next(numbers) if isinstance(v, torch.Tensor) else (None if v is None else float(v)) for v in extra]
    return out, extras


def average_micro_batches(per_micro: Sequence[Mapping[str, float]], grad_accumulation: int) -> dict[str, float]:
    """The optimizer step's metrics: the mean over its micro-batches (a key logged by some micro-batches
    only, e.g. refinement's, is the mean over those)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for values in per_micro:
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value / grad_accumulation
            counts[key] = counts.get(key, 0) + 1
    for key, count in counts.items():
        if count < grad_accumulation:
            sums[key] = sums[key] * grad_accumulation / count
    return sums


def reduce_over_ranks(per_rank: Sequence[Mapping[str, float]], *, additive: bool) -> dict[str, float]:
    """One micro-batch's global metrics from every rank's values (in rank order).

    `additive` (method crl): loss/active/distance keys are each rank's share and are summed; otherwise
    they are local means and are averaged over ranks. `seconds_*`: the slowest rank; `coef_*`: equal on
    every rank; anything else (mining statistics): the mean over the ranks that logged it."""
    keys: list[str] = []
    for m in per_rank:
        keys.extend(k for k in m if k not in keys)
    out: dict[str, float] = {}
    for key in keys:
        values = [float(m[key]) for m in per_rank if key in m]
        if key.startswith("seconds_"):
            out[key] = max(values)
        elif key.startswith("coef_"):
            out[key] = values[0]
        elif additive and key.startswith(ADDITIVE_PREFIXES):
            out[key] = sum(values)
        else:
            out[key] = sum(values) / len(values)
    return out


def metric_keys(micros: Sequence[Mapping[str, Value]]) -> list[str]:
    """Every key of the micro-batches, in first-seen order (None-valued ones included)."""
    keys: list[str] = []
    seen: set[str] = set()
    for values in micros:
        for key in values:
            if key not in seen:
                seen.add(key)
                keys.append(key)
    return keys


def keys_checksum(keys: Sequence[str]) -> int:
    """A 32-bit checksum of a key list (exact in a float64 tensor), to check that ranks agree."""
    return zlib.crc32("\n".join(keys).encode("utf-8"))


__all__ = [
    "ADDITIVE_PREFIXES", "Value", "average_micro_batches", "keys_checksum", "metric_keys", "read_tensors",
    "read_values", "reduce_over_ranks",
]
