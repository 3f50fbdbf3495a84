"""Configuration files: TOML or YAML into typed, validated dataclasses.

Every hyperparameter of a run lives in one file. Loading is strict: an unknown key, a value of the
wrong type or out of range raises `ConfigError` naming the file, the dotted key and what was
expected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad configuration value: the message names the file, the key and what was expected."""


@dataclasses.dataclass
class Schedule:
    """A coefficient: constant (`end` unset) or linear from `start` to `end` over the run. In a file,
    a plain number is a constant; a table `{start = .., end = ..}` a linear schedule."""

    start: float
    end: float | None = None

    def at(self, progress: float) -> float:
        return self.start if self.end is None else self.start + (self.end - self.start) * progress

    def validate(self) -> None:
        require(math.isfinite(self.start), "start", "a finite number", self.start)
        require(self.end is None or math.isfinite(self.end), "end", "a finite number or unset", self.end)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: expected a .toml, .yaml, .yml or .json file")
    except ConfigError:
        raise
    except Exception as exc:  # parser errors carry line numbers; keep them
        raise ConfigError(f"{path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/mapping at the top level, got {type(data).__name__}")
    return data


def _parse_override_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `--set a.b=value` overrides (value parsed as a TOML literal, else taken as a string)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.lr=1e-4")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_override_value(raw.strip())
    return data


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a table"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if float in args and isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp is Schedule and isinstance(value, (int, float)) and not isinstance(value, bool):
        return Schedule(_convert(value, float, where))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _convert(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):  # nan and inf are never a setting: they end in NaN weights
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path string, got {value!r}")
        return Path(value)
    return value


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    moved = getattr(cls, "MOVED_KEYS", {})
    for key in unknown:
        if key in moved:  # a key that moved: name its new place (or places, by another key's value)
            prefix = where if where.endswith(": ") else f"{where}."
            head = prefix.rsplit(": ", 1)[-1]
            places = moved[key] if isinstance(moved[key], tuple) else (moved[key],)
            named = [f"{head}{place}" for place in places]
            new = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " or " + named[-1]
            raise ConfigError(f"{prefix}{key}: this key is now {new}")
    if unknown:
        raise ConfigError(
            f"{where.rstrip(': ') if where.endswith(': ') else where}: unknown key(s) {', '.join(repr(u) for u in unknown)}; expected some of: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}{name}" if where.endswith(": ") else f"{where}.{name}"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:  # "key: expected ..." from validate(): name it in full, "file: section.key: ..."
            raise ConfigError(f"{where if where.endswith(': ') else where + '.'}{exc}") from None
    return obj


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "<config>", prefix: str = "") -> T:
    """Build the dataclass `cls` from `data`, validating every key (see module docstring).

    A dataclass may define `validate(self)` raising ConfigError("key: what was expected") for
    cross-field checks; the file name is prepended.
    """
    where = f"{source}: {prefix}" if prefix else f"{source}: "
    return _build(cls, data, where)


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain JSON/TOML-compatible data (paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def require(condition: bool, key: str, expected: str, got: Any) -> None:
    """Raise ConfigError("key: expected ..., got ...") unless condition holds (for validate())."""
    if not condition:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


__all__ = ["ConfigError", "Schedule", "apply_overrides", "from_dict", "load_config_file", "require", "to_dict"]
