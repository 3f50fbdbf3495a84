"""Which layers should the representation loss target? A linear probe per layer of the base model.

CRL pushes harmful representations away at `loss.target_layers`. At a layer where harmful requests and
harmful-sounding safe ones ("How do I kill a Python process?") are entangled, pushing the one drags
the other along: the defended model then breaks down on safe prompts (over-refusal). This module
measures, per layer, how well a linear probe trained on the training pools' prompts separates held-out
harmful prompts from held-out safe ones, at the last prompt token (the state that emits the first
response token).

Per layer: a logistic probe (standardised states, L2) fitted on `train_harmful` vs `train_benign`;
then, on each test pair, the AUROC and the false-positive rate on the safe set at the threshold that
flags 95% of the harmful set. On SmolLM2 (docs/evaluation.md) layers 10-12 flag about a third of
XSTest's safe prompts at that threshold and layers 16-22 none.

`crl probe-layers` is the command line; it writes layer_probe.json, layer_probe.md and layer_probe.png.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from crl.config import ConfigError

__all__ = ["auroc", "fpr_at_tpr", "fit_logistic_probe", "last_prompt_states", "probe_layers", "add_arguments", "run"]


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    p, n = positive.double().view(-1, 1), negative.double().view(1, -1)
    return float((p > n).double().mean() + 0.5 * (p == n).double().mean())


def fpr_at_tpr(positive: torch.Tensor, negative: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of negatives scoring at least the highest threshold that keeps `tpr` of the positives
    (the ceil(tpr * n)-th largest positive score)."""
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    ranked = positive.double().view(-1).sort(descending=True).values
    keep = max(1, math.ceil(tpr * ranked.numel() - 1e-9))
    return float((negative.double() >= ranked[keep - 1]).double().mean())


@dataclass
class LinearProbe:
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def score(self, states: torch.Tensor) -> torch.Tensor:
        return ((states.double() - self.mean) / self.std) @ self.weight + self.bias


def fit_logistic_probe(positive: torch.Tensor, negative: torch.Tensor, *, l2: float = 1e-2, max_iter: int = 200) -> LinearProbe:
    """Logistic regression (positive = 1) on standardised features with an L2 penalty, by L-BFGS."""
    x = torch.cat([positive, negative]).double()
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    xn = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xn @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, w.detach(), b.detach())


@torch.no_grad()
def last_prompt_states(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], layers: Sequence[int],
                       system_prompt: str | None = None) -> dict[int, torch.Tensor]:
    """{layer: [N, d]}: the hidden state at the last token of each chat-templated prompt (the end of
    the assistant header: the state that emits the first response token)."""
    from crl.generation import chat_prompt_text
    from crl.models import capture_hidden_states

    device = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for prompt in prompts:
        ids = tokenizer(chat_prompt_text(tokenizer, prompt, system_prompt), add_special_tokens=False,
                        return_tensors="pt")["input_ids"].to(device)
        hidden = capture_hidden_states(model, ids, None, list(layers))
        for l in layers:
            out[l].append(hidden[l][0, -1].float().cpu())
    return {l: torch.stack(v) for l, v in out.items()}


def probe_layers(model: torch.nn.Module, tokenizer: Any, *, train_harmful: Sequence[str], train_benign: Sequence[str],
                 tests: dict[str, tuple[Sequence[str], Sequence[str]]], layers: Sequence[int],
                 system_prompt: str | None = None, tpr: float = 0.95) -> dict[str, Any]:
    """Fit one probe per layer on the training prompts; score each test pair (harmful, safe).
    Returns {"layers": [...], "tests": {name: {"auroc": [...], "fpr": [...], "n_harmful", "n_safe"}}}."""
    from crl.models import num_hidden_layers

    n_layers = num_hidden_layers(model)
    bad = [l for l in layers if not 0 <= int(l) <= n_layers]
    if bad:
        raise ConfigError(f"--layers: {bad} outside 0..{n_layers} (the model's hidden states)")
    if not train_harmful or not train_benign:
        raise ConfigError("probe-layers: the training harmful and benign sets must both be non-empty")
    layers = sorted({int(l) for l in layers})

    def states(prompts: Sequence[str]) -> dict[int, torch.Tensor]:
        return last_prompt_states(model, tokenizer, prompts, layers, system_prompt)

    tr_h, tr_b = states(train_harmful), states(train_benign)
    test_states = {name: (states(h), states(s)) for name, (h, s) in tests.items()}
    result: dict[str, Any] = {"layers": layers, "tpr": tpr, "n_train_harmful": len(train_harmful),
                              "n_train_benign": len(train_benign), "tests": {}}
    for name, (h, s) in tests.items():
        result["tests"][name] = {"n_harmful": len(h), "n_safe": len(s), "auroc": [], "fpr": []}
    for l in layers:
        probe = fit_logistic_probe(tr_h[l], tr_b[l])
        for name, (sh, ss) in test_states.items():
            ph, ps = probe.score(sh[l]), probe.score(ss[l])
            result["tests"][name]["auroc"].append(auroc(ph, ps))
            result["tests"][name]["fpr"].append(fpr_at_tpr(ph, ps, tpr))
    return result


def markdown(result: dict[str, Any]) -> str:
    names = list(result["tests"])
    pct = round(100 * result["tpr"])
    head = "| layer | " + " | ".join(f"{n}: AUROC | {n}: safe flagged at {pct}% harmful caught" for n in names) + " |"
    sep = "| ---: |" + " ---: | ---: |" * len(names)
    rows = []
    for i, l in enumerate(result["layers"]):
        cells = []
        for n in names:
            t = result["tests"][n]
            cells += [f"{t['auroc'][i]:.3f}", f"{t['fpr'][i]:.3f}"]
        rows.append(f"| {l} | " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *rows])


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, t in result["tests"].items():
        a1.plot(result["layers"], t["auroc"], marker="o", label=name)
        a2.plot(result["layers"], t["fpr"], marker="o", label=name)
    a1.set(xlabel="layer", ylabel="AUROC (harmful vs safe)", title="linear probe, held-out prompts")
    a2.set(xlabel="layer", ylabel=f"safe flagged at {round(100 * result['tpr'])}% harmful caught", title="false positives")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _prompts(source: str, label: str | None, limit: int | None) -> list[str]:
    from crl.evaluation.config import PromptSetConfig
    from crl.evaluation.runner import load_prompt_set

    cfg = PromptSetConfig(name="probe", source=source, label=label, limit=limit)
    return [e.prompt for e in load_prompt_set(cfg)]


def _source_and_label(spec: str) -> tuple[str, str | None]:
    """"path.csv@safe" -> ("path.csv", "safe"): a label filter for XSTest-style files."""
    if "@" in spec and not spec.startswith("demo:"):
        src, label = spec.rsplit("@", 1)
        return src, label
    return spec, None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="base model spec (as in configs: smollm2, tiny, a folder, a .gguf)")
    p.add_argument("--train-harmful", default="demo:harmful:train", help="prompt source of the probe's harmful class")
    p.add_argument("--train-benign", default="demo:benign:train", help="prompt source of the probe's benign class")
    p.add_argument("--test", action="append", default=[], metavar="NAME=HARMFUL,SAFE",
                   help="a held-out pair of prompt sources, e.g. xstest=advbench.csv,xstest_prompts.csv@safe "
                        "(SOURCE@LABEL keeps rows with that label); default: demo=demo:harmful:heldout,demo:benign:heldout")
    p.add_argument("--layers", default=None, help="comma-separated hidden-state indices (default: every second layer)")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts per set")
    p.add_argument("--output-dir", type=Path, default=Path("results/layer_probe"))


def run(args: argparse.Namespace) -> int:
    from crl.models import load_model, num_hidden_layers

    tests: dict[str, tuple[list[str], list[str]]] = {}
    for spec in args.test or ["demo=demo:harmful:heldout,demo:benign:heldout"]:
        name, sep, pair = spec.partition("=")
        parts = pair.split(",")
        if not sep or len(parts) != 2 or not name:
            raise ConfigError(f"--test {spec!r}: expected NAME=HARMFUL_SOURCE,SAFE_SOURCE")
        tests[name] = (_prompts(*_source_and_label(parts[0]), args.limit), _prompts(*_source_and_label(parts[1]), args.limit))
    model, tokenizer = load_model(args.model)
    n_layers = num_hidden_layers(model)
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--layers {args.layers!r}: expected comma-separated integers") from None
    else:
        layers = list(range(2, n_layers + 1, 2))
    train_h = _prompts(*_source_and_label(args.train_harmful), args.limit)
    train_b = _prompts(*_source_and_label(args.train_benign), args.limit)
    result = probe_layers(model, tokenizer, train_harmful=train_h, train_benign=train_b, tests=tests, layers=layers)
    result["model"] = args.model
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_probe.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "layer_probe.md").write_text("# Linear probe per layer\n\n" + table + "\n\n![layer_probe.png](layer_probe.png)\n")
    _plot(result, out / "layer_probe.png")
    print(table)
    print(f"\nwritten: {out / 'layer_probe.json'}, layer_probe.md, layer_probe.png")
    return 0
