"""The representation bank: pooled per-layer vectors of the harmful samples.

Two banks feed hard-negative mining:

* `FrozenBank` -- the frozen (original) model's vectors of every harmful sample (up to a bound),
  computed once and cached on disk: one ``layer-LL.npy`` file per layer ``[N, d]`` (fp16, or bf16
  stored as its int16 bits, since numpy has no bf16), memory-mapped when read
  (``np.load(mmap_mode="r")``), with ``ids.npy`` ``[N]`` (the sample's index in the encoded harmful
  pool) and ``meta.json`` (layers, dtype, example ids, key). The folder is named by a key, a hash of
  the model's weights, the encoded data (token ids and selected tokens), the layers, the pooling and
  the storage settings: a later run with the same key reuses it, any change gives another key and a
  new bank. A bank is written under a temporary name and renamed into place, so a killed build never
  leaves a half-written bank behind.
* `TrainedQueue` -- the trained model's vectors, a FIFO queue of bounded size refreshed as training
  goes (the pooled trained harmful states of every micro-batch are pushed, oldest out). It starts as
  a seeded sample of the frozen bank, which is exact at step 0 (LoRA starts at zero, so the trained
  model equals the frozen one). It lives in memory and is saved in every checkpoint
  (`state_dict`, tensors as safetensors), so a resumed run continues with the same queue.

Pooling: the mean over the selected tokens (`loss.tokens`) of each sample, at each layer, in fp32,
rounded to the storage dtype when written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from crl.mining.index import to_float32

BANK_FORMAT = 1
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# --- keys ---------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module, *, max_elements: int = 1 << 20) -> str:
    """A hash of a model's weights: every parameter and buffer's name, shape and dtype, and its
    values (all of them up to `max_elements` per tensor, an evenly strided sample beyond). LoRA
    parameters (names containing ``lora_``) are left out, so a PEFT-wrapped model hashes like its
    base model only if names match: call it on the base model before the adapter is applied."""
    h = hashlib.sha256()
    for name, tensor in sorted(list(model.state_dict().items()), key=lambda kv: kv[0]):
        if "lora_" in name:
            continue
        t = tensor.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        flat = t.reshape(-1)
        if flat.numel() > max_elements:
            flat = flat[:: flat.numel() // max_elements + 1]
        h.update(flat.cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(input_ids: Sequence[Sequence[int]], selections: Sequence[Sequence[bool]], example_ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for ids, sel, eid in zip(input_ids, selections, example_ids):
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(np.packbits(np.asarray(sel, dtype=bool)).tobytes())
        h.update(eid.encode() + b"\0")
    return h.hexdigest()


def bank_key(model_hash: str, data_hash: str, layers: Sequence[int], pooling: str, dtype: str, size: int, seed: int) -> str:
    spec = {
        "format": BANK_FORMAT, "model": model_hash, "data": data_hash, "layers": [int(l) for l in layers],
        "pooling": pooling, "dtype": dtype, "size": int(size), "seed": int(seed),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


# --- the frozen bank ------------------------------------------------------------------------------------


@dataclass
class FrozenBank:
    path: Path
    layers: list[int]
    vectors: list[np.ndarray]
    """One memory-mapped [N, d] array per layer (float16, or int16 bf16 bits)."""
    ids: np.ndarray
    """[N] int64: the sample (index in the encoded harmful pool) of each row."""
    dtype: str
    key: str
    reused: bool = False
    build_seconds: float = 0.0

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors[0].shape[1])

    def layer_arrays(self, layers: Sequence[int]) -> list[np.ndarray]:
        return [self.vectors[self.layers.index(l)] for l in layers]

    def gather(self, layers: Sequence[int], rows: np.ndarray) -> torch.Tensor:
        """float32 [L, ..., d]: rows[l] (any shape, row indices) of layer layers[l]'s bank."""
        if rows.shape[0] != len(layers):
            raise ValueError(f"rows: expected one slice per layer ({len(layers)}), got {rows.shape}")
        out = [
            to_float32(self.vectors[self.layers.index(l)][np.maximum(rows[i], 0).reshape(-1)], self.dtype)
            for i, l in enumerate(layers)
        ]
        return torch.from_numpy(np.stack(out).reshape(*rows.shape, self.dim))


def torch_to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    y = x.detach().to("cpu", _TORCH_DTYPES[dtype])
    return (y.view(torch.int16) if dtype == "bfloat16" else y).numpy()


def storage_to_torch(x: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def default_bank_root() -> Path:
    from crl.models import default_cache_dir

    return default_cache_dir() / "banks"


def open_bank(path: Path) -> FrozenBank:
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    vectors = [np.load(path / f"layer-{l:03d}.npy", mmap_mode="r") for l in meta["layers"]]
    ids = np.load(path / "ids.npy")
    return FrozenBank(path, list(meta["layers"]), vectors, ids, meta["dtype"], meta["key"], reused=True)


def pooled_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, selection: torch.Tensor,
    layers: Sequence[int],
) -> torch.Tensor:
    """[L, B, d] fp32 mean of the selected tokens' hidden states per sample (no grad)."""
    from crl.models import capture_hidden_states

    with torch.no_grad():
        hidden = capture_hidden_states(model, input_ids, attention_mask, layers)
        w = selection.float()
        counts = w.sum(1).clamp_min(1.0)[:, None]
        return torch.stack([(hidden[l].float() * w[..., None]).sum(1) / counts for l in layers])


def build_or_load_bank(
    model: torch.nn.Module,
    encoded: Sequence[Any],
    make_batch: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    selections: Sequence[Sequence[bool]],
    *,
    layers: Sequence[int],
    pooling: str,
    dtype: str = "bfloat16",
    max_size: int = 100_000,
    root: Path | None = None,
    batch_size: int = 8,
    seed: int = 0,
    model_hash: str | None = None,
    progress: bool = False,
    dist: Any = None,
) -> FrozenBank:
    """The frozen bank of `encoded` (the harmful pool) under `root`, reused when its key exists.

    `make_batch(indices)` returns (input_ids, attention_mask, selection) on the model's device for
    those samples; `selections` are the per-sample token selections (part of the key). The model
    must be the frozen one (adapter disabled, or before LoRA is applied).

    `dist` (a `crl.training.distributed.DistributedContext`; call it on every rank): the ranks work in
    lock-step, as FSDP needs (every forward of a sharded model is a collective). Rank 0 alone computes
    the key (`model_hash` is only read there: pass the fingerprint of the whole model when the model is
    sharded) and decides whether the bank exists; every rank follows that decision. A build gives the
    length-sorted batches to the ranks in turn (round k: batch k * W + rank), every rank running the
    same number of passes (a rank without a batch in the last round recomputes the first one and
    drops it); the pooled vectors are gathered to rank 0, which alone writes and renames the folder,
    then every rank opens it. The bank is the one a single process builds (same key, same batches).
    """
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"mining.bank_dtype: expected bfloat16 or float16, got {dtype!r}")
    layers = sorted(int(l) for l in layers)
    root = Path(root) if root is not None else default_bank_root()
    n_total = len(encoded)
    if n_total == 0:
        raise ValueError("bank: the harmful pool is empty")
    if n_total > max_size:
        chosen = np.sort(np.random.default_rng(seed).choice(n_total, max_size, replace=False))
    else:
        chosen = np.arange(n_total)
    main = dist is None or dist.rank == 0
    key = data_hash = None
    exists = False
    if main:
        model_hash = model_hash or model_fingerprint(model)
        data_hash = data_fingerprint(
            [encoded[i].input_ids for i in chosen], [selections[i] for i in chosen], [encoded[i].example_id for i in chosen]
        )
        key = bank_key(model_hash, data_hash, layers, pooling, dtype, len(chosen), seed)
        exists = (root / key / "meta.json").is_file()
    if dist is not None:  # every rank follows rank 0: open, or build (forwards every rank must run)
        key, exists = dist.broadcast_object((key, exists))
    final = root / key
    if exists:
        return open_bank(final)

    t0 = time.perf_counter()
    # batches of similar length (little padding), written at their rows
    order = sorted(range(len(chosen)), key=lambda j: len(encoded[chosen[j]].input_ids))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if dist is None:
        _write_bank(model, encoded, make_batch, chosen, batches, layers, dtype, root, key, pooling,
                    model_hash, data_hash, seed, progress)
    else:
        _build_bank_lockstep(model, encoded, make_batch, chosen, batches, layers, dtype, root, key, pooling,
                             model_hash, data_hash, seed, progress, dist)
    bank = open_bank(final)
    bank.reused = False
    bank.build_seconds = time.perf_counter() - t0
    return bank


class _BankFiles:
    """The temporary folder of a bank being written (by one process), renamed into place by `finish`."""

    def __init__(self, root: Path, key: str, layers: Sequence[int], dtype: str, size: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.key, self.layers, self.dtype, self.size = root, key, list(layers), dtype, size
        self.tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
        self.dim: int | None = None
        self.files: list[np.ndarray] = []

    def write(self, rows: Sequence[int], stored: np.ndarray) -> None:
        """Rows `rows` of every layer's file from `stored` [L, b, d] (storage dtype)."""
        if self.dim is None:
            self.dim = int(stored.shape[-1])
            self.files = [
                np.lib.format.open_memmap(self.tmp / f"layer-{l:03d}.npy", mode="w+", dtype=stored.dtype,
                                          shape=(self.size, self.dim))
                for l in self.layers
            ]
        for li, f in enumerate(self.files):
            f[rows] = stored[li]

    def finish(self, meta: dict[str, Any], ids: np.ndarray) -> None:
        for f in self.files:
            f.flush()
        self.files = []
        np.save(self.tmp / "ids.npy", ids.astype(np.int64))
        (self.tmp / "meta.json").write_text(json.dumps({**meta, "dim": self.dim}), encoding="utf-8")
        for item in self.tmp.iterdir():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(self.tmp, 0o755)
        final = self.root / self.key
        try:
            os.replace(self.tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent builder that won the race
                raise

    def cleanup(self) -> None:
        self.files = []
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def _bank_meta(key, layers, dtype, size, pooling, model_hash, data_hash, seed, encoded, chosen) -> dict[str, Any]:
    return {
        "format": BANK_FORMAT, "key": key, "layers": layers, "dtype": dtype, "size": int(size),
        "pooling": pooling, "model_hash": model_hash, "data_hash": data_hash, "seed": seed,
        "example_ids": [encoded[i].example_id for i in chosen],
    }


def _pooled_batch(model, make_batch, chosen, rows, layers, dtype) -> np.ndarray:
    ids, mask, sel = make_batch([int(chosen[j]) for j in rows])
    return torch_to_storage(pooled_states(model, ids, mask, sel, layers), dtype)  # [L, b, d]


def _write_bank(model, encoded, make_batch, chosen, batches, layers, dtype, root, key, pooling,
                model_hash, data_hash, seed, progress) -> None:
    """One process: every batch, written as it comes."""
    files = _BankFiles(root, key, layers, dtype, len(chosen))
    try:
        iterator: Any = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="bank", unit="batch")
        for rows in iterator:
            files.write(rows, _pooled_batch(model, make_batch, chosen, rows, layers, dtype))
        files.finish(_bank_meta(key, layers, dtype, len(chosen), pooling, model_hash, data_hash, seed, encoded, chosen),
                     chosen)
    finally:
        files.cleanup()


def _build_bank_lockstep(model, encoded, make_batch, chosen, batches, layers, dtype, root, key, pooling,
                         model_hash, data_hash, seed, progress, dist) -> None:
    """Every rank: the same number of passes; rank 0 writes (see `build_or_load_bank`). A failure to
    write on rank 0 is reported to every rank after the loop (raising at once would leave the others
    waiting in a collective)."""
    world, rank, main = dist.world_size, dist.rank, dist.rank == 0
    rounds = -(-len(batches) // world)
    files = None
    error: str | None = None
    try:
        if main:
            try:
                files = _BankFiles(root, key, layers, dtype, len(chosen))
            except Exception as exc:  # noqa: BLE001 - reported to every rank below
                error = f"{type(exc).__name__}: {exc}"
        iterator: Any = range(rounds)
        if progress and main:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"bank ({world} processes)", unit="round")
        for r in iterator:
            b = r * world + rank
            mine = batches[b] if b < len(batches) else None
            stored = _pooled_batch(model, make_batch, chosen, mine if mine is not None else batches[0], layers, dtype)
            parts = dist.gather_object((mine, stored) if mine is not None else None)
            if main and error is None:
                try:
                    for part in parts:
                        if part is not None:
                            files.write(part[0], part[1])
                except Exception as exc:  # noqa: BLE001
                    error = f"{type(exc).__name__}: {exc}"
        if main and error is None:
            try:
                files.finish(_bank_meta(key, layers, dtype, len(chosen), pooling, model_hash, data_hash, seed, encoded,
                                        chosen), chosen)
            except Exception as exc:  # noqa: BLE001
                error = f"{type(exc).__name__}: {exc}"
    finally:
        if files is not None:
            files.cleanup()
    error = dist.broadcast_object(error)  # also the barrier before the other ranks open the bank
    if error is not None:
        raise RuntimeError(f"mining: rank 0 could not write the frozen bank {root / key}: {error}")


# --- the trained-model queue ----------------------------------------------------------------------------


class TrainedQueue:
    """FIFO queue of the trained model's pooled harmful vectors, per layer (see module docstring).

    vectors: [L, capacity, d] in the storage dtype (CPU); ids: [capacity] int64 (-1 = empty slot).
    With an `offset` [L, d], the queue stores each vector minus the offset (the miner's centred
    frame, so that its index is built from `arrays()` as they are, without a copy per step); `gather`
    adds it back.
    """

    def __init__(self, layers: Sequence[int], capacity: int, dim: int, dtype: str = "bfloat16",
                 offset: torch.Tensor | None = None) -> None:
        if capacity < 1:
            raise ValueError("mining.queue_size: expected >= 1")
        self.layers = list(layers)
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.dtype = dtype
        self.vectors = torch.zeros(len(self.layers), self.capacity, self.dim, dtype=_TORCH_DTYPES[dtype])
        self.ids = torch.full((self.capacity,), -1, dtype=torch.int64)
        self.ptr = 0
        self.count = 0
        self.version = 0
        self.offset = offset.detach().to("cpu", torch.float32) if offset is not None else None

    def push(self, vectors: torch.Tensor, ids: torch.Tensor) -> None:
        """Add [L, S, d] vectors of samples `ids` [S], replacing the oldest entries."""
        vectors = vectors.detach().to("cpu")
        if self.offset is not None:
            vectors = vectors.float() - self.offset[:, None, :]
        vectors = vectors.to(self.vectors.dtype)
        ids = ids.detach().to("cpu", torch.int64)
        s = int(ids.shape[0])
        if s == 0:
            return
        if s > self.capacity:
            vectors, ids, s = vectors[:, -self.capacity :], ids[-self.capacity :], self.capacity
        slots = (self.ptr + torch.arange(s)) % self.capacity
        self.vectors[:, slots] = vectors
        self.ids[slots] = ids
        self.ptr = int((self.ptr + s) % self.capacity)
        self.count = min(self.capacity, self.count + s)
        self.version += 1

    def fill_from(self, bank: FrozenBank, seed: int) -> None:
        """Start the queue with a seeded sample of the frozen bank (exact at step 0)."""
        n = min(self.capacity, bank.size)
        rows = np.sort(np.random.default_rng(seed).choice(bank.size, n, replace=False))
        data = np.stack([bank.vectors[bank.layers.index(l)][rows] for l in self.layers])
        self.push(storage_to_torch(data, self.dtype), torch.from_numpy(bank.ids[rows].copy()))

    def arrays(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The filled part as stored (minus the offset) as one C-contiguous [count, d] numpy array per
        layer (bf16 as int16 bits; no copy when the queue is full) and the ids [count]."""
        v = self.vectors if self.count == self.capacity else self.vectors[:, : self.count].contiguous()
        v = v.view(torch.int16) if self.dtype == "bfloat16" else v
        arr = v.numpy()
        return [arr[l] for l in range(arr.shape[0])], self.ids[: self.count].numpy()

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """float32 [L, ..., d]: rows[l] (any shape, slots of the filled part) of layer l."""
        if rows.shape[0] != len(self.layers):
            raise ValueError(f"rows: expected one slice per layer ({len(self.layers)}), got {rows.shape}")
        out = [self.vectors[i, torch.from_numpy(np.maximum(rows[i], 0).reshape(-1))].float() for i in range(len(self.layers))]
        out = torch.stack(out).reshape(*rows.shape, self.dim)
        if self.offset is not None:
            out = out + self.offset.reshape(len(self.layers), *([1] * (rows.ndim - 1)), self.dim)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"vectors": self.vectors.clone(), "ids": self.ids.clone(), "ptr": self.ptr, "count": self.count,
                "version": self.version, "layers": list(self.layers), "offset": self.offset is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["layers"]) != self.layers or tuple(state["vectors"].shape) != tuple(self.vectors.shape):
            raise ValueError("mining queue in the checkpoint does not match the configuration (layers/queue_size)")
        vectors = state["vectors"].to("cpu")
        stored_offset = bool(state.get("offset", False))
        if stored_offset != (self.offset is not None):  # a checkpoint written in the other frame
            if stored_offset:
                raise ValueError("mining queue in the checkpoint is centred; resume with mining.center = true")
            vectors = vectors.float() - self.offset[:, None, :]
        self.vectors = vectors.to(self.vectors.dtype).clone()
        self.ids = state["ids"].to("cpu", torch.int64).clone()
        self.ptr, self.count, self.version = int(state["ptr"]), int(state["count"]), int(state["version"])


__all__ = [
    "FrozenBank", "TrainedQueue", "bank_key", "build_or_load_bank", "data_fingerprint", "default_bank_root",
    "model_fingerprint", "open_bank", "pooled_states", "storage_to_torch", "torch_to_storage",
]
