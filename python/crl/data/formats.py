"""Examples and the file formats crl reads: JSONL conversations or prompt/response records, AdvBench,
HarmBench and XSTest CSVs. Errors name the file, the line (or CSV row) and the field."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ROLES",
    "Example",
    "append_jsonl",
    "detect_format",
    "example_from_record",
    "load_examples",
    "read_jsonl_records",
    "write_jsonl",
]

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "jsonl", "advbench", "harmbench", "xstest", "csv")


@dataclass
class Example:
    """One conversation. ``messages`` holds roles system/user/assistant; the last assistant message (if
    the conversation ends with one) is the response, otherwise the example is prompt-only."""

    id: str
    messages: list[dict[str, str]]
    source: str = ""
    category: str | None = None
    label: str | None = None
    target: str | None = None  # affirmative prefix for prefilling attacks ("Sure, here is ...")
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The content of the last user message."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return m["content"]
        raise ValueError(f"example {self.id!r} has no user message")

    @property
    def response(self) -> str | None:
        """The content of the final assistant message, or None for a prompt-only example."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation without its response."""
        return self.messages[:-1] if self.response is not None else list(self.messages)

    def with_response(self, response: str, **changes: Any) -> Example:
        """A copy whose response is ``response`` (replacing any existing one)."""
        msgs = [dict(m) for m in self.prompt_messages] + [{"role": "assistant", "content": response}]
        data = {**asdict(self), "messages": msgs, **changes}
        return Example(**data)

    @classmethod
    def from_prompt(cls, id: str, prompt: str, response: str | None = None, **kw: Any) -> Example:
        msgs = [{"role": "user", "content": prompt}]
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return cls(id=id, messages=msgs, **kw)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "messages": self.messages, "source": self.source}
        for key in ("category", "label", "target", "split"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        if self.meta:
            d["meta"] = self.meta
        return d


def _err(path: Path, where: str, fieldname: str | None, msg: str) -> ValueError:
    loc = f"{path}:{where}" + (f": field {fieldname!r}" if fieldname else "")
    return ValueError(f"{loc}: {msg}")


def _check_messages(messages: Any, path: Path, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _err(path, where, "messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _err(path, where, f, "must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _err(path, where, f"{f}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _err(path, where, f"{f}.content", "must be a string")
        if role == "system" and i != 0:
            raise _err(path, where, f"{f}.role", "a system message may only come first")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise _err(path, where, "messages", "has no user message")
    return out


def _opt_str(rec: dict[str, Any], key: str, path: Path, where: str) -> str | None:
    value = rec.get(key)
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _err(path, where, key, f"must be a string, got {type(value).__name__}")
    return value


def example_from_record(rec: Any, path: Path, lineno: int, source: str) -> Example:
    where = f"line {lineno}"
    if not isinstance(rec, dict):
        raise _err(path, where, None, "each line must be a JSON object")
    if "messages" in rec:
        messages = _check_messages(rec["messages"], path, where)
    else:
        pkey = next((k for k in ("prompt", "instruction", "goal") if k in rec), None)
        if pkey is None:
            raise _err(path, where, "prompt", "missing (expected 'messages', or 'prompt'/'instruction' with optional 'response'/'output')")
        prompt = rec[pkey]
        if not isinstance(prompt, str) or not prompt.strip():
            raise _err(path, where, pkey, "must be a non-empty string")
        if pkey == "instruction" and isinstance(rec.get("input"), str) and rec["input"].strip():
            prompt = f"{prompt}\n\n{rec['input']}"
        rkey = next((k for k in ("response", "output", "completion") if k in rec), None)
        response = rec.get(rkey) if rkey else None
        if response is not None and not isinstance(response, str):
            raise _err(path, where, rkey, "must be a string or null")
        messages = [{"role": "user", "content": prompt}]
        system = rec.get("system")
        if isinstance(system, str) and system:
            messages.insert(0, {"role": "system", "content": system})
        if response is not None:
            messages.append({"role": "assistant", "content": response})
    ex_id = _opt_str(rec, "id", path, where) or f"{Path(path).stem}-{lineno}"
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    return Example(
        id=ex_id,
        messages=messages,
        source=src if (src := _opt_str(rec, "source", path, where)) is not None else source,
        category=_opt_str(rec, "category", path, where),
        label=_opt_str(rec, "label", path, where),
        target=_opt_str(rec, "target", path, where),
        split=_opt_str(rec, "split", path, where),
        meta=meta,
    )


def read_jsonl_records(path: str | Path, *, tolerate_partial_last_line: bool = False) -> list[dict[str, Any]]:
    """Parse a JSONL file into objects (blank lines skipped). With ``tolerate_partial_last_line`` a last
    line without its newline that does not parse (a crash mid-write) is ignored."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if tolerate_partial_last_line and i == len(lines) and not line.endswith("\n"):
                break
            raise _err(path, f"line {i}", None, f"invalid JSON ({e.msg} at column {e.colno})") from None
        out.append(rec)
    return out


def _load_jsonl(path: Path, source: str) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise _err(path, f"line {lineno}", None, f"invalid JSON ({e.msg} at column {e.colno})") from None
            examples.append(example_from_record(rec, path, lineno, source))
    return examples


def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise _err(path, "line 1", None, "empty CSV (no header)")
        reader.fieldnames = header
        rows = []
        for rec in reader:
            # reader.line_num is the physical line where the record ends; rows are 1-based after the header
            if None in rec:
                raise _err(path, f"row {len(rows) + 1} (line {reader.line_num})", None, "more fields than the header")
            rows.append((reader.line_num, {k: (v if v is not None else "") for k, v in rec.items()}))
    return header, rows


def _require(path: Path, header: Sequence[str], cols: Sequence[str], fmt: str) -> None:
    missing = [c for c in cols if c not in header]
    if missing:
        raise _err(path, "line 1", missing[0], f"missing column for the {fmt} format (header: {', '.join(header)})")


def _nonempty(path: Path, i: int, lineno: int, row: dict[str, str], col: str) -> str:
    value = row.get(col, "")
    if not value.strip():
        raise _err(path, f"row {i + 1} (line {lineno})", col, "is empty")
    return value


def detect_format(path: str | Path) -> str:
    """Guess a file's format from its extension and, for CSV, its header."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
        if "goal" in header:
            return "advbench"
        if "Behavior" in header:
            return "harmbench"
        if {"prompt", "type"} <= set(header):
            return "xstest"
        if "prompt" in header:
            return "csv"
        raise ValueError(
            f"{path}:line 1: cannot tell the CSV format from its header ({', '.join(header)}); expected "
            "AdvBench (goal,target), HarmBench (Behavior,...), XSTest (id,prompt,type,label) or prompt[,response]"
        )
    raise ValueError(f"{path}: unknown file type {suffix!r}; expected .jsonl or .csv (or pass format=)")


def load_examples(path: str | Path, *, format: str = "auto") -> list[Example]:
    """Read examples from ``path``.

    Formats: ``jsonl`` (objects with ``messages``, or ``prompt``/``response``, ``instruction``/``output``
    [+ ``input``], with optional ``id``, ``category``, ``label``, ``target``, ``split``, ``source``,
    ``system``); ``advbench`` (CSV ``goal,target``: prompt = goal, response = target, also kept as
    ``target``); ``harmbench`` (CSV ``Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,
    BehaviorID``: the context string, when present, precedes the behaviour as in HarmBench's own
    prompts); ``xstest`` (CSV ``id,prompt,type,label,...``: category = type, label = safe/unsafe; the
    labelled completion files are read too, with the completion as the response); ``csv`` (``prompt``
    and optional ``response``, ``id``, ``category``, ``label`` columns). Raises ValueError naming the
    file, line and field on bad input.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    source = path.stem
    if fmt == "jsonl":
        return _load_jsonl(path, source)
    header, rows = _read_csv(path)
    return _CSV_READERS[fmt](path, header, rows, source)


def _advbench_rows(path: Path, header: list[str], rows: list, source: str) -> list[Example]:
    _require(path, header, ["goal", "target"], "AdvBench")
    out = []
    for i, (ln, row) in enumerate(rows):
        goal = _nonempty(path, i, ln, row, "goal")
        target = row.get("target", "").strip() or None
        ex = Example.from_prompt(f"advbench-{i:04d}", goal, target, source="advbench", label="harmful")
        ex.target = target
        out.append(ex)
    return out


def _harmbench_rows(path: Path, header: list[str], rows: list, source: str) -> list[Example]:
    _require(path, header, ["Behavior"], "HarmBench")
    out = []
    for i, (ln, row) in enumerate(rows):
        behavior = _nonempty(path, i, ln, row, "Behavior")
        context = row.get("ContextString", "").strip()
        prompt = f"{context}\n\n---\n\n{behavior}" if context else behavior
        ex_id = row.get("BehaviorID", "").strip() or f"harmbench-{i:04d}"
        meta = {k: row[k] for k in ("FunctionalCategory", "Tags") if row.get(k)}
        out.append(Example.from_prompt(ex_id, prompt, source="harmbench",
                                       category=row.get("SemanticCategory", "").strip() or None, label="harmful",
                                       meta=meta))
    return out


def _xstest_rows(path: Path, header: list[str], rows: list, source: str) -> list[Example]:
    _require(path, header, ["prompt", "type"], "XSTest")
    out = []
    for i, (ln, row) in enumerate(rows):
        prompt = _nonempty(path, i, ln, row, "prompt")
        raw_id = row.get("id", "").strip() or str(i + 1)
        label = row.get("label", "").strip() or None
        if label is None and row.get("type"):
            label = "unsafe" if row["type"].startswith("contrast_") else "safe"
        response = row.get("completion") if "completion" in header else None
        meta = {k: row[k] for k in ("focus", "note", "final_label", "gpt4_label") if row.get(k)}
        out.append(Example.from_prompt(raw_id if raw_id.startswith("v2-") else f"xstest-{raw_id}", prompt, response,
                                       source="xstest", category=row.get("type", "").strip() or None, label=label,
                                       meta=meta))
    return out


def _prompt_csv_rows(path: Path, header: list[str], rows: list, source: str) -> list[Example]:
    _require(path, header, ["prompt"], "prompt CSV")
    out = []
    for i, (ln, row) in enumerate(rows):
        prompt = _nonempty(path, i, ln, row, "prompt")
        response = row.get("response") if "response" in header else None
        out.append(Example.from_prompt(row.get("id", "").strip() or f"{source}-{i:04d}", prompt, response,
                                       source=source, category=row.get("category", "").strip() or None,
                                       label=row.get("label", "").strip() or None))
    return out


#: The CSV formats of `load_examples`, by name.
_CSV_READERS = {"advbench": _advbench_rows, "harmbench": _harmbench_rows, "xstest": _xstest_rows, "csv": _prompt_csv_rows}


def write_jsonl(path: str | Path, examples: Iterable[Example | dict[str, Any]]) -> Path:
    """Write examples (or plain dicts) as JSONL atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ex in examples:
                rec = ex.to_dict() if isinstance(ex, Example) else ex
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records to a JSONL file and flush them to disk (for resumable, incremental writing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
