"""LoRA adapters with peft on chosen decoder layers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from crl.models.anatomy import linear_projection_names, num_hidden_layers

if TYPE_CHECKING:  # pragma: no cover
    from peft import PeftModel
    from transformers import PreTrainedModel


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


__all__ = ["apply_lora"]
