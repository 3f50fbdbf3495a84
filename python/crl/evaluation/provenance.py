"""What each evaluation record was made with, and the check that a resumed evaluation still matches.

An evaluation folder resumes: a rerun skips every (model, purpose, attack, prompt) already recorded.
That is only right while the records were made with the settings the config asks for now. So every
record carries

- ``settings``: what changes the generation: the attack's own config (kind, steps, lr, radius,
  layer, template, ...), the eval-wide values that enter it (max_new_tokens as resolved, the system
  prompt, dtype, seed, base model) and ``model``, the identity of the weights (``base``, or the
  sha256 of the adapter's weights file);
- ``judge``: a digest of the judge's settings and of the learned heads' weights it used.

On resume, a record whose settings differ from the config's refuses the run (a ConfigError, exit 2,
naming the attack, the field, the recorded and the configured value) unless ``regenerate`` is set:
then the stale records are set aside in ``records.stale.jsonl`` (appended, never lost) and made
again. A judge change refuses unless ``--rejudge``, which judges every record again. Records written
before crl recorded settings carry none: they are checked against the folder's previous
eval_config.json where it exists (their weights cannot be checked), and accepted otherwise.

Not part of the settings, on purpose: ``batch_size`` and ``device`` (padding and kernels change the
last bits of greedy decoding, not what is asked for), the prompt set's source and limit (each record
holds its prompt's text and id; a prompt that is gone is simply not reported).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from crl.config import ConfigError, from_dict, to_dict
from crl.evaluation.config import AttackConfig, EvalConfig, JudgeConfig

# Attack-config keys that select prompts or name things rather than change what is generated.
_NOT_GENERATION = ("name", "prompt_set", "limit")
STALE_FILE = "records.stale.jsonl"


def attack_settings(acfg: AttackConfig, config: EvalConfig) -> dict[str, Any]:
    """The settings an attack record was generated with (without the model's identity)."""
    out = {k: v for k, v in to_dict(acfg).items() if k not in _NOT_GENERATION}
    out["max_new_tokens"] = acfg.max_new_tokens or config.max_new_tokens
    return _as_stored({**out, **_eval_wide(config)})


def answer_settings(config: EvalConfig) -> dict[str, Any]:
    """The settings of the capability answers (direct requests with the eval's generation budget)."""
    return _as_stored({"kind": "direct", "max_new_tokens": config.max_new_tokens, **_eval_wide(config)})


def _as_stored(settings: dict[str, Any]) -> dict[str, Any]:
    """As it reads back from records.jsonl (tuples become lists), so that equal settings compare equal."""
    return json.loads(json.dumps(settings, default=str))


def _eval_wide(config: EvalConfig) -> dict[str, Any]:
    return {"system_prompt": config.system_prompt, "dtype": config.dtype, "seed": config.seed,
            "base_model": config.base_model}


def adapter_identity(adapter_dir: Path) -> str:
    """sha256 of the adapter's weights file (what a retrained run changes)."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        path = Path(adapter_dir) / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
            return "sha256:" + digest.hexdigest()
    return "unknown"


def judge_digest(judge: JudgeConfig) -> str:
    """A digest of the judge's settings and of the learned heads' weight files it loads."""
    from crl.evaluation.judges.heads import WEIGHTS_DIR

    digest = hashlib.sha256(json.dumps(to_dict(judge), sort_keys=True, default=str).encode())
    heads = Path(judge.heads_dir) if judge.heads_dir else WEIGHTS_DIR
    if judge.refusal_head or judge.content_head:
        for path in sorted(heads.glob("*.safetensors")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def read_previous_config(output_dir: Path) -> EvalConfig | None:
    """The eval_config.json a previous run left in the folder, or None (absent, damaged, or from a
    crl whose config no longer parses)."""
    path = Path(output_dir) / "eval_config.json"
    try:
        return from_dict(EvalConfig, json.loads(path.read_text()), source=str(path))
    except (OSError, ValueError, ConfigError, TypeError):
        return None


def differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, expected value) for every key whose values differ."""
    keys = sorted(set(recorded) | set(expected))
    return [(k, recorded.get(k), expected.get(k)) for k in keys if recorded.get(k) != expected.get(k)]


class ProvenanceCheck:
    """Compares the stored records with the settings the current config would record.

    expected(rec) gives the settings the config would give `rec` (None: the record's attack is no
    longer configured, nothing to compare); legacy(rec) gives the settings a record without them was
    presumably made with (from the previous eval_config.json), or None when unknown."""

    def __init__(self, expected: Callable[[dict[str, Any]], dict[str, Any] | None],
                 legacy: Callable[[dict[str, Any]], dict[str, Any] | None], judge: str,
                 legacy_judge: str | None):
        self.expected, self.legacy, self.judge, self.legacy_judge = expected, legacy, judge, legacy_judge

    def stale(self, records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[tuple[str, Any, Any]]]]:
        """The records made with other generation settings, each with its differences."""
        out = []
        for rec in records:
            want = self.expected(rec)
            if want is None:
                continue
            have = rec.get("settings")
            if have is None:  # written before settings were recorded: compare what the old config says
                have = self.legacy(rec)
                if have is None:
                    continue
                want = {k: v for k, v in want.items() if k != "model"}
            diffs = differences(have, want)
            if diffs:
                out.append((rec, diffs))
        return out

    def misjudged(self, records: list[dict[str, Any]]) -> int:
        """How many records were judged with other judge settings than the configured ones."""
        return sum((rec.get("judge") or self.legacy_judge or self.judge) != self.judge for rec in records)


def describe_stale(stale: list[tuple[dict[str, Any], list[tuple[str, Any, Any]]]], records_path: Path) -> str:
    """One line: which records are stale and the first differences, named by config field."""
    groups: dict[tuple[str, str], list[tuple[str, Any, Any]]] = {}
    for rec, diffs in stale:
        groups.setdefault((rec["model"], rec["attack"]), diffs)
    parts = []
    for (model, attack), diffs in list(groups.items())[:3]:
        fields = ", ".join(f"{_field(attack, model, k)} = {old!r} in the records, {new!r} now" for k, old, new in diffs[:3])
        parts.append(f"{model} / {attack}: {fields}")
    more = f" (and {len(groups) - 3} more groups)" if len(groups) > 3 else ""
    return (f"{records_path}: {len(stale)} records were made with other settings than the config's: "
            + "; ".join(parts) + more + ". Use a new --output-dir, or pass --regenerate to set them aside in "
            f"{STALE_FILE} and make them again")


def _field(attack: str, model: str, key: str) -> str:
    if key == "model":
        return f"adapters.{model} (its weights)"
    if key in ("system_prompt", "dtype", "seed", "base_model"):
        return key
    return f"attacks.{attack}.{key}"


def set_aside(stale_records: list[dict[str, Any]], output_dir: Path) -> None:
    """Append the stale records to records.stale.jsonl (fsync'd) before they leave records.jsonl."""
    import os

    with open(Path(output_dir) / STALE_FILE, "a", encoding="utf-8") as fh:
        for rec in stale_records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


__all__ = ["attack_settings", "answer_settings", "adapter_identity", "judge_digest", "read_previous_config",
           "differences", "ProvenanceCheck", "describe_stale", "set_aside", "STALE_FILE"]
