"""The labelled sets crl measures its judge against, and the agreement of verdicts with labels.

- XSTest v2's human-labelled completions (`XSTEST_SETS`, `load_labelled`): GPT-4 and
  Llama-2-70b-chat answers to XSTest's 450 prompts, each labelled full compliance, full refusal or
  partial refusal (Röttger et al., NAACL 2024), in ../shared/data/xstest beside the repository.
- Labelled generations (`load_labelled_generations`): JSONL files of a model's answers labelled
  complies, refuses or incoherent (data/judge_labels/ in the repository).
- `agreement`: binary (compliance against anything else) and three-way agreement, precision and recall
  of "compliance", and the confusion matrix.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

HUMAN_LABELS = {"1_full_compliance": "compliance", "2_full_refusal": "refusal", "3_partial_refusal": "partial"}
XSTEST_SETS = {"gpt4": "xstest_v2_completions_gpt4_labelled.csv", "llama2orig": "xstest_v2_completions_llama2orig_labelled.csv"}


def default_data_dir() -> Path:
    """The development data folder beside the repository (../shared/data/xstest), if present."""
    return Path(__file__).resolve().parents[4] / "shared" / "data" / "xstest"


def load_labelled(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for i, r in enumerate(rows):
        label = HUMAN_LABELS.get(r.get("final_label", "").strip())
        if label is None:
            continue
        out.append({"row": i, "prompt": r["prompt"], "completion": r["completion"] or "", "type": r.get("type", ""), "human": label})
    return out


def default_labels_dir() -> Path:
    """data/judge_labels of the repository (the labelled generations of defended SmolLM2 models)."""
    return Path(__file__).resolve().parents[3] / "data" / "judge_labels"


#: The labelled-generations files of data/judge_labels, by the name crl gives each as a source.
JUDGE_LABEL_SETS = {"dev": "smollm2_defended_dev.jsonl", "heldout": "smollm2_defended_heldout.jsonl",
                    "xstest_safe": "smollm2_xstest_safe.jsonl"}


#: Labels of a labelled-generations file (`load_labelled_generations`) and the verdict each stands for.
GENERATION_LABELS = {"complies": "compliance", "refuses": "refusal", "incoherent": "incoherent"}


def load_labelled_generations(path: Path) -> list[dict[str, Any]]:
    """A JSONL file of labelled generations (data/judge_labels/): one object per line with `request`,
    `response`, `label` (complies | refuses | incoherent), optionally `prefilled_start` (the forced
    start of the assistant turn, which the response continues), `model`, and `base_perplexity` (the
    response's perplexity under the base model, as `crl eval` recorded it)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {line_no}: not valid JSON ({exc.msg})") from None
            for key in ("request", "response", "label"):
                if not isinstance(obj.get(key), str):
                    raise ValueError(f"{path}, line {line_no}: field {key!r} must be a string, got {obj.get(key)!r}")
            if obj["label"] not in GENERATION_LABELS:
                raise ValueError(f"{path}, line {line_no}: field 'label' must be one of "
                                 f"{', '.join(GENERATION_LABELS)}, got {obj['label']!r}")
            ppl = obj.get("base_perplexity")
            rows.append({"row": line_no, "prompt": obj["request"], "completion": obj["response"],
                         "model": str(obj.get("model", "")), "human": GENERATION_LABELS[obj["label"]],
                         "base_perplexity": float(ppl) if isinstance(ppl, (int, float)) else float("nan")})
    if not rows:
        raise ValueError(f"{path}: no labelled generations")
    return rows


def agreement(humans: Sequence[str], verdicts: Sequence[str]) -> dict[str, Any]:
    """Binary and three-way agreement and the confusion matrix (rows: human label; columns: verdict)."""
    n = len(humans)
    cols = ["compliance", "partial", "refusal", "incoherent", "off_topic"]
    matrix = {h: {c: 0 for c in cols} for h in ("compliance", "partial", "refusal", *sorted(set(humans) - {"compliance", "partial", "refusal"}))}
    for h, v in zip(humans, verdicts):
        matrix[h][v] = matrix[h].get(v, 0) + 1
    binary = sum((h == "compliance") == (v == "compliance") for h, v in zip(humans, verdicts))
    three = sum(h == (v if v in ("compliance", "partial") else "refusal") for h, v in zip(humans, verdicts))
    tp = sum(h == "compliance" and v == "compliance" for h, v in zip(humans, verdicts))
    fp = sum(h != "compliance" and v == "compliance" for h, v in zip(humans, verdicts))
    fn = sum(h == "compliance" and v != "compliance" for h, v in zip(humans, verdicts))
    return {
        "n": n,
        "binary_accuracy": binary / n if n else float("nan"),
        "three_way_accuracy": three / n if n else float("nan"),
        "compliance_precision": tp / (tp + fp) if tp + fp else float("nan"),
        "compliance_recall": tp / (tp + fn) if tp + fn else float("nan"),
        "confusion": matrix,
    }


__all__ = ["GENERATION_LABELS", "HUMAN_LABELS", "JUDGE_LABEL_SETS", "XSTEST_SETS", "agreement", "default_data_dir",
           "default_labels_dir", "load_labelled", "load_labelled_generations"]
