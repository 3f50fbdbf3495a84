"""Backend selection for the triplet loss: the fused Triton kernel or the torch reference.

CRL_TRIPLET_BACKEND (read at every call) or the `backend` argument:
- ``auto`` (default): Triton for CUDA tensors when triton imports, the torch reference otherwise
  (and for more than `MAX_KERNEL_K` negatives per row, or weights that require a gradient);
- ``triton``: always the kernel (CPU tensors run in Triton's interpreter: slow, for tests);
- ``torch``: always the reference.
"""

from __future__ import annotations

import functools
import os

import torch

from crl.kernels.launch_config import MAX_KERNEL_K
from crl.losses.triplet import TripletOutput, triplet_loss_reference

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "CRL_TRIPLET_BACKEND"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def resolve_backend(anchors: torch.Tensor, backend: str | None = None) -> str:
    """'triton' or 'torch' for these inputs (see the module docstring)."""
    choice = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice not in BACKENDS:
        raise ValueError(f"{ENV_VAR}/backend: expected one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported")
        return "triton"
    return "triton" if anchors.is_cuda and triton_available() else "torch"


def triplet_loss(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    *,
    positive_index: torch.Tensor | None = None,
    negative_index: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    distance_positive: str = "l2",
    distance_negative: str = "l2",
    margin: float = 1.0,
    mix_weight: float = 1.0,
    reduction: str = "mean",
    check_indices: bool = True,
    backend: str | None = None,
) -> TripletOutput:
    """Row-wise triplet loss; arguments and result as in `crl.losses.triplet.triplet_loss_reference`.

    `backend` (optional) overrides CRL_TRIPLET_BACKEND. With ``auto``, weights that require grad go
    to the reference (the kernel treats weights as constants), and so do more than MAX_KERNEL_K
    negatives per row. `check_indices=False` skips the indices' range check (a device sync), for
    callers that build the indices themselves.
    """
    kwargs = dict(
        positive_index=positive_index, negative_index=negative_index, weights=weights,
        distance_positive=distance_positive, distance_negative=distance_negative,
        margin=margin, mix_weight=mix_weight, reduction=reduction, check_indices=check_indices,
    )
    chosen = resolve_backend(anchors, backend)
    explicit = (backend or os.environ.get(ENV_VAR) or "auto").strip().lower() == "triton"
    if chosen == "triton" and not explicit:
        grad_weights = weights is not None and weights.requires_grad and torch.is_grad_enabled()
        many_negatives = negatives.dim() == 3 and negatives.shape[1] > MAX_KERNEL_K
        if grad_weights or many_negatives:
            chosen = "torch"
    if chosen == "torch":
        return triplet_loss_reference(anchors, positives, negatives, **kwargs)  # type: ignore[arg-type]
    from crl.kernels.triplet import triplet_loss_triton

    return triplet_loss_triton(anchors, positives, negatives, **kwargs)
