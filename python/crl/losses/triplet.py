"""The row-wise triplet loss: the torch reference that specifies crl's fused Triton kernel.

Rows are token (or pooled) hidden states. Each row r has one anchor a_r, one positive and k >= 1
negatives. Positives and negatives are either given per row ([R, d], [R, d]) or stored once per
group and gathered through an index, so that the harmful centroid (one per layer) and mined
negatives (k per sample) are never broadcast to [R, d] in memory:

    positives [P, d] with positive_index [R] (row r uses positives[positive_index[r]])
    negatives [S, k, d] with negative_index [R] (row r uses negatives[negative_index[r], :, :])

    hinge[r, j] = relu(D_p(a_r, p_r) - D_n(a_r, n_{r,j}) + margin)
    row_loss[r] = mean_j hinge[r, j]
    loss = sum_r w_r row_loss[r] / sum_r w_r   (reduction "mean"; 0 when all weights are 0)
    loss = sum_r w_r row_loss[r]               (reduction "sum")

`active_fraction` is the weighted fraction of triplets whose hinge is > 0: the number that tells a
user whether the margin still bites (with the reference code's margins it never switches off).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from crl.losses.distances import DISTANCES, pairwise_distance

Reduction = Literal["mean", "sum"]


@dataclass
class TripletOutput:
    loss: torch.Tensor
    """Scalar fp32 loss (differentiable)."""
    active_fraction: torch.Tensor
    """Scalar, weighted fraction of triplets with a non-zero hinge (no grad)."""
    mean_positive_distance: torch.Tensor
    """Scalar, weighted mean anchor-positive distance (no grad)."""
    mean_negative_distance: torch.Tensor
    """Scalar, weighted mean anchor-negative distance over all k negatives (no grad)."""


DEBUG_CHECKS_ENV = "CRL_DEBUG_CHECKS"
"""Set to 1 to range-check every index, also where the caller built it (the training step)."""


def _check_index(index: torch.Tensor | None, rows: int, size: int, name: str, source: str, check_range: bool) -> None:
    if index is None:
        return
    if index.dim() != 1 or index.shape[0] != rows:
        raise ValueError(f"{name}: expected shape [{rows}] (one entry per anchor row), got {list(index.shape)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32/int64 tensor, got {index.dtype}")
    # Reading min and max waits for the device: callers that build their indices (the training
    # step) skip it, unless CRL_DEBUG_CHECKS=1.
    if (check_range or os.environ.get(DEBUG_CHECKS_ENV) == "1") and rows:
        low, high = torch.aminmax(index)
        if int(low) < 0 or int(high) >= size:
            raise ValueError(f"{name}: values must lie in [0, {size}) (the first dim of {source})")


def resolve_triplet_shapes(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    positive_index: torch.Tensor | None,
    negative_index: torch.Tensor | None,
    weights: torch.Tensor | None,
    distance_positive: str,
    distance_negative: str,
    reduction: str,
    *,
    check_indices: bool = True,
) -> int:
    """Validate the arguments shared by the reference and the kernel; returns k (negatives per row).

    `check_indices`: also check that every index lies in range (a device sync on a GPU)."""
    if anchors.dim() != 2:
        raise ValueError(f"anchors: expected [rows, d], got shape {list(anchors.shape)}")
    rows, d = anchors.shape
    if positives.dim() != 2 or positives.shape[1] != d:
        raise ValueError(f"positives: expected [rows or P, {d}], got shape {list(positives.shape)}")
    if positive_index is None and positives.shape[0] != rows:
        raise ValueError(f"positives: expected {rows} rows (or pass positive_index), got {positives.shape[0]}")
    _check_index(positive_index, rows, positives.shape[0], "positive_index", "positives", check_indices)
    if negatives.dim() == 2:
        if negatives.shape[1] != d:
            raise ValueError(f"negatives: expected [..., {d}], got shape {list(negatives.shape)}")
        if negative_index is not None:
            raise ValueError("negative_index: only valid with per-sample negatives of shape [S, k, d]")
        if negatives.shape[0] != rows:
            raise ValueError(f"negatives: expected {rows} rows, got {negatives.shape[0]}")
        k = 1
    elif negatives.dim() == 3:
        if negatives.shape[2] != d or negatives.shape[1] < 1:
            raise ValueError(f"negatives: expected [S, k >= 1, {d}], got shape {list(negatives.shape)}")
        if negative_index is None:
            raise ValueError("negative_index: required with per-sample negatives of shape [S, k, d]")
        _check_index(negative_index, rows, negatives.shape[0], "negative_index", "negatives", check_indices)
        k = negatives.shape[1]
    else:
        raise ValueError(f"negatives: expected [rows, d] or [S, k, d], got shape {list(negatives.shape)}")
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != rows):
        raise ValueError(f"weights: expected shape [{rows}], got {list(weights.shape)}")
    for name, value in (("distance_positive", distance_positive), ("distance_negative", distance_negative)):
        if value not in DISTANCES:
            raise ValueError(f"{name}: expected one of {DISTANCES}, got {value!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum', got {reduction!r}")
    return k


def triplet_loss_reference(
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
    reduction: Reduction = "mean",
    check_indices: bool = True,
) -> TripletOutput:
    """Eager torch triplet loss (fp32 accumulation for any input dtype). See the module docstring.

    `check_indices=False` skips the range check of the indices (which waits for the device)."""
    resolve_triplet_shapes(
        anchors, positives, negatives, positive_index, negative_index, weights,
        distance_positive, distance_negative, reduction, check_indices=check_indices,
    )
    a = anchors.float()
    p = positives.float()
    if positive_index is not None:
        p = p[positive_index]
    n = negatives.float()
    if n.dim() == 3:
        n = n[negative_index]  # [R, k, d]
    else:
        n = n.unsqueeze(1)  # [R, 1, d]
    d_pos = pairwise_distance(a, p, distance_positive, mix_weight)  # [R]
    d_neg = pairwise_distance(a.unsqueeze(1), n, distance_negative, mix_weight)  # [R, k]
    hinge = torch.relu(d_pos.unsqueeze(1) - d_neg + margin)  # [R, k]
    row_loss = hinge.mean(dim=1)
    w = torch.ones_like(row_loss) if weights is None else weights.float()
    total_w = w.sum()
    weighted = (w * row_loss).sum()
    with torch.no_grad():
        denom = torch.clamp(total_w, min=torch.finfo(torch.float32).tiny)
        active = (w * (hinge > 0).float().mean(dim=1)).sum() / denom
        mean_pos = (w * d_pos).sum() / denom
        mean_neg = (w * d_neg.mean(dim=1)).sum() / denom
    if reduction == "mean":
        loss = weighted / torch.clamp(total_w, min=torch.finfo(torch.float32).tiny)
    else:
        loss = weighted
    return TripletOutput(loss, active, mean_pos, mean_neg)
