"""Padding encoded examples into batches, and a resumable length-grouped batch sampler."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from crl.data.encoding import EncodedExample

__all__ = ["Batch", "LengthGroupedBatchSampler", "collate"]


@dataclass
class Batch:
    """A right-padded batch: ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long (1 = token),
    ``request_mask`` / ``response_mask`` [B, T] bool (False on padding), ``indices`` the data-set
    positions of the rows and ``ids`` their example ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    request_mask: torch.Tensor
    response_mask: torch.Tensor
    indices: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    padded: bool | None = None
    """Whether any row is shorter than the batch (right padding), known on the host when collated
    (None: unknown). Passes can hand it to the attention-mask code, which need not read the mask."""
    global_size: int | None = None
    """Under several processes: the number of sequences of the global batch this batch is one rank's
    slice of (set by the trainer; a host int, for means over sequences). None: this batch is the
    whole batch."""

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            attention_mask=self.attention_mask.to(device, non_blocking=non_blocking),
            request_mask=self.request_mask.to(device, non_blocking=non_blocking),
            response_mask=self.response_mask.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """The batch in page-locked host memory (for `to(cuda_device, non_blocking=True)`)."""
        return replace(
            self,
            input_ids=self.input_ids.pin_memory(),
            attention_mask=self.attention_mask.pin_memory(),
            request_mask=self.request_mask.pin_memory(),
            response_mask=self.response_mask.pin_memory(),
        )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, rows: slice) -> Batch:
        """The sequences `rows` of the batch at its padded width (e.g. the benign or the harmful part
        of a contrast batch; its `padded` flag is kept as a safe over-estimate)."""
        return Batch(self.input_ids[rows], self.attention_mask[rows], self.request_mask[rows],
                     self.response_mask[rows], padded=self.padded)


def collate(
    encoded: Sequence[EncodedExample], pad_token_id: int, *, indices: Sequence[int] | None = None
) -> Batch:
    """Pad to the longest sequence of the batch (right padding). ``indices`` default to each example's
    ``index`` (or its position in ``encoded`` when unknown)."""
    if not encoded:
        raise ValueError("collate: empty batch")
    if pad_token_id is None:
        raise ValueError("collate: pad_token_id is None (call crl.models.ensure_padding on the tokenizer)")
    width = max(len(e.input_ids) for e in encoded)
    b = len(encoded)
    input_ids = torch.full((b, width), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    req = torch.zeros((b, width), dtype=torch.bool)
    resp = torch.zeros((b, width), dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        if not (len(e.request_mask) == len(e.response_mask) == n):
            raise ValueError(f"collate: example {e.example_id!r} has masks of a different length than its ids")
        input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention[i, :n] = 1
        req[i, :n] = torch.tensor(e.request_mask, dtype=torch.bool)
        resp[i, :n] = torch.tensor(e.response_mask, dtype=torch.bool)
    if indices is None:
        indices = [e.index if e.index is not None else i for i, e in enumerate(encoded)]
    elif len(indices) != b:
        raise ValueError(f"collate: {len(indices)} indices for {b} examples")
    padded = any(len(e.input_ids) < width for e in encoded)
    return Batch(input_ids, attention, req, resp, list(indices), [e.example_id for e in encoded], padded)


class LengthGroupedBatchSampler:
    """Batches of data-set indices with similar lengths, in an order that is a pure function of
    (seed, epoch), so that a resumed run sees exactly the same batch sequence.

    Each epoch: a random permutation (from ``(seed, epoch)``) is cut into mega-batches of
    ``batch_size * group_factor`` indices, each mega-batch is sorted by length (longest first), the
    concatenation is cut into batches and the batch order is shuffled. With ``shuffle=False`` the
    indices are sorted by length (stable) and batches come in that order every epoch. With
    ``drop_last`` the one incomplete batch of an epoch is dropped.

    Iterating yields the remaining batches of the current epoch and then advances to the next epoch;
    :meth:`batches` is an endless iterator over epochs. Both track (epoch, position) — position = the
    number of batches of the current epoch already handed out — which :meth:`state_dict` /
    :meth:`load_state_dict` save and restore.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        group_factor: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if len(lengths) == 0:
            raise ValueError("LengthGroupedBatchSampler: no examples")
        if drop_last and len(lengths) < batch_size:
            raise ValueError(f"drop_last with {len(lengths)} examples < batch_size {batch_size} gives no batches")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.group_factor = int(group_factor)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (a pure function of seed, epoch and the lengths)."""
        n = len(self.lengths)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, int(epoch)])
            perm = rng.permutation(n)
            mega = self.batch_size * max(1, self.group_factor)
            order: list[int] = []
            for start in range(0, n, mega):
                chunk = perm[start : start + mega]
                # longest first, ties by position in the permutation (stable sort)
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                order.extend(int(i) for i in chunk)
        else:
            rng = None
            order = [int(i) for i in np.argsort(self.lengths, kind="stable")]
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        batches = self.batches_for_epoch(epoch)
        while self.epoch == epoch and self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        if self.epoch == epoch and self.position >= len(batches):
            self.epoch += 1
            self.position = 0

    def batches(self, epoch_start: int | None = None, pos: int | None = None) -> Iterator[list[int]]:
        """Endless iterator over batches, from (``epoch_start``, ``pos``) or the current state."""
        if epoch_start is not None:
            self.epoch = int(epoch_start)
            self.position = 0
        if pos is not None:
            self.position = int(pos)
        while True:
            yield from self.__iter__()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.lengths),
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "group_factor": self.group_factor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "num_examples", "shuffle", "drop_last", "group_factor"):
            if key in state:
                mine = len(self.lengths) if key == "num_examples" else getattr(self, key)
                if state[key] != mine:
                    raise ValueError(
                        f"sampler state has {key}={state[key]!r} but this sampler has {mine!r}: "
                        "the data or settings changed since the checkpoint"
                    )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
