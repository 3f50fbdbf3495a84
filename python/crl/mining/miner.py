"""Hard-negative mining for the CRL triplet terms.

Per micro-batch, with the per-sample pooled trained states as queries (detached), at each layer:

* benign anchors get the k vectors of the trained-model queue (the *current* harmful states) most
  similar to them: the harmful states the model confuses with benign ones;
* harmful anchors get the k vectors of the frozen bank (the *original* harmful states) most similar
  to them, excluding their own sample: the original harmful region they are still closest to.

Results are per-sample negatives ``[L * S, k, d]`` fp32 (entry ``l * S + s``) for the fused triplet
kernel's ``negative_index``; a query with fewer than k qualifying entries repeats its best one, and
one with none is reported in ``valid`` (the mining stage then stops the run with an error: the bank
must hold at least two harmful samples). The queue is then refreshed with the batch's trained
harmful states.

Ranking in the loss's frame (`center=True`): chat models' states share a large component (SmolLM2:
about 70% of the norm), which makes every raw cosine about 0.7 and the ranking close to arbitrary;
the loss therefore centres states on the frozen mean (crl.losses.objectives.LayerFrame). The miner
ranks the same way: bank, queue and queries minus the frozen bank's per-layer mean. The index then
holds a centred copy of the bank (as much memory again as the bank, in its storage dtype), and the
queue stores its vectors centred (centred once on entry, not once per search); the negatives handed
to the loss are the raw vectors again, which the loss puts in its own frame.

Logged: the mean similarity of the mined negatives, the fraction of (sample, layer) pairs whose
hardest negative changed since that sample was last mined (over samples seen before), and the
seconds spent mining.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from crl.mining.bank import FrozenBank, TrainedQueue, torch_to_storage
from crl.mining.index import IndexParams, NegativeIndex, bank_nbytes, make_index, to_float32


@dataclass
class Mined:
    negatives: torch.Tensor
    """[L, S, k, d] float32 (bank values, no grad)."""
    scores: np.ndarray
    """[L, S, k] similarity of each negative (-inf where none)."""
    owners: np.ndarray
    """[L, S, k] sample id (harmful pool index) owning each negative (-1 where none)."""
    valid: torch.Tensor
    """[S] bool: the sample got at least one negative at every layer."""

    def all_valid(self) -> bool:
        """Whether every sample got a negative (`valid` is host memory: no synchronisation)."""
        return bool(self.valid.all())


MINING_STAT_KEYS = tuple(
    f"{name}_{kind}{suffix}" for kind in ("benign", "harmful")
    for name, suffix in (("mined_sim", ""), ("mined_sim", "_top1"), ("hardest_changed", ""))
)
"""The keys `MiningStats.values` can hold (a key is left out when its value is undefined, e.g. the
changed fraction before any sample was seen twice)."""


@dataclass
class MiningStats:
    seconds: float = 0.0
    values: dict[str, float] = field(default_factory=dict)


class HardNegativeMiner:
    """Holds the frozen bank and its index, the trained-model queue, and the hardest-negative history."""

    def __init__(
        self,
        bank: FrozenBank,
        *,
        benign_layers: Sequence[int],
        target_layers: Sequence[int],
        k: int = 4,
        backend: str = "auto",
        params: IndexParams | None = None,
        queue_size: int = 4096,
        seed: int = 0,
        center: bool = True,
    ) -> None:
        self.bank = bank
        self.benign_layers = list(benign_layers)
        self.target_layers = list(target_layers)
        self.k = int(k)
        self.params = params or IndexParams(seed=seed)
        # The frozen bank's mean per layer (fp32 [d]); None = rank raw vectors.
        self.centers: dict[int, np.ndarray] | None = None
        if center:
            self.centers = {l: self._layer_mean(bank.layer_arrays([l])[0], bank.dtype)
                            for l in sorted(set(self.target_layers) | set(self.benign_layers))}
        arrays = [self._centred(a, l, bank.dtype) for a, l in zip(bank.layer_arrays(self.target_layers), self.target_layers)]
        nbytes = bank_nbytes(len(arrays), bank.size, bank.dim, bank.dtype)
        self.index: NegativeIndex = make_index(backend, self.params, nbytes=nbytes)
        self.index.build(arrays, bank.ids, kind=bank.dtype)
        # The queue changes every step: it is searched exactly (native, or a FAISS flat index that is
        # cheap to rebuild when the frozen bank uses FAISS).
        self.queue_backend = "faiss_flat" if self.index.name.startswith("faiss") else "native"
        offset = (torch.from_numpy(np.stack([self.centers[l] for l in self.benign_layers]))
                  if self.centers is not None else None)
        self.queue = TrainedQueue(self.benign_layers, queue_size, bank.dim, bank.dtype, offset=offset)
        self.queue.fill_from(bank, seed)
        self._queue_index: NegativeIndex | None = None
        self._queue_version = -1
        self.last_hardest: dict[str, dict[int, list[int]]] = {"benign": {}, "harmful": {}}

    @property
    def backend(self) -> str:
        return self.index.name

    @staticmethod
    def _layer_mean(array: np.ndarray, dtype: str, chunk: int = 65536) -> np.ndarray:
        total = np.zeros(array.shape[1], dtype=np.float64)
        for start in range(0, array.shape[0], chunk):  # chunked: the bank may be memory-mapped
            total += to_float32(np.asarray(array[start : start + chunk]), dtype).sum(axis=0, dtype=np.float64)
        return (total / max(array.shape[0], 1)).astype(np.float32)

    def _centred(self, array: np.ndarray, layer: int, dtype: str, chunk: int = 65536) -> np.ndarray:
        """A storage-dtype copy of `array` minus the layer's centre (the array itself when not centring)."""
        if self.centers is None:
            return array
        c = self.centers[layer]
        parts = [
            torch_to_storage(torch.from_numpy(to_float32(np.asarray(array[i : i + chunk]), dtype) - c), dtype)
            for i in range(0, array.shape[0], chunk)
        ]
        return np.ascontiguousarray(np.concatenate(parts) if parts else array.copy())

    def _centred_queries(self, queries: torch.Tensor, layers: Sequence[int]) -> np.ndarray:
        q = queries.detach().float().cpu().numpy()
        if self.centers is None:
            return q
        return np.ascontiguousarray(q - np.stack([self.centers[l] for l in layers])[:, None, :])

    def _queue_search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._queue_index is None or self._queue_version != self.queue.version:
            arrays, ids = self.queue.arrays()  # already centred (the queue's offset)
            self._queue_index = make_index(self.queue_backend, self.params).build(arrays, ids, kind=self.queue.dtype)
            self._queue_version = self.queue.version
        return self._queue_index.search(queries, self.k)

    @staticmethod
    def _fill_missing(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Repeat each query's best hit into its empty slots; returns (ids, query has a hit [L, S])."""
        has = ids[..., 0] >= 0
        best = np.where(has, ids[..., 0], 0)[..., None]
        return np.where(ids >= 0, ids, best), has

    def _track(self, kind: str, sample_ids: np.ndarray, top1: np.ndarray) -> float | None:
        """Fraction of (sample, layer) pairs whose hardest negative changed since last seen."""
        history = self.last_hardest[kind]
        changed = seen = 0
        for j, sid in enumerate(sample_ids.tolist()):
            current = [int(x) for x in top1[:, j]]
            previous = history.get(int(sid))
            if previous is not None:
                seen += len(current)
                changed += sum(a != b for a, b in zip(previous, current))
            history[int(sid)] = current
        return changed / seen if seen else None

    def mine_benign(self, queries: torch.Tensor, sample_ids: torch.Tensor, stats: MiningStats) -> Mined:
        """queries [Lb, S, d] (pooled trained benign states) -> queue negatives."""
        t0 = time.perf_counter()
        q = self._centred_queries(queries, self.benign_layers)
        scores, rows = self._queue_search(q)
        rows, has = self._fill_missing(rows)
        negatives = self.queue.gather(rows)
        owners = np.where(scores > -np.inf, self.queue.ids[: self.queue.count].numpy()[rows], -1)
        stats.seconds += time.perf_counter() - t0
        self._log(stats, "benign", scores, owners, sample_ids)
        return Mined(negatives, scores, owners, torch.from_numpy(has.all(axis=0)))

    def mine_harmful(self, queries: torch.Tensor, sample_ids: torch.Tensor, stats: MiningStats, *,
                     track: bool = True, tag: str = "harmful") -> Mined:
        """queries [Lt, S, d] (pooled trained harmful states) -> frozen-bank negatives, own sample excluded."""
        t0 = time.perf_counter()
        q = self._centred_queries(queries, self.target_layers)
        groups = sample_ids.detach().cpu().numpy().astype(np.int64)
        scores, rows = self.index.search(q, self.k, groups)
        rows, has = self._fill_missing(rows)
        negatives = self.bank.gather(self.target_layers, rows)
        owners = np.where(scores > -np.inf, self.bank.ids[rows], -1)
        stats.seconds += time.perf_counter() - t0
        if track:
            self._log(stats, tag, scores, owners, sample_ids)
        return Mined(negatives, scores, owners, torch.from_numpy(has.all(axis=0)))

    def _log(self, stats: MiningStats, kind: str, scores: np.ndarray, owners: np.ndarray, sample_ids: torch.Tensor) -> None:
        finite = scores[np.isfinite(scores)]
        if finite.size:
            stats.values[f"mined_sim_{kind}"] = float(finite.mean())
            stats.values[f"mined_sim_{kind}_top1"] = float(scores[..., 0][np.isfinite(scores[..., 0])].mean())
        changed = self._track(kind, sample_ids.detach().cpu().numpy(), owners[..., 0])
        if changed is not None:
            stats.values[f"hardest_changed_{kind}"] = changed

    def push(self, vectors: torch.Tensor, sample_ids: torch.Tensor) -> None:
        """Refresh the queue with [Lb, S, d] trained harmful vectors."""
        self.queue.push(vectors, sample_ids)

    # --- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue.state_dict(),
            "last_hardest": {kind: {int(s): list(v) for s, v in h.items()} for kind, h in self.last_hardest.items()},
            "bank_key": self.bank.key,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queue.load_state_dict(state["queue"])
        self._queue_index, self._queue_version = None, -1
        self.last_hardest = {kind: {int(s): [int(x) for x in v] for s, v in h.items()} for kind, h in state["last_hardest"].items()}
        if state.get("bank_key") != self.bank.key:
            import warnings

            warnings.warn("resuming with a different frozen bank than the checkpoint was written with", stacklevel=2)


__all__ = ["MINING_STAT_KEYS", "HardNegativeMiner", "Mined", "MiningStats"]
