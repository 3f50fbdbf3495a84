"""The report: numbers recomputed from the per-prompt records (records.jsonl) and capability.json.

- report.json: per model (and method): per attack n, successes, ASR with a Wilson 95% interval,
  verdict counts and mean budget; over-refusal (with its interval), KL, perplexity, retention and
  harmful NLLs.
- report.md: the same as a markdown table (rows: model and method).
- asr.png (ASR per attack with intervals), attack_loss.png (mean loss curves of the optimisation
  attacks), pca.png (2-D PCA of benign and harmful hidden states, base vs trained).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from crl.atomic import atomic_write_text


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (nan, nan) for n = 0."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


def load_records(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "records.jsonl"
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    # last record wins per key (as in RecordStore)
    keyed = {(r["model"], r.get("purpose", "attack"), r["attack"], r["prompt_id"]): r for r in out}
    return list(keyed.values())


def summarise(records: Sequence[dict[str, Any]], capability: dict[str, Any] | None = None,
              model_order: Sequence[str] | None = None, attack_order: Sequence[str] | None = None) -> dict[str, Any]:
    capability = capability or {}
    by = defaultdict(list)
    methods: dict[str, str] = {}
    for r in records:
        methods.setdefault(r["model"], r.get("method", "unknown"))
        if r.get("purpose", "attack") == "attack":
            by[(r["model"], r["attack"])].append(r)
    models = list(model_order or []) + sorted({m for m, _ in by} - set(model_order or []))
    models = [m for m in models if any(k[0] == m for k in by) or m in capability]
    attacks = list(attack_order or []) + sorted({a for _, a in by} - set(attack_order or []))
    out: dict[str, Any] = {"models": {}, "attacks": attacks}
    for m in models:
        entry: dict[str, Any] = {"method": methods.get(m, "none" if m == "base" else "unknown"), "attacks": {}}
        for a in attacks:
            recs = by.get((m, a), [])
            if not recs:
                continue
            n = len(recs)
            k = sum(1 for r in recs if r["judgement"]["success"])
            lo, hi = wilson_interval(k, n)
            verdicts: dict[str, int] = defaultdict(int)
            for r in recs:
                verdicts[r["judgement"]["verdict"]] += 1
            budget_keys = sorted({key for r in recs for key in r.get("budget", {})})
            budget = {key: sum(float(r["budget"].get(key, 0)) for r in recs) / n for key in budget_keys}
            losses = [r["best_loss"] for r in recs if r.get("best_loss") is not None]
            entry["attacks"][a] = {
                "n": n, "successes": k, "asr": k / n, "ci95": [lo, hi], "verdicts": dict(verdicts), "mean_budget": budget,
                "mean_best_loss": (sum(losses) / len(losses)) if losses else None,
            }
            by_category = _by_category(recs)
            if by_category:
                entry["attacks"][a]["by_category"] = by_category
        cap = capability.get(m, {})
        if "over_refusal" in cap:
            o = dict(cap["over_refusal"])
            o["ci95"] = list(wilson_interval(o["not_answered"], o["n"]))
            entry["over_refusal"] = o
        for key in ("kl", "retention", "harmful_nll", "lm_eval"):
            if key in cap:
                entry[key] = cap[key]
        out["models"][m] = entry
    return out


def _by_category(recs: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{category: {"n", "successes"}} over the records that name their prompt's category."""
    out: dict[str, dict[str, int]] = {}
    for r in recs:
        if r.get("category"):
            c = out.setdefault(r["category"], {"n": 0, "successes": 0})
            c["n"] += 1
            c["successes"] += bool(r["judgement"]["success"])
    return dict(sorted(out.items()))


def category_table(summary: dict[str, Any]) -> str:
    """Successes/n per prompt category (rows: model and attack; columns: categories), or "" when no
    record names a category. Per-category counts are small: read them as where to look, not as rates."""
    rows, categories = [], []
    for m, e in summary["models"].items():
        for a, x in e["attacks"].items():
            if "by_category" in x:
                rows.append((m, a, x["by_category"]))
                categories += [c for c in x["by_category"] if c not in categories]
    if not rows:
        return ""
    lines = ["| model | attack | " + " | ".join(categories) + " |", "|---|---|" + "---:|" * len(categories)]
    for m, a, cats in rows:
        cells = [f"{cats[c]['successes']}/{cats[c]['n']}" if c in cats else "-" for c in categories]
        lines.append(f"| {m} | {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_rate(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.2f} ({k}/{n}; {lo:.2f}-{hi:.2f})" if n else "-"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return fmt.format(x)


def markdown_table(summary: dict[str, Any]) -> str:
    attacks = summary["attacks"]
    head = ["model", "method"] + [f"ASR {a}" for a in attacks] + ["over-refusal", "KL to base", "benign ppl", "retention",
                                                                  "NLL targets", "NLL base completions"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
    for m, e in summary["models"].items():
        row = [m, e["method"]]
        for a in attacks:
            x = e["attacks"].get(a)
            row.append(_fmt_rate(x["successes"], x["n"]) if x else "-")
        o = e.get("over_refusal")
        row.append(_fmt_rate(o["not_answered"], o["n"]) if o else "-")
        kl = e.get("kl", {})
        row += [_num(kl.get("kl"), "{:.4f}"), _num(kl.get("perplexity"), "{:.2f}")]
        ret = e.get("retention", {})
        row.append(_num(ret.get("mean")) if "mean" in ret else "-")
        h = e.get("harmful_nll", {})
        row.append(_num(h.get("targets", {}).get("mean")) + (f" (n={h['targets']['n']})" if "targets" in h else ""))
        row.append(_num(h.get("base_completions", {}).get("mean")) + (f" (n={h['base_completions']['n']})" if "base_completions" in h else ""))
        lines.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        "ASR: share of prompts whose response the judge counts as compliance, with (successes/n; Wilson 95% interval).",
        "Over-refusal: share of safe prompts not answered (a refusal, a partial refusal and an incoherent answer all count).",
        "KL to base: mean per-token KL(base || model) on the base model's answers to benign prompts; benign ppl: the model's",
        "perplexity on those answers; retention: cosine similarity (MiniLM) of the model's answers to the base model's.",
        "NLL: mean per-token negative log-likelihood of harmful continuations (higher = less willing).",
    ]
    return "\n".join(lines + notes)


def _plots(output_dir: Path, summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[str]:
    """Write asr.png, attack_loss.png and pca.png where there is data for them; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, plot in (("asr.png", _plot_asr), ("attack_loss.png", _plot_attack_loss), ("pca.png", _plot_pca)):
        fig = plot(plt, output_dir, summary, records)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(output_dir / name, dpi=120)
            plt.close(fig)
            written.append(name)
    return written


def _plot_asr(plt: Any, output_dir: Path, summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> Any:
    """Attack success rate per attack and model, with Wilson 95% intervals."""
    models, attacks = list(summary["models"]), summary["attacks"]
    if not (models and attacks):
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(attacks) * max(1, len(models)) / 2 + 2), 3.6))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for j, a in enumerate(attacks):
            x = summary["models"][m]["attacks"].get(a)
            if not x:
                continue
            xs.append(j + i * width)
            ys.append(x["asr"])
            lo.append(max(0.0, x["asr"] - x["ci95"][0]))
            hi.append(max(0.0, x["ci95"][1] - x["asr"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"{m} ({summary['models'][m]['method']})")
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(attacks))])
    ax.set_xticklabels(attacks, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("attack success rate")
    ax.legend(fontsize=8)
    return fig


def _plot_attack_loss(plt: Any, output_dir: Path, summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> Any:
    """The optimisation attacks' mean target loss per step and model."""
    import numpy as np

    curves = defaultdict(list)
    for r in records:
        if r.get("purpose", "attack") == "attack" and r.get("loss_curve"):
            curves[(r["attack"], r["model"])].append(r["loss_curve"])
    opt_attacks = sorted({a for a, _ in curves})
    if not opt_attacks:
        return None
    fig, axes = plt.subplots(1, len(opt_attacks), figsize=(4.2 * len(opt_attacks), 3.4), squeeze=False)
    for ax, a in zip(axes[0], opt_attacks):
        for m in summary["models"]:
            cs = curves.get((a, m))
            if not cs:
                continue
            L = max(len(c) for c in cs)
            # a curve that stopped early keeps its last value
            arr = np.array([c + [c[-1]] * (L - len(c)) for c in cs], dtype=float)
            ax.plot(arr.mean(0), label=m)
        ax.set_title(a)
        ax.set_xlabel("step")
        ax.set_ylabel("target cross-entropy (mean over prompts)")
        ax.legend(fontsize=8)
    return fig


def _plot_pca(plt: Any, output_dir: Path, summary: dict[str, Any], records: Sequence[dict[str, Any]]) -> Any:
    """Benign and harmful prompts' pooled states per model, in the base model's first two principal
    components."""
    import numpy as np

    hs_path = output_dir / "hidden_states.npz"
    if not hs_path.is_file():
        return None
    try:
        with np.load(hs_path, allow_pickle=False) as stored:
            data = {k: stored[k] for k in stored.files}
    except Exception as exc:  # noqa: BLE001 - a damaged file costs the plot, not the report
        print(f"crl: warning: {hs_path} is damaged ({type(exc).__name__}: {exc}); no PCA plot", file=sys.stderr)
        return None
    keys = [k.split("|") for k in data]
    models = list(summary["models"])
    hs_models = [m for m in models if any(k[0] == m for k in keys)] or sorted({k[0] for k in keys})
    if "base" not in hs_models and any(k[0] == "base" for k in keys):
        hs_models = ["base"] + hs_models
    base_keys = [k for k in data if k.startswith("base|")]
    if not base_keys:
        return None
    fit = np.concatenate([data[k] for k in base_keys])
    mu = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mu, full_matrices=False)
    comp = vt[:2].T
    layer = base_keys[0].split("|")[2]
    fig, axes = plt.subplots(1, len(hs_models), figsize=(4 * len(hs_models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], hs_models):
        for role, colour in (("benign", "tab:blue"), ("harmful", "tab:red")):
            k = f"{m}|{role}|{layer}"
            if k in data:
                proj = (data[k] - mu) @ comp
                ax.scatter(proj[:, 0], proj[:, 1], s=12, c=colour, label=role, alpha=0.7)
        ax.set_title(f"{m} (hidden state {layer})")
        ax.legend(fontsize=8)
    fig.suptitle("PCA fitted on the base model's states; mean over prompt tokens", fontsize=9)
    return fig


def write_report(output_dir: Path, *, config: Any = None, plots: bool | None = None) -> dict[str, Any]:
    output_dir = Path(output_dir)
    records = load_records(output_dir)
    capability = _read_capability(output_dir / "capability.json")
    model_order = None
    attack_order = None
    if config is not None:
        model_order = (["base"] if config.include_base else []) + list(config.adapters)
        attack_order = [a.name for a in config.attacks]
    summary = summarise(records, capability, model_order, attack_order)
    do_plots = plots if plots is not None else (config.report.plots if config is not None else True)
    summary["plots"] = _plots(output_dir, summary, records) if do_plots else []
    atomic_write_text(output_dir / "report.json", json.dumps(summary, indent=2, default=lambda o: None))
    md = "# crl evaluation\n\n" + markdown_table(summary) + "\n"
    by_category = category_table(summary)
    if by_category:
        md += "\n## Successes by prompt category\n\n" + by_category + "\n"
    for p in summary["plots"]:
        md += f"\n![{p}]({p})\n"
    atomic_write_text(output_dir / "report.md", md)
    return summary


def _read_capability(path: Path) -> dict[str, Any]:
    """capability.json ({} when absent); a damaged one is a ConfigError saying how to measure it again
    (a full `crl eval` run replaces it before the report)."""
    from crl.config import ConfigError

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: damaged ({exc}); run crl eval without --report-only to measure it again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object per model; run crl eval without --report-only to measure it again")
    return data


__all__ = ["wilson_interval", "summarise", "markdown_table", "write_report", "load_records"]
