"""What a finished run leaves behind besides its adapter: a model card, and merged models."""

from __future__ import annotations

import json
from pathlib import Path

from crl.atomic import atomic_write_text
from crl.training.config import TrainConfig, load_train_config


def write_model_card(run_dir: Path, config: TrainConfig) -> None:
    metrics_path = run_dir / "metrics.jsonl"
    last: dict = {}
    if metrics_path.exists():
        for line in reversed(metrics_path.read_text(encoding="utf-8").splitlines()):
            try:
                last = json.loads(line)
            except ValueError:  # a line cut short by a kill: the one before
                continue
            if isinstance(last, dict):
                break
            last = {}
    loss = config.loss
    shown = ", ".join(f"{k} = {v:.4g}" for k, v in sorted(last.items())
                      if k.startswith(("loss", "active")) and isinstance(v, (int, float)))
    card = f"""---
library_name: peft
base_model: {config.model.name}
tags: [crl, safety, lora, representation-engineering]
---
# {loss.method} adapter for {config.model.name}

A LoRA adapter trained with crl (method `{loss.method}`): contrastive representation learning
against harmful requests (Simko et al., arXiv 2506.11938).

- target layers: {loss.target_layers}; benign layers: {loss.resolved_benign_layers}; tokens: {loss.tokens}
- LoRA r {config.lora.r}, alpha {config.lora.alpha}, dropout {config.lora.dropout} on {", ".join(config.lora.target_modules)}
- {config.optim.max_steps} optimizer steps, lr {config.optim.lr}, batch {config.data.batch_size} per pool x {config.optim.grad_accumulation} accumulation
- final metrics: {shown or "n/a"}

Load it with `PeftModel.from_pretrained(base_model, "{run_dir.name}/adapter")`, or merge it with
`crl merge {run_dir.name} OUT_DIR`. The full resolved configuration is in `config.json`, and the
per-step metrics in `metrics.jsonl`.
"""
    atomic_write_text(run_dir / "README.md", card)


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: not a crl run folder (no config.json)")
    return load_train_config(path)


def merge_adapter(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the base model with the run's adapter merged in, plus its tokenizer, to out_dir."""
    from peft import PeftModel

    from crl.models import DTYPES, load_model

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no finished adapter (adapter_config.json missing); did the run finish?")
    config = load_run_config(run_dir)
    base, tokenizer = load_model(config.model.name, dtype=DTYPES[config.model.dtype])
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
