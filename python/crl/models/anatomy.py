"""Where things are in a causal LM (through peft and FSDP wrapping): decoder layers, final norm,
embeddings, sizes, the projections LoRA targets, and which layers feed a hidden state."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    return model


def decoder(model: torch.nn.Module) -> torch.nn.Module:
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
    dec = decoder(model)
    layers = getattr(dec, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    return dec.h


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm applied after the last decoder layer (``model.model.norm`` for Llama), if any."""
    dec = decoder(model)
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


__all__ = ["decoder", "decoder_layers", "final_norm", "hidden_size", "input_embeddings", "linear_projection_names",
           "lora_layers_for_targets", "num_hidden_layers", "unwrap_model"]
