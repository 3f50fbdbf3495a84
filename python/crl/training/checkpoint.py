"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is a folder `checkpoints/step-NNNNNN/` written under a temporary name
(`checkpoints/.step-NNNNNN.*`) and renamed into place, then named in `checkpoints/latest` (replaced
atomically; for people: resumption does not trust it). A run killed at any moment therefore finds the
previous complete checkpoints and perhaps the new one, never a half-written one under a final name.
Resumption scans the `step-*` folders by step number and takes the newest that `verify_checkpoint`
finds complete (every file present, safetensors headers consistent with the file sizes, JSON
parseable), so a missing or stale `latest`, or a damaged folder, falls back to the previous complete
checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from crl.atomic import atomic_write_text
from crl.config import ConfigError

LATEST = "latest"


def _fsync_tree(folder: Path) -> None:
    for item in folder.rglob("*"):
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: not every platform opens folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_directory(tmp: Path, final: Path) -> None:
    """Put the folder `tmp` in the place of `final` (beside it, same file system). A folder cannot be
    renamed over a non-empty one: the old one is first renamed aside (`.NAME.old-*`) and removed after;
    a kill in between leaves no `final` but the aside copy, which `remove_orphans` clears."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, old / final.name)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """A temporary folder beside `final` (`.NAME.*`) to write into; when the block ends without an
    error its files are made durable and it replaces `final`; after an error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
        _fsync_tree(tmp)
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_orphans(output_dir: Path, names: tuple[str, ...] = ("adapter",)) -> list[Path]:
    """Remove what a killed run can leave behind in a run folder: temporary checkpoint folders
    (`checkpoints/.step-*`), temporary files of atomic writes (`.NAME.*.tmp`) and temporary or
    set-aside copies of the folders in `names` (`.adapter.*`). Returns what was removed."""
    removed: list[Path] = []
    checkpoints_dir = output_dir / "checkpoints"
    patterns = [(checkpoints_dir, ".step-*"), (checkpoints_dir, ".*.tmp"), (output_dir, ".*.tmp")]
    patterns += [(output_dir, f".{name}.*") for name in names]
    for folder, pattern in patterns:
        if not folder.is_dir():
            continue
        for item in folder.glob(pattern):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed


def check_output_folder(path: Path, *, create: bool) -> None:
    """ConfigError unless `path` is (or can be made) a folder crl can write in: not a file, not under
    a file, not read-only. With `create`, a missing folder is created."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--output-dir {path}: is a file, expected a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"--output-dir {path}: {existing} is a file, expected a folder")
    if not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".crl-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"--output-dir {path}: cannot write there ({exc.strerror or exc}); expected a writable folder") from None


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
        _fsync_tree(tmp)  # make the files durable before the rename publishes them
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(checkpoints_dir / LATEST, final.name + "\n")
    prune_checkpoints(checkpoints_dir, keep, written=final)
    return final


def prune_checkpoints(checkpoints_dir: Path, keep: int, *, written: Path | None = None) -> list[Path]:
    """Remove all but the `keep` newest checkpoints by step number; never `written` (the one just
    written). Returns the removed folders."""
    existing = list_checkpoints(checkpoints_dir)
    kept = set(existing[-keep:]) if keep > 0 else set()
    if written is not None:
        kept.add(written)
    removed = [p for p in existing if p not in kept]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def checkpoint_step(path: Path) -> int | None:
    """The step number of a `step-NNNNNN` folder name, None for any other name."""
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The `step-NNNNNN` folders, oldest first by step number (not by name, nor by `latest`)."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in checkpoints_dir.iterdir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None) if p.is_dir()]


class DamagedCheckpoint(ValueError):
    """A checkpoint folder that is incomplete or unreadable (the message says which file and why)."""


#: Bytes per element of the safetensors dtypes (for the size check of `verify_safetensors`).
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "U16": 2, "I16": 2, "F16": 2,
                         "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def verify_safetensors(path: Path) -> None:
    """Raise DamagedCheckpoint unless `path` is a whole safetensors file: an 8-byte header length, a
    JSON header, and tensor data that fills the rest of the file exactly (a truncated file fails)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise DamagedCheckpoint(f"{path}: {size} bytes, shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise DamagedCheckpoint(f"{path}: truncated ({size} bytes; its header alone claims {header_len})")
            header = json.loads(handle.read(header_len).decode("utf-8"))
    except OSError as exc:
        raise DamagedCheckpoint(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, DamagedCheckpoint):
            raise
        raise DamagedCheckpoint(f"{path}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise DamagedCheckpoint(f"{path}: the safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in info["data_offsets"])
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            itemsize = _SAFETENSORS_ITEMSIZE.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise DamagedCheckpoint(f"{path}: tensor {name!r} has a malformed header entry") from None
        if not 0 <= begin <= stop or (itemsize is not None and stop - begin != count * itemsize):
            raise DamagedCheckpoint(f"{path}: tensor {name!r} has inconsistent offsets")
        end = max(end, stop)
    if 8 + header_len + end != size:
        raise DamagedCheckpoint(f"{path}: {size} bytes where the header describes {8 + header_len + end} (truncated?)")


def _verify_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path}: missing") from None
    except OSError as exc:
        raise DamagedCheckpoint(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise DamagedCheckpoint(f"{path}: not valid JSON ({exc})") from None


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check that a checkpoint folder is complete without loading its tensors: trainer_state.json
    parses and names the folder's step; the adapter, optimizer, scheduler, RNG and every extra state
    are present, their JSON parses and their safetensors headers match the file sizes. Returns the
    trainer state; raises DamagedCheckpoint naming the first bad file."""
    state = _verify_json(path / "trainer_state.json")
    step = checkpoint_step(path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("streams"), dict):
        raise DamagedCheckpoint(f"{path / 'trainer_state.json'}: expected an object with 'step' and 'streams'")
    if step is not None and state["step"] != step:
        raise DamagedCheckpoint(f"{path / 'trainer_state.json'}: step {state['step']}, but the folder is step {step}")
    extra = state.get("extra_states", [])
    if not isinstance(extra, list) or not all(isinstance(n, str) for n in extra):
        raise DamagedCheckpoint(f"{path / 'trainer_state.json'}: 'extra_states' is not a list of names")
    for name in ["adapter", "optimizer", "scheduler", "rng", *extra]:
        tensors = path / f"{name}.safetensors"
        if not tensors.is_file():
            raise DamagedCheckpoint(f"{tensors}: missing")
        verify_safetensors(tensors)
        if name != "adapter":
            _verify_json(path / f"{name}.json")
    return state


def complete_checkpoints(checkpoints_dir: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the complete checkpoints, newest first; the damaged ones with the reason), by scanning the
    `step-*` folders (see `verify_checkpoint`)."""
    complete: list[Path] = []
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as exc:
            damaged.append((path, str(exc)))
        else:
            complete.append(path)
    return complete, damaged


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint by step number (`checkpoints/latest` is not trusted), or None."""
    complete, _ = complete_checkpoints(checkpoints_dir)
    return complete[0] if complete else None


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
