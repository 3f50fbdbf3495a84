"""Defence numbers over seeds: several evaluation folders per setting, one row per setting with the
mean and the range (min-max) over seeds of every attack's success rate, over-refusal and KL.

One seed is an anecdote; `crl eval-summary` puts the seeds of each setting side by side:

    crl eval-summary none=runs/eval-none-s0,runs/eval-none-s1,runs/eval-none-s2 \\
                     module=runs/eval-module-s0,... --output results/seeds.json

Each folder is a `crl eval` output (report.json). A folder may hold several models; `--model NAME`
picks one by name (default: the only adapter in the folder, else "base" when it is alone). One seed
may span several evaluations of the same adapter (attacks added later): join them with `+`
(`none=eval-s0+eval-emb-s0,...`); an attack in more than one of them is an error, the KL comes from
the first that has one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from crl.config import ConfigError

__all__ = ["seed_summary", "seed_table", "add_summary_arguments", "run_summary_cli"]


def _pick_model(report: dict[str, Any], path: Path, model: str | None) -> dict[str, Any]:
    models = report.get("models", {})
    if model is not None:
        if model not in models:
            raise ConfigError(f"{path}: no model {model!r} in its report (models: {', '.join(models)})")
        return models[model]
    adapters = [m for m in models if m != "base"]
    if len(adapters) == 1:
        return models[adapters[0]]
    if not adapters and "base" in models:
        return models["base"]
    raise ConfigError(f"{path}: {len(models)} models in its report ({', '.join(models)}); name one with --model")


def _rates(entry: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(successes or refusals, n) per attack and for over-refusal."""
    out = {a: (x["successes"], x["n"]) for a, x in entry.get("attacks", {}).items()}
    o = entry.get("over_refusal")
    if o:
        out["over_refusal"] = (o["not_answered"], o["n"])
    return out


def _seed(folder: Path | str, model: str | None) -> dict[str, Any]:
    """One seed's rates and KL from one folder, or from several joined by `+`."""
    rates: dict[str, tuple[int, int]] = {}
    kl = None
    for part in str(folder).split("+"):
        path = Path(part) / "report.json"
        if not path.is_file():
            raise ConfigError(f"{path}: not found (run crl eval into {part} first)")
        entry = _pick_model(json.loads(path.read_text()), path, model)
        for metric, value in _rates(entry).items():
            if metric in rates:
                raise ConfigError(f"{path}: {metric!r} is also in an earlier folder of the seed {folder}; "
                                  "join evaluations that measured different things")
            rates[metric] = value
        if kl is None:
            kl = (entry.get("kl") or {}).get("kl")
    return {"folder": str(folder), "rates": rates, "kl": kl}


def seed_summary(groups: dict[str, Sequence[Path]], model: str | None = None) -> dict[str, Any]:
    """{setting: {"seeds": [...per folder...], "mean": {metric: {...}}}} from the folders' report.json."""
    out: dict[str, Any] = {}
    for name, folders in groups.items():
        seeds = [_seed(folder, model) for folder in folders]
        metrics = list(dict.fromkeys(m for s in seeds for m in s["rates"]))  # the evaluations' own order
        mean: dict[str, Any] = {}
        for m in metrics:
            vals = [s["rates"][m][0] / s["rates"][m][1] for s in seeds if m in s["rates"] and s["rates"][m][1]]
            counts = [s["rates"][m] for s in seeds if m in s["rates"]]
            mean[m] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals), "seeds": len(vals),
                       "counts": counts}
        kls = [s["kl"] for s in seeds if s["kl"] is not None]
        if kls:
            mean["kl"] = {"mean": statistics.mean(kls), "min": min(kls), "max": max(kls), "seeds": len(kls)}
        out[name] = {"seeds": seeds, "summary": mean}
    return out


def seed_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per setting, each metric as mean (min-max) over seeds, in percent (KL as is)."""
    metrics = []
    for s in summary.values():
        metrics += [m for m in s["summary"] if m not in metrics and m != "kl"]
    has_kl = any("kl" in s["summary"] for s in summary.values())
    head = ["setting", "seeds"] + metrics + (["KL"] if has_kl else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for name, s in summary.items():
        cells = []
        for m in metrics:
            x = s["summary"].get(m)
            cells.append(f"{100 * x['mean']:.0f}% ({100 * x['min']:.0f}-{100 * x['max']:.0f})" if x else "-")
        if has_kl:
            x = s["summary"].get("kl")
            cells.append(f"{x['mean']:.3f} ({x['min']:.3f}-{x['max']:.3f})" if x else "-")
        lines.append(f"| {name} | {len(s['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_summary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("groups", nargs="+", metavar="NAME=DIR[,DIR...]",
                        help="a setting and its seeds' eval folders (DIR+DIR: one seed evaluated in parts)")
    parser.add_argument("--model", default=None, help="the model to read in each folder (default: its only adapter)")
    parser.add_argument("--output", type=Path, default=None, help="also write the summary as JSON here")


def run_summary_cli(args: argparse.Namespace) -> int:
    groups: dict[str, list[Path]] = {}
    for item in args.groups:
        name, sep, dirs = item.partition("=")
        if not sep or not name or not dirs:
            raise ConfigError(f"{item!r}: expected NAME=DIR[,DIR...]")
        groups[name] = [Path(d) for d in dirs.split(",") if d]
    summary = seed_summary(groups, args.model)
    if args.output is not None:
        from crl.atomic import atomic_write_text

        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, json.dumps(summary, indent=2))
    print(seed_table(summary))
    return 0
