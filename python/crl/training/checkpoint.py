"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder `checkpoints/step-NNNNNN/` written under a temporary name and renamed into
place, then named in `checkpoints/latest` (replaced atomically). A run killed at any moment
therefore finds either the previous complete checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _flatten_state(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference key, collecting the tensors."""
    if isinstance(state, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = state.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(state, dict):
        return {"__dict__": [[_flatten_state(k, tensors), _flatten_state(v, tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        return {"__list__" if isinstance(state, list) else "__tuple__": [_flatten_state(v, tensors) for v in state]}
    if isinstance(state, (int, float, str, bool)) or state is None:
        return state
    raise TypeError(f"cannot checkpoint a value of type {type(state).__name__}")


def _unflatten_state(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__dict__" in data:
            return {_unflatten_state(k, tensors): _unflatten_state(v, tensors) for k, v in data["__dict__"]}
        if "__list__" in data:
            return [_unflatten_state(v, tensors) for v in data["__list__"]]
        if "__tuple__" in data:
            return tuple(_unflatten_state(v, tensors) for v in data["__tuple__"])
    return data


def save_state(directory: Path, name: str, state: Any) -> None:
    """Write a nested state (e.g. an optimizer's state_dict) as NAME.safetensors + NAME.json."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten_state(state, tensors)
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(structure), encoding="utf-8")


def load_state(directory: Path, name: str, device: str | torch.device = "cpu") -> Any:
    tensors = load_file(str(directory / f"{name}.safetensors"), device=str(device))
    structure = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    return _unflatten_state(structure, tensors)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


def numpy_state_to_plain(state: Any) -> Any:
    kind, keys, pos, has_gauss, cached = state
    return [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def write_checkpoint(
    checkpoints_dir: Path,
    step: int,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and prune old ones.

    `extra` maps names to further nested states (e.g. the mining queue, the refinement's
    perturbations), each written as NAME.safetensors + NAME.json; their names are recorded in
    trainer_state["extra_states"] and `read_checkpoint` returns them under "extra"."""
    if extra:
        trainer_state = {**trainer_state, "extra_states": sorted(extra)}
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=checkpoints_dir, prefix=f".step-{step:06d}."))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, str(tmp / "adapter.safetensors"))
        save_state(tmp, "optimizer", optimizer)
        save_state(tmp, "scheduler", scheduler)
        rng = rng_state()
        rng["numpy"] = numpy_state_to_plain(rng["numpy"])
        save_state(tmp, "rng", rng)
        for name, state in (extra or {}).items():
            save_state(tmp, name, state)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
        for item in tmp.iterdir():  # make the files durable before the rename publishes them
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(checkpoints_dir / LATEST, final.name + "\n")
    existing = sorted(p for p in checkpoints_dir.glob("step-*") if p.is_dir())
    for old in existing[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    pointer = checkpoints_dir / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    rng = load_state(path, "rng")
    kind, keys, pos, has_gauss, cached = rng["numpy"]
    rng["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return {
        "adapter": load_file(str(path / "adapter.safetensors"), device=str(device)),
        "optimizer": load_state(path, "optimizer", device),
        "scheduler": load_state(path, "scheduler"),
        "rng": rng,
        "trainer_state": trainer_state,
        "extra": {name: load_state(path, name, device) for name in trainer_state.get("extra_states", [])},
    }
