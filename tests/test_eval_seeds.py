"""`crl eval-summary`: mean and range over seeds, recomputed by hand from small report files."""

from __future__ import annotations

import json

import pytest

from crl.cli import main as crl_main
from crl.config import ConfigError
from crl.evaluation.seeds import seed_summary, seed_table


def _report(folder, successes, over, kl, name="crl"):
    folder.mkdir(parents=True)
    models = {"base": {"attacks": {"direct": {"successes": 9, "n": 10}}},
              name: {"attacks": {"direct": {"successes": successes, "n": 10}, "latent": {"successes": successes * 2, "n": 20}},
                     "over_refusal": {"not_answered": over, "n": 50}, "kl": {"kl": kl}}}
    (folder / "report.json").write_text(json.dumps({"models": models}))
    return folder


def test_mean_and_range_over_seeds(tmp_path):
    a = [_report(tmp_path / f"a{i}", s, o, k) for i, (s, o, k) in enumerate([(1, 5, 0.1), (3, 10, 0.2), (2, 0, 0.3)])]
    b = [_report(tmp_path / "b0", 10, 50, 1.0)]
    summary = seed_summary({"a": a, "b": b})
    d = summary["a"]["summary"]["direct"]
    assert (d["mean"], d["min"], d["max"], d["seeds"]) == (pytest.approx(0.2), 0.1, 0.3, 3)
    assert summary["a"]["summary"]["over_refusal"]["mean"] == pytest.approx(0.1)
    assert summary["a"]["summary"]["kl"]["mean"] == pytest.approx(0.2)
    table = seed_table(summary)
    assert "| a | 3 | 20% (10-30) | 20% (10-30) | 10% (0-20) | 0.200 (0.100-0.300) |" in table
    assert "| b | 1 | 100% (100-100) |" in table


def test_model_choice_and_errors(tmp_path):
    f = _report(tmp_path / "x", 1, 1, 0.1)
    assert seed_summary({"x": [f]}, model="base")["x"]["summary"]["direct"]["mean"] == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="no model 'nope'"):
        seed_summary({"x": [f]}, model="nope")
    with pytest.raises(ConfigError, match="report.json: not found"):
        seed_summary({"x": [tmp_path / "missing"]})


def test_cli(tmp_path, capsys):
    a = [_report(tmp_path / f"a{i}", i, 0, 0.1) for i in range(2)]
    out = tmp_path / "s.json"
    assert crl_main(["eval-summary", f"a={a[0]},{a[1]}", "--output", str(out)]) == 0
    assert "| a | 2 |" in capsys.readouterr().out and json.loads(out.read_text())["a"]["seeds"]
    assert crl_main(["eval-summary", "bad"]) == 2


def test_one_seed_in_parts(tmp_path):
    first = _report(tmp_path / "p0", 2, 5, 0.1)
    later = tmp_path / "p1"
    later.mkdir()
    (later / "report.json").write_text(json.dumps({"models": {"crl": {"attacks": {"embedding": {"successes": 3, "n": 20}}}}}))
    summary = seed_summary({"a": [f"{first}+{later}"]})["a"]
    assert summary["seeds"][0]["rates"] == {"direct": (2, 10), "latent": (4, 20), "over_refusal": (5, 50), "embedding": (3, 20)}
    assert summary["summary"]["embedding"]["mean"] == pytest.approx(0.15) and summary["summary"]["kl"]["mean"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="'direct' is also in an earlier folder"):
        seed_summary({"a": [f"{first}+{first}"]})
