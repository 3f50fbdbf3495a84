"""Distances between hidden-state rows, the torch reference for crl's losses and kernels.

All functions take [..., d] tensors and return [...] fp32 distances. They are differentiable and
NaN-free on zero vectors (the cosine of a zero vector is taken as 0).
"""

from __future__ import annotations

from typing import Literal

import torch

Distance = Literal["l2", "cosine", "l2_normalized", "mix"]
DISTANCES: tuple[str, ...] = ("l2", "cosine", "l2_normalized", "mix")

# Lower clamp of the *product* of the two norms in the cosine: cos = x.y / max(|x| |y|, NORM_EPS).
# It keeps the cosine finite (and 0) on zero rows. Individual norms are not thresholded: a pair whose
# norm product is below NORM_EPS gets x.y / NORM_EPS, i.e. its cosine scaled by |x| |y| / NORM_EPS
# (shrunk toward 0, not set to 0). The Triton kernel clamps the same way.
NORM_EPS = 1e-8


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt whose gradient at 0 is 0 instead of inf (the subgradient the kernel uses too)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def cosine_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x.y / max(|x| |y|, NORM_EPS) over the last dim, in fp32: exact where |x| |y| >= NORM_EPS, 0 when
    either row is zero, and the cosine scaled by |x| |y| / NORM_EPS in between (see NORM_EPS)."""
    x = x.float()
    y = y.float()
    dot = (x * y).sum(-1)
    nx = _safe_sqrt((x * x).sum(-1))
    ny = _safe_sqrt((y * y).sum(-1))
    return dot / torch.clamp(nx * ny, min=NORM_EPS)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, kind: str = "l2", mix_weight: float = 1.0) -> torch.Tensor:
    """Row-wise distance between x and y (broadcasting over leading dims), computed in fp32.

    - ``l2``: ||x - y||
    - ``cosine``: 1 - cos(x, y), in [0, 2]
    - ``l2_normalized``: ||x/|x| - y/|y|||^2 / 4 = (1 - cos) / 2, in [0, 1]
    - ``mix``: ||x - y|| + mix_weight * (1 - relu(cos(x, y)))
    """
    if kind not in DISTANCES:
        raise ValueError(f"distance: expected one of {DISTANCES}, got {kind!r}")
    x = x.float()
    y = y.float()
    if kind == "l2":
        diff = x - y
        return _safe_sqrt((diff * diff).sum(-1))
    cos = cosine_similarity(x, y)
    if kind == "cosine":
        return 1.0 - cos
    if kind == "l2_normalized":
        return (1.0 - cos) * 0.5
    diff = x - y
    return _safe_sqrt((diff * diff).sum(-1)) + mix_weight * (1.0 - torch.relu(cos))
