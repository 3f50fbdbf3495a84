"""Hidden states at chosen layers: forward hooks on the decoder layers, a pass truncated after the
last layer needed, FSDP-aware, padding known from the batch."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch

from crl.models.anatomy import decoder, decoder_layers, final_norm, unwrap_model


def replace_first_tensor(output: Any, new: torch.Tensor) -> Any:
    """A decoder layer's output with its hidden states (the first tensor) replaced by `new`."""
    if isinstance(output, torch.Tensor):
        return new
    return (new,) + tuple(output[1:])


def first_tensor(output: Any) -> torch.Tensor:
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
    dec = decoder(model)
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
            out[l] = first_tensor(output)

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


__all__ = ["capture_hidden_states", "first_tensor", "fsdp_lazy_init", "padding_known", "replace_first_tensor"]
