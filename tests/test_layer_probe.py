"""crl.evaluation.layer_probe: the metrics against brute force, the probe on separable data, and the
per-layer probe and its command line on the tiny model."""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

from crl.config import ConfigError
from crl.evaluation.layer_probe import add_arguments, auroc, fit_logistic_probe, fpr_at_tpr, probe_layers, run
from crl.models import build_tiny_llama


def test_auroc_and_fpr_against_brute_force():
    rng = random.Random(0)
    pos = [rng.choice([0.0, 0.5, 1.0, 1.5, 2.0]) for _ in range(37)]
    neg = [rng.choice([-1.0, 0.0, 0.5, 1.0]) for _ in range(23)]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert auroc(torch.tensor(pos), torch.tensor(neg)) == pytest.approx(wins / (len(pos) * len(neg)))
    # hand-computed: 20 positives 1..20; keeping 95% (19 of them) puts the threshold at 2;
    # negatives 0, 1.5, 2, 3 -> 2 of 4 at or above it
    assert fpr_at_tpr(torch.arange(1.0, 21.0), torch.tensor([0.0, 1.5, 2.0, 3.0]), 0.95) == pytest.approx(0.5)
    assert auroc(torch.tensor([]), torch.tensor([1.0])) != auroc(torch.tensor([]), torch.tensor([1.0]))  # nan


def test_logistic_probe_separates_held_out_blobs():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    def blob(sign: float, n: int) -> torch.Tensor:
        return torch.randn(n, 16, generator=g) + sign * 2.0 * direction / direction.norm()
    probe = fit_logistic_probe(blob(1.0, 40), blob(-1.0, 40))
    assert auroc(probe.score(blob(1.0, 50)), probe.score(blob(-1.0, 50))) > 0.95
    # no signal: the held-out AUROC stays near chance
    noise = fit_logistic_probe(torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g))
    assert abs(auroc(noise.score(torch.randn(200, 16, generator=g)), noise.score(torch.randn(200, 16, generator=g))) - 0.5) < 0.15


def _prompts(marker: bool, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = "the a bread garden python river music quiet table window paper".split()
    out = []
    for _ in range(n):
        body = " ".join(rng.choice(words) for _ in range(6))
        out.append(f"explode explode {body}" if marker else f"{body} please")
    return out


def test_probe_layers_on_the_tiny_model():
    model, tok = build_tiny_llama(seed=0)
    res = probe_layers(model, tok, train_harmful=_prompts(True, 12, 0), train_benign=_prompts(False, 12, 1),
                       tests={"held_out": (_prompts(True, 10, 2), _prompts(False, 10, 3))}, layers=[2, 1])
    assert res["layers"] == [1, 2]
    t = res["tests"]["held_out"]
    assert t["n_harmful"] == 10 and t["n_safe"] == 10 and len(t["auroc"]) == 2 and len(t["fpr"]) == 2
    # the marker words are in the prompt: a linear probe finds them at some layer
    assert max(t["auroc"]) > 0.9 and min(t["fpr"]) < 0.5
    with pytest.raises(ConfigError, match="--layers"):
        probe_layers(model, tok, train_harmful=["x"], train_benign=["y"], tests={}, layers=[99])


def test_probe_layers_cli(tmp_path):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "probe"
    args = parser.parse_args(["--model", "tiny", "--limit", "6", "--layers", "1,2", "--output-dir", str(out)])
    assert run(args) == 0
    res = json.loads((out / "layer_probe.json").read_text())
    assert res["layers"] == [1, 2] and res["tests"]["demo"]["n_harmful"] == 6 and res["n_train_benign"] == 6
    assert (out / "layer_probe.png").stat().st_size > 0 and "| layer |" in (out / "layer_probe.md").read_text()
    with pytest.raises(ConfigError, match="--test"):
        run(parser.parse_args(["--model", "tiny", "--test", "nopair", "--output-dir", str(out)]))
