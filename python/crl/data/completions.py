"""Harmful completions from files (`crl data build --harmful-completions FILE`): for a model that refuses
too often for its own completions to make the harmful pool.

Formats (`load_completions(path, format="auto")`):

- ``circuit_breakers``: the Circuit Breakers training set (``circuit_breakers_train.json``), a JSON list
  of objects with ``prompt``, ``output`` (the harmful completion), ``llama3_output`` (Llama-3's
  refusal; optional) and ``category`` (optional);
- ``harmbench``: HarmBench's completion files (``generate_completions.py``), a JSON object mapping each
  behaviour id to a list of ``{"test_case": ..., "generation": ...}`` records; the files its
  ``evaluate_completions.py`` writes add ``"label"`` (1 = harmful), and then only label 1 is kept;
- ``jsonl``: one object per line with ``prompt`` and ``response`` (or ``messages`` ending with the
  assistant's answer; the keys of `crl.data.load_examples`), with optional ``id``, ``category`` and
  ``refusal`` (a refusal of the same prompt).

Refusals (``llama3_output``, ``refusal``) become refusal examples in the benign pool. Empty completions
are left out and counted. Errors name the file, the record and the field.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crl.config import ConfigError
from crl.data.formats import Example, example_from_record

__all__ = ["COMPLETION_FORMATS", "ImportedCompletions", "load_completions"]

COMPLETION_FORMATS = ("auto", "circuit_breakers", "harmbench", "jsonl")


@dataclass
class ImportedCompletions:
    """Harmful conversations (prompt + harmful completion), refusals of some of their prompts (by the
    harmful example's id), and per file what was read and left out."""

    harmful: list[Example] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)

    def extend(self, other: ImportedCompletions) -> None:
        self.harmful += other.harmful
        self.refusals.update(other.refusals)
        self.files += other.files

    def limit(self, n: int | None) -> ImportedCompletions:
        """The first `n` harmful conversations (and their refusals)."""
        if n is None:
            return self
        harmful = self.harmful[:n]
        keep = {h.id for h in harmful}
        return ImportedCompletions(harmful, {k: v for k, v in self.refusals.items() if k in keep}, self.files)


def _where(path: Path, record: str, fieldname: str | None = None) -> str:
    return f"{path}: {record}" + (f": field {fieldname!r}" if fieldname else "")


def _text(rec: dict[str, Any], key: str, path: Path, record: str, *, required: bool) -> str | None:
    if key not in rec or rec[key] is None:
        if required:
            raise ConfigError(f"{_where(path, record, key)}: missing")
        return None
    value = rec[key]
    if not isinstance(value, str):
        raise ConfigError(f"{_where(path, record, key)}: must be a string, got {type(value).__name__}")
    return value


def _circuit_breakers(data: Any, path: Path) -> tuple[list[Example], dict[str, str], Counter]:
    if not isinstance(data, list):
        raise ConfigError(f"{path}: the Circuit Breakers format is a JSON list of objects, got {type(data).__name__}")
    harmful, refusals, dropped = [], {}, Counter()
    for i, rec in enumerate(data):
        record = f"record {i}"
        if not isinstance(rec, dict):
            raise ConfigError(f"{_where(path, record)}: must be an object with 'prompt' and 'output'")
        prompt = _text(rec, "prompt", path, record, required=True)
        output = _text(rec, "output", path, record, required=True)
        refusal = _text(rec, "llama3_output", path, record, required=False)
        category = _text(rec, "category", path, record, required=False)
        if not prompt.strip():
            raise ConfigError(f"{_where(path, record, 'prompt')}: is empty")
        if not output.strip():
            dropped["empty"] += 1
            continue
        ex = Example.from_prompt(f"{path.stem}-{i:05d}", prompt, output, source="circuit_breakers", category=category,
                                 label="harmful")
        harmful.append(ex)
        if refusal and refusal.strip():
            refusals[ex.id] = refusal
    return harmful, refusals, dropped


def _harmbench_label(rec: dict[str, Any], path: Path, record: str) -> int | None:
    if "label" not in rec or rec["label"] is None:
        return None
    label = rec["label"]
    if isinstance(label, bool) or label not in (0, 1):
        raise ConfigError(f"{_where(path, record, 'label')}: must be 0 or 1 (HarmBench's classifier verdict), "
                          f"got {label!r}")
    return int(label)


def _harmbench(data: Any, path: Path) -> tuple[list[Example], dict[str, str], Counter]:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: HarmBench completions are a JSON object of behaviour id -> list of records, "
                          f"got {type(data).__name__}")
    harmful, dropped = [], Counter()
    for behavior_id, items in data.items():
        if not isinstance(items, list):
            raise ConfigError(f"{_where(path, f'behaviour {behavior_id!r}')}: must be a list of "
                              "{\"test_case\", \"generation\"} records")
        for j, rec in enumerate(items):
            record = f"behaviour {behavior_id!r}, record {j}"
            if not isinstance(rec, dict):
                raise ConfigError(f"{_where(path, record)}: must be an object with 'test_case' and 'generation'")
            if isinstance(rec.get("test_case"), list):
                raise ConfigError(f"{_where(path, record, 'test_case')}: a multimodal test case (a list); "
                                  "only text is supported")
            test_case = _text(rec, "test_case", path, record, required=True)
            generation = _text(rec, "generation", path, record, required=True)
            if not test_case.strip():
                raise ConfigError(f"{_where(path, record, 'test_case')}: is empty")
            if _harmbench_label(rec, path, record) == 0:
                dropped["label_0"] += 1
            elif not generation.strip():
                dropped["empty"] += 1
            else:
                harmful.append(Example.from_prompt(f"{path.stem}:{behavior_id}:{j}", test_case, generation,
                                                   source="harmbench", label="harmful",
                                                   meta={"behavior_id": behavior_id}))
    return harmful, {}, dropped


def _jsonl(path: Path) -> tuple[list[Example], dict[str, str], Counter]:
    harmful, refusals, dropped = [], {}, Counter()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = f"line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{_where(path, record)}: invalid JSON ({e.msg} at column {e.colno})") from None
            try:
                ex = example_from_record(rec, path, lineno, "import")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if ex.response is None:
                raise ConfigError(f"{_where(path, record, 'response')}: missing (a harmful completion of the prompt)")
            refusal = _text(rec, "refusal", path, record, required=False)
            if not ex.response.strip():
                dropped["empty"] += 1
                continue
            ex.label = "harmful"
            harmful.append(ex)
            if refusal and refusal.strip():
                refusals[ex.id] = refusal
    return harmful, refusals, dropped


def _detect(path: Path, data: Any) -> str:
    if isinstance(data, list):
        return "circuit_breakers"
    if isinstance(data, dict):
        return "harmbench"
    raise ConfigError(
        f"{path}: cannot tell the completions format: expected the Circuit Breakers training set (a JSON list of "
        "objects with 'prompt' and 'output') or HarmBench completions (a JSON object of behaviour id -> list of "
        "{'test_case', 'generation'}); JSONL files (.jsonl) hold one {'prompt', 'response'} object per line"
    )


def load_completions(path: str | Path, *, format: str = "auto") -> ImportedCompletions:
    """Read harmful completions from `path` (see the module docstring). Raises ConfigError naming the
    file, the record and the field on bad input, and for a file with no usable completion."""
    path = Path(path)
    if format not in COMPLETION_FORMATS:
        raise ConfigError(f"--completions-format: expected one of {', '.join(COMPLETION_FORMATS)}, got {format!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if format == "jsonl" or (format == "auto" and path.suffix.lower() in (".jsonl", ".ndjson")):
        fmt = "jsonl"
        harmful, refusals, dropped = _jsonl(path)
    else:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ConfigError(f"{path}: the file is empty: no harmful completion to import")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if data == [] or data == {}:
            raise ConfigError(f"{path}: no harmful completion in this file (it holds no records)")
        fmt = _detect(path, data) if format == "auto" else format
        harmful, refusals, dropped = (_circuit_breakers if fmt == "circuit_breakers" else _harmbench)(data, path)
    if not harmful:
        left_out = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "no records"
        raise ConfigError(f"{path}: no harmful completion in this file ({fmt} format; {left_out})")
    info = {"file": str(path), "format": fmt, "harmful": len(harmful), "refusals": len(refusals),
            "left_out": dict(sorted(dropped.items()))}
    return ImportedCompletions(harmful, refusals, [info])
