"""A safety-tuned testbed that runs on a CPU: the base model taught to refuse plain harmful requests.

crl's users defend models that already refuse (Llama-3-8B-Instruct, Mistral-7B-Instruct); SmolLM2
complies with nearly everything. `crl testbed build` stands in for their regime: a LoRA fine-tune
(cross-entropy on the response tokens) on the demo's harmful training prompts answered with refusals
(crl.data.refusals) and its benign training prompts answered by the base model itself (greedy, so it
keeps answering them, borderline and contrast prompts included), merged into the weights and saved
as a Hugging Face folder. Like the refusal training of chat models it teaches a *shallow* refusal,
in the first tokens of the answer: prefilling the start of a compliant answer, or an embedding
attack, still gets harmful text out. That is the regime the paper defends.

The folder holds the merged model and tokenizer (safetensors) and ``testbed.json``: the settings,
the training losses and a check (refusals among the demo's held-out direct harmful requests and
among its held-out benign prompts, by crl's refusal-string judge). It is cached: the same settings
reuse the folder. Use it as a model spec anywhere: ``crl data build --model DIR`` (with elicitation,
since it refuses), ``[model] name = "DIR"``, ``base_model = "DIR"`` in an eval config.

A build is minutes long and not checkpointed: killed, it starts over (the folder appears only when
complete, by an atomic rename).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from crl.config import ConfigError

__all__ = ["RefuserConfig", "build_refuser", "refuser_dir", "add_testbed_arguments", "run_testbed_cli"]


@dataclass
class RefuserConfig:
    model: str = "smollm2"
    steps: int = 80  # optimizer steps (about 2 passes over the 180 harmful training prompts)
    batch_size: int = 8  # half harmful + refusal, half benign + the base model's answer
    lr: float = 1e-3
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 128
    answer_tokens: int = 48  # length of the base model's own benign answers
    seed: int = 0
    dtype: str = "float32"

    def validate(self) -> None:
        for key, low in (("steps", 1), ("batch_size", 2), ("lora_r", 1), ("lora_alpha", 1), ("max_length", 16),
                         ("answer_tokens", 1)):
            if int(getattr(self, key)) < low:
                raise ConfigError(f"testbed {key}: expected an integer >= {low}, got {getattr(self, key)}")
        if not 0 < self.lr <= 1:
            raise ConfigError(f"testbed lr: expected a number in (0, 1], got {self.lr}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"testbed dtype: expected float32 or bfloat16, got {self.dtype!r}")

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def refuser_dir(config: RefuserConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the testbed of these settings is cached: <cache>/testbeds/<model>-<hash of the settings>."""
    from crl.models.gguf import default_cache_dir

    root = Path(cache_dir) if cache_dir else default_cache_dir()
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(config.model).name)
    return root / "testbeds" / f"{name}-{config.key()}"


def build_refuser(config: RefuserConfig, out_dir: str | Path | None = None, *, cache_dir: str | Path | None = None,
                  progress: bool = True) -> Path:
    """Build (or find, when already built with the same settings) the refusing testbed; returns its folder."""
    from crl.data.demo import load_demo
    from crl.models import DTYPES, load_model

    config.validate()
    out = Path(out_dir) if out_dir is not None else refuser_dir(config, cache_dir)
    if (out / "testbed.json").is_file():
        if json.loads((out / "testbed.json").read_text()).get("settings") == asdict(config):
            return out
        raise ConfigError(f"{out}: holds a testbed built with other settings; choose another --out")
    torch.manual_seed(config.seed)
    model, tok = load_model(config.model, dtype=DTYPES[config.dtype], cache_dir=cache_dir)
    harmful, benign = load_demo("harmful", "train"), load_demo("benign", "train")
    t0 = time.perf_counter()
    examples = _training_examples(model, tok, harmful, benign, config, progress)
    peft_model, losses = _fine_tune(model, tok, examples, config, progress)
    merged = peft_model.merge_and_unload()
    check = refusal_check(merged, tok, load_demo("harmful", "heldout"), load_demo("benign", "heldout"))
    record = {"settings": asdict(config), "losses": losses, "check": check, "seconds": time.perf_counter() - t0,
              "harmful_train": len(harmful), "benign_train": len(benign)}
    _save(merged, tok, record, out)
    return out


def _training_examples(model: Any, tok: Any, harmful: Sequence[Any], benign: Sequence[Any], config: RefuserConfig,
                       progress: bool) -> dict[str, list[Any]]:
    """Encoded training conversations: harmful prompts with a refusal, benign ones with the base
    model's own greedy answer."""
    from crl.data.encoding import encode_example
    from crl.data.refusals import refusal_for
    from crl.generation import generate

    answers = generate(model, tok, [e.prompt for e in benign], max_new_tokens=config.answer_tokens, batch_size=16,
                       progress=progress, desc="benign answers")
    pairs = {"harmful": [e.with_response(refusal_for(e.prompt)) for e in harmful],
             "benign": [e.with_response(a) for e, a in zip(benign, answers) if a.strip()]}
    return {kind: [encode_example(tok, e, max_length=config.max_length, index=i) for i, e in enumerate(exs)]
            for kind, exs in pairs.items()}


def response_loss(model: Any, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of the response tokens (each predicted from the tokens before it)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    target = batch.input_ids[:, 1:]
    mask = batch.response_mask[:, 1:]
    return torch.nn.functional.cross_entropy(logits[mask].float(), target[mask])


def _fine_tune(model: Any, tok: Any, examples: dict[str, list[Any]], config: RefuserConfig,
               progress: bool) -> tuple[Any, list[float]]:
    """LoRA on every linear projection, AdamW, each step half harmful and half benign (seeded draws)."""
    from tqdm.auto import tqdm

    from crl.data.batching import collate
    from crl.models.lora import apply_lora

    peft_model = apply_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=0.0)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng = random.Random(config.seed)
    half = config.batch_size // 2
    losses = []
    for _ in tqdm(range(config.steps), desc="refusal fine-tune", disable=not progress):
        rows = rng.sample(examples["harmful"], half) + rng.sample(examples["benign"], config.batch_size - half)
        loss = response_loss(peft_model, collate(rows, tok.pad_token_id))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    peft_model.eval()
    return peft_model, losses


def refusal_check(model: Any, tok: Any, harmful: Sequence[Any], benign: Sequence[Any], *,
                  max_new_tokens: int = 32) -> dict[str, Any]:
    """Shares of refused direct requests, by crl's refusal-string judge (held-out prompts)."""
    from crl.evaluation.judges.refusal import RefusalStringJudge
    from crl.generation import generate

    judge = RefusalStringJudge()
    out = {}
    for name, exs in (("harmful", harmful), ("benign", benign)):
        prompts = [e.prompt for e in exs]
        answers = generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=16)
        refused = sum(j.verdict == "refusal" for j in judge.judge(prompts, answers))
        out[name] = {"n": len(exs), "refused": refused, "rate": refused / max(1, len(exs))}
    return out


def _save(model: Any, tok: Any, record: dict[str, Any], out: Path) -> None:
    """Model, tokenizer and testbed.json into a temporary folder, renamed into place."""
    from crl.atomic import atomic_write_text

    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    atomic_write_text(tmp / "testbed.json", json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def add_testbed_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RefuserConfig()
    parser.add_argument("--model", default=defaults.model, help="base model spec (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: cached under $CRL_CACHE/testbeds)")
    for key in ("steps", "batch_size", "lora_r", "lora_alpha", "max_length", "answer_tokens", "seed"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=getattr(defaults, key))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=defaults.dtype)
    parser.add_argument("--cache-dir", default=None, help="crl cache root (default $CRL_CACHE or ~/.cache/crl)")
    parser.add_argument("--no-progress", action="store_true")


def run_testbed_cli(args: argparse.Namespace) -> int:
    fields = RefuserConfig.__dataclass_fields__
    config = RefuserConfig(**{k: getattr(args, k) for k in fields})
    out = build_refuser(config, args.out, cache_dir=args.cache_dir, progress=not args.no_progress)
    check = json.loads((out / "testbed.json").read_text())["check"]
    h, b = check["harmful"], check["benign"]
    print(f"testbed: {out}\n  held-out harmful requests refused: {h['refused']}/{h['n']}"
          f"\n  held-out benign prompts refused: {b['refused']}/{b['n']}")
    return 0
