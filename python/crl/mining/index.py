"""Nearest-neighbour indexes over per-layer banks, behind one interface.

A bank is ``[L, N, d]``: one ``[N, d]`` matrix of pooled vectors per layer, with one group id per row
(``[N]`` int64, the sample each vector belongs to, shared by every layer). A search takes per-layer
queries ``[L, Q, d]`` and returns, per layer and query, the ``k`` most similar rows (best first) as
``(scores [L, Q, k] float32, ids [L, Q, k] int64)``; slots that no row fills hold id ``-1`` and score
``-inf``. With ``query_groups`` ``[Q]`` a query never gets a row of its own group (its own sample).

Similarity: ``cosine`` (default) or ``ip`` (inner product). FAISS backends get L2-normalised copies
for cosine and use inner-product indexes.

Backends (`make_index`):

* ``native`` -- the exact Rust miner (`crl._native.search_many`): the bank is searched in place
  (bf16 banks as their int16 bits, fp32 as is; an fp16 bank is converted to fp32 once), all layers in
  one call, the GIL released, group exclusion inside the loop. ``native_fp32`` forces fp32.
* ``faiss_flat`` -- ``IndexFlatIP`` per layer (exact). FAISS switches to a BLAS GEMM only above
  ``faiss.cvar.distance_compute_blas_threshold`` queries; for high dimensions (d >= 256) the
  threshold is set to 1 during our searches, since FAISS's own loop is several times slower there.
* ``faiss_ivf`` -- ``IndexIVFFlat`` per layer (approximate); trained by k-means on (a sample of) the
  bank, ``nlist`` lists (auto: about 4 sqrt(N), at least 1, at most N / 39 so that every centroid
  gets 39 training points), ``nprobe`` lists visited per query.
* ``faiss_hnsw`` -- ``IndexHNSWFlat`` per layer (approximate; ``M``, ``efConstruction``,
  ``efSearch``). Its construction is multi-threaded and not bit-reproducible from run to run.
* ``auto`` -- ``native`` when the bank fits in memory (its bytes at most ``auto_native_max_gib``
  and at most half the memory available now), ``faiss_ivf`` beyond.

Group exclusion for FAISS backends (which cannot filter inside the search): over-fetch and filter.
Each query asks for ``k + m`` candidates, ``m`` being the largest number of bank rows sharing one
group (1 for a bank with one vector per sample), drops the rows of its own group and keeps the
first ``k``. For the exact flat index this gives exactly the native result. For IVF/HNSW the
candidates are approximate anyway; if fewer than ``k`` remain after filtering (possible only when
the approximate search returned padding), the query is searched again with twice the over-fetch, up
to the bank size.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Backend = Literal["auto", "native", "native_fp32", "faiss_flat", "faiss_ivf", "faiss_hnsw"]
BACKENDS: tuple[str, ...] = ("auto", "native", "native_fp32", "faiss_flat", "faiss_ivf", "faiss_hnsw")
Metric = Literal["cosine", "ip"]


# --- dtype helpers -------------------------------------------------------------------------------


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as int16."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return r.view(np.int16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (int16/uint16) -> float32."""
    return (np.asarray(bits).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_float32(x: np.ndarray, kind: str) -> np.ndarray:
    """A bank array in storage kind ``float32``, ``float16`` or ``bfloat16`` (int16 bits) -> float32."""
    if kind == "bfloat16":
        return bf16_to_float32(x)
    return np.asarray(x, dtype=np.float32)


def storage_kind(x: np.ndarray, kind: str | None = None) -> str:
    if kind is not None:
        return kind
    if x.dtype == np.float32:
        return "float32"
    if x.dtype == np.float16:
        return "float16"
    if x.dtype in (np.int16, np.uint16):
        return "bfloat16"
    raise TypeError(f"bank: unsupported dtype {x.dtype} (float32, float16, or bf16 bits as int16)")


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (or a large number when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def _normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --- the interface ----------------------------------------------------------------------------------


@dataclass
class IndexParams:
    metric: Metric = "cosine"
    nlist: int = 0
    """IVF lists; 0 = auto (about 4 sqrt(N))."""
    nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 128
    train_size: int = 0
    """Vectors used to train IVF (0 = min(N, 64 * nlist))."""
    threads: int | None = None
    auto_native_max_gib: float = 8.0
    seed: int = 0


class NegativeIndex(ABC):
    """A per-layer top-k index over a bank ``[L, N, d]`` with per-row groups ``[N]``."""

    name: str = "?"
    exact: bool = True

    def __init__(self, params: IndexParams) -> None:
        self.params = params
        self.num_layers = 0
        self.size = 0
        self.dim = 0
        self.groups: np.ndarray | None = None
        self.max_group_count = 1
        self.build_seconds = 0.0

    def build(self, bank: np.ndarray | Sequence[np.ndarray], groups: np.ndarray | None = None, *,
              kind: str | None = None) -> "NegativeIndex":
        """Index ``bank``: [L, N, d], or a list of L [N, d] arrays (e.g. one memory-mapped file per
        layer), in float32, float16, or bf16 bits as int16 (kind 'bfloat16')."""
        if isinstance(bank, np.ndarray):
            if bank.ndim != 3:
                raise ValueError(f"bank: expected [layers, N, d], got shape {bank.shape}")
            bank = [bank[l] for l in range(bank.shape[0])]
        bank = list(bank)
        if not bank or any(b.ndim != 2 or b.shape != bank[0].shape for b in bank):
            raise ValueError("bank: expected L >= 1 arrays of the same shape [N, d]")
        if bank[0].shape[0] < 1:
            raise ValueError("bank: empty")
        self.num_layers = len(bank)
        self.size, self.dim = (int(s) for s in bank[0].shape)
        if groups is not None:
            groups = np.ascontiguousarray(groups, dtype=np.int64)
            if groups.shape != (self.size,):
                raise ValueError(f"groups: expected shape [{self.size}], got {groups.shape}")
            self.max_group_count = int(np.unique(groups, return_counts=True)[1].max())
        self.groups = groups
        t0 = time.perf_counter()
        self._build(bank, storage_kind(bank[0], kind))
        self.build_seconds = time.perf_counter() - t0
        return self

    @abstractmethod
    def _build(self, bank: list[np.ndarray], kind: str) -> None: ...

    def search(self, queries: np.ndarray, k: int, query_groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of queries [L, Q, d] (float32) per layer: (scores [L, Q, k], ids [L, Q, k])."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 3 or queries.shape[0] != self.num_layers or queries.shape[2] != self.dim:
            raise ValueError(f"queries: expected [{self.num_layers}, Q, {self.dim}], got {queries.shape}")
        if k < 1:
            raise ValueError("k: expected >= 1")
        if query_groups is not None:
            if self.groups is None:
                raise ValueError("query_groups: the bank was indexed without groups")
            query_groups = np.ascontiguousarray(query_groups, dtype=np.int64)
            if query_groups.shape != (queries.shape[1],):
                raise ValueError(f"query_groups: expected shape [{queries.shape[1]}], got {query_groups.shape}")
        if queries.shape[1] == 0:
            return np.zeros((self.num_layers, 0, k), np.float32), np.zeros((self.num_layers, 0, k), np.int64)
        return self._search(queries, k, query_groups)

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, query_groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]: ...


# --- native ---------------------------------------------------------------------------------------------


class NativeIndex(NegativeIndex):
    """The exact Rust miner; bf16 banks are searched in place as int16 bits (see module docstring)."""

    name = "native"

    def __init__(self, params: IndexParams, *, force_fp32: bool = False) -> None:
        super().__init__(params)
        self.force_fp32 = force_fp32
        self.name = "native_fp32" if force_fp32 else "native"
        self.bank: list[np.ndarray] | None = None
        self.kind = "float32"

    def _build(self, bank: list[np.ndarray], kind: str) -> None:
        if kind == "bfloat16" and not self.force_fp32:
            self.bank = [np.ascontiguousarray(b).view(np.int16) for b in bank]  # in place (memmaps stay so)
            self.kind = "bfloat16"
        elif kind == "float32":
            self.bank = [np.ascontiguousarray(b) for b in bank]
            self.kind = "float32"
        else:
            self.bank = [np.ascontiguousarray(to_float32(b, kind)) for b in bank]
            self.kind = "float32"

    def _search(self, queries, k, query_groups):
        from crl import _native

        assert self.bank is not None
        q = bf16_bits(queries) if self.kind == "bfloat16" else queries
        q = [q[l] for l in range(q.shape[0])]
        metric = "cosine" if self.params.metric == "cosine" else "ip"
        kwargs = {}
        if query_groups is not None:
            kwargs = {"query_groups": query_groups, "bank_groups": self.groups}
        scores, ids = _native.search_many(q, self.bank, k, metric=metric, threads=self.params.threads, **kwargs)
        return scores, ids


# --- FAISS ----------------------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss is a dependency of the mining extra
        raise RuntimeError("mining.backend: FAISS backends need the faiss-cpu package") from exc
    return faiss


class _BlasThreshold:
    """Temporarily set faiss.cvar.distance_compute_blas_threshold (a process-wide global)."""

    def __init__(self, faiss, value: int | None) -> None:
        self.faiss, self.value, self.old = faiss, value, None

    def __enter__(self):
        if self.value is not None:
            self.old = self.faiss.cvar.distance_compute_blas_threshold
            self.faiss.cvar.distance_compute_blas_threshold = self.value

    def __exit__(self, *exc):
        if self.value is not None:
            self.faiss.cvar.distance_compute_blas_threshold = self.old


class FaissIndex(NegativeIndex):
    """One FAISS index per layer; group exclusion by over-fetching (see the module docstring)."""

    def __init__(self, params: IndexParams, kind: str) -> None:
        super().__init__(params)
        if kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"unknown FAISS index kind {kind!r}")
        self.kind = kind
        self.name = f"faiss_{kind}"
        self.exact = kind == "flat"
        self.indexes: list = []
        self.nlist = 0

    def _prepare(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return _normalize(x).astype(np.float32, copy=False) if self.params.metric == "cosine" else x

    def _auto_nlist(self, n: int) -> int:
        if self.params.nlist > 0:
            return min(self.params.nlist, n)
        return int(max(1, min(round(4 * np.sqrt(n)), n // 39)))

    def _build(self, bank: list[np.ndarray], kind: str) -> None:
        faiss = _faiss()
        if self.params.threads is not None:
            faiss.omp_set_num_threads(int(self.params.threads))
        d = self.dim
        self.indexes = []
        rng = np.random.default_rng(self.params.seed)
        for layer in range(self.num_layers):
            # per layer, in chunks, so that only one layer's fp32 copy is live besides FAISS's own
            data = self._prepare(to_float32(bank[layer], kind))
            if self.kind == "flat":
                index = faiss.IndexFlatIP(d)
            elif self.kind == "hnsw":
                index = faiss.IndexHNSWFlat(d, self.params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = self.params.hnsw_ef_construction
                index.hnsw.efSearch = self.params.hnsw_ef_search
            else:
                self.nlist = self._auto_nlist(self.size)
                quantizer = faiss.IndexFlatIP(d)
                index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
                index.cp.seed = int(self.params.seed)
                train_n = self.params.train_size or min(self.size, 64 * self.nlist)
                sample = data if train_n >= self.size else data[np.sort(rng.choice(self.size, train_n, replace=False))]
                with _BlasThreshold(faiss, 1 if d >= 256 else None):
                    index.train(sample)
                index.nprobe = min(self.params.nprobe, self.nlist)
            index.add(data)
            self.indexes.append(index)
            del data

    def _search(self, queries, k, query_groups):
        faiss = _faiss()
        if self.params.threads is not None:
            faiss.omp_set_num_threads(int(self.params.threads))
        num_layers, q, _ = queries.shape
        scores = np.full((num_layers, q, k), -np.inf, dtype=np.float32)
        ids = np.full((num_layers, q, k), -1, dtype=np.int64)
        with _BlasThreshold(faiss, 1 if self.dim >= 256 else None):
            for layer, index in enumerate(self.indexes):
                qs = self._prepare(queries[layer])
                if query_groups is None:
                    fetch = min(k, self.size)
                    s, i = index.search(qs, fetch)
                    scores[layer, :, :fetch], ids[layer, :, :fetch] = s, i
                    continue
                pending = np.arange(q)
                extra = self.max_group_count
                while pending.size:
                    fetch = min(k + extra, self.size)
                    s, i = index.search(qs[pending], fetch)
                    own = np.where(i >= 0, self.groups[np.maximum(i, 0)] == query_groups[pending, None], False)
                    keep = (i >= 0) & ~own
                    retry = []
                    for row, query in enumerate(pending):
                        sel = np.flatnonzero(keep[row])[:k]
                        scores[layer, query, : sel.size] = s[row, sel]
                        ids[layer, query, : sel.size] = i[row, sel]
                        if sel.size < k and fetch < self.size and not self.exact:
                            retry.append(query)
                    pending = np.asarray(retry, dtype=np.int64)
                    extra = 2 * (k + extra)
        # FAISS pads with -1 ids and -inf (IP) / garbage scores: normalise the padding
        scores[ids < 0] = -np.inf
        return scores, ids


# --- factory --------------------------------------------------------------------------------------------


def bank_nbytes(num_layers: int, size: int, dim: int, kind: str) -> int:
    return num_layers * size * dim * (4 if kind == "float32" else 2)


def resolve_backend(backend: str, nbytes: int, params: IndexParams) -> str:
    """`auto` -> `native` if the bank fits in memory (see module docstring), else `faiss_ivf`."""
    if backend not in BACKENDS:
        raise ValueError(f"mining.backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    limit = min(params.auto_native_max_gib * (1 << 30), available_memory_bytes() // 2)
    return "native" if nbytes <= limit else "faiss_ivf"


def make_index(backend: str, params: IndexParams | None = None, *, nbytes: int = 0) -> NegativeIndex:
    params = params or IndexParams()
    backend = resolve_backend(backend, nbytes, params)
    if backend == "native":
        return NativeIndex(params)
    if backend == "native_fp32":
        return NativeIndex(params, force_fp32=True)
    return FaissIndex(params, backend.removeprefix("faiss_"))


def exact_search(bank: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine",
                 bank_groups: np.ndarray | None = None, query_groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """numpy brute force (for tests): bank [L, N, d] float32, queries [L, Q, d] -> (scores, ids)."""
    b = bank.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "cosine":
        b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    s = np.einsum("lqd,lnd->lqn", q, b)
    if query_groups is not None:
        s = np.where(bank_groups[None, None, :] == query_groups[None, :, None], -np.inf, s)
    order = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(s, order, -1).astype(np.float32), order.astype(np.int64)


__all__ = [
    "BACKENDS", "FaissIndex", "IndexParams", "NativeIndex", "NegativeIndex", "available_memory_bytes",
    "bank_nbytes", "bf16_bits", "bf16_to_float32", "exact_search", "make_index", "resolve_backend", "to_float32",
]
