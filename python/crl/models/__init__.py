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

Modules: `loading` (load_model), `gguf` (GGUF conversion and its cache), `tiny` (the in-process test
model), `anatomy` (where the layers are), `lora` (apply_lora), `capture` (hidden states), `tokenizers`
(padding), `errors`.
"""

from __future__ import annotations

from crl.models.anatomy import (
    decoder_layers, final_norm, hidden_size, input_embeddings, linear_projection_names, lora_layers_for_targets,
    num_hidden_layers, unwrap_model,
)
from crl.models.capture import capture_hidden_states, first_tensor, fsdp_lazy_init, padding_known, replace_first_tensor
from crl.models.errors import ModelLoadError
from crl.models.gguf import SMOLLM2_CACHE_NAME, convert_gguf, default_cache_dir, smollm2_gguf_path
from crl.models.loading import DTYPES, load_model
from crl.models.lora import apply_lora
from crl.models.tiny import CHATML_TEMPLATE, build_tiny_llama, build_tiny_tokenizer
from crl.models.tokenizers import ensure_padding

__all__ = [
    "CHATML_TEMPLATE", "DTYPES", "ModelLoadError", "SMOLLM2_CACHE_NAME", "apply_lora", "build_tiny_llama", "build_tiny_tokenizer",
    "capture_hidden_states", "convert_gguf", "decoder_layers", "default_cache_dir", "ensure_padding", "final_norm",
    "first_tensor", "fsdp_lazy_init", "hidden_size", "input_embeddings", "linear_projection_names", "load_model",
    "lora_layers_for_targets", "num_hidden_layers", "padding_known", "replace_first_tensor", "smollm2_gguf_path",
    "unwrap_model",
]
