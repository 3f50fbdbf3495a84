"""The training objectives: CRL's triplet terms, the retain KL, Circuit Breakers and RepBend.

All functions are vectorised over layers and tokens. Their inputs are `LayerRows`: the hidden states
of the selected tokens of a micro-batch, stacked as [L, R, d] (L layers, R selected tokens, in the
same token order for every layer), with the sample each token belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crl.losses.distances import cosine_similarity
from crl.losses.triplet import TripletOutput


@dataclass
class RowIndex:
    """The selected tokens of a [B, T] batch as flat row indices (b * T + t, in row-major order).

    Built on the host from the CPU token mask before the batch goes to the device (`from_mask`), so
    that gathering the selected states is an `index_select` with a known number of rows: a boolean
    mask index on a GPU tensor is a `nonzero`, which waits for the device (a host synchronisation).
    """

    flat: torch.Tensor
    """[R] int64 flat token index into [B * T]."""
    row_sample: torch.Tensor
    """[R] int64 sample (batch row) of each selected token."""
    count: int
    """R, the number of selected tokens here (a host int)."""
    total: int
    """The number of selected tokens of the global batch (all processes together; `count` in one
    process): the denominator of every global mean over these rows."""

    @classmethod
    def from_mask(cls, mask: torch.Tensor, *, total: int | None = None) -> "RowIndex":
        """From a [B, T] bool mask (a CPU mask costs no synchronisation; a device mask is copied to
        the host once). The indices live where the mask does; move them with `to`."""
        host = mask.detach().to("cpu", torch.bool)
        seq = int(host.shape[1])
        flat = torch.nonzero(host.reshape(-1)).reshape(-1)
        count = int(flat.shape[0])
        index = cls(flat, flat // seq, count, count if total is None else int(total))
        return index if mask.device.type == "cpu" else index.to(mask.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RowIndex":
        device = torch.device(device)
        if self.flat.device == device:
            return self
        if non_blocking and device.type == "cuda":  # pinned: the copy neither waits nor blocks the host
            flat, row_sample = self.flat.pin_memory(), self.row_sample.pin_memory()
        else:
            flat, row_sample = self.flat, self.row_sample
        return RowIndex(flat.to(device, non_blocking=non_blocking), row_sample.to(device, non_blocking=non_blocking),
                        self.count, self.total)


@dataclass
class LayerRows:
    states: torch.Tensor
    """[L, R, d] hidden states of the selected tokens at each layer."""
    layers: list[int]
    """The layer number of each of the L slices."""
    row_sample: torch.Tensor
    """[R] int64: index (within the micro-batch) of the sample each row belongs to."""


_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def take_layers(x: torch.Tensor, idx: list[int] | tuple[int, ...], dim: int = 0) -> torch.Tensor:
    """`x` at positions `idx` along `dim` without a host synchronisation: a view when `idx` is a
    contiguous range, else an `index_select` with a cached index tensor on x's device (indexing a GPU
    tensor with a Python list copies the list to the device with a blocking copy, which waits for the
    device)."""
    idx = tuple(int(i) for i in idx)
    if idx and idx == tuple(range(idx[0], idx[0] + len(idx))):
        return x.narrow(dim, idx[0], len(idx))
    key = (idx, x.device)
    index = _INDEX_CACHE.get(key)
    if index is None:
        host = torch.tensor(idx, dtype=torch.int64)
        if x.device.type == "cuda":
            host = host.pin_memory()
        index = _INDEX_CACHE[key] = host.to(x.device, non_blocking=True)
    return x.index_select(dim, index)


def select_rows(hidden: dict[int, torch.Tensor], rows: RowIndex | torch.Tensor, layers: list[int]) -> LayerRows:
    """Stack the selected tokens of each layer's [B, T, d] states into [L, R, d].

    `rows`: a `RowIndex` (no synchronisation: an `index_select` per layer), or a [B, T] bool mask
    (converted with `RowIndex.from_mask`: one device-to-host copy when the mask is on a GPU)."""
    if not isinstance(rows, RowIndex):
        rows = RowIndex.from_mask(rows)
    states = torch.stack([hidden[l].reshape(-1, hidden[l].shape[-1]).index_select(0, rows.flat) for l in layers])
    return LayerRows(states, list(layers), rows.row_sample)


@dataclass
class LayerFrame:
    """A per-layer affine frame for hidden states: x -> (x - center) / scale, both detached.

    Chat models' residual streams carry a large component shared by every token (a few "massive
    activation" dimensions: on SmolLM2 the mean state is about 70% of a state's norm), which makes raw
    cosines between any two states about 0.7 and nearly insensitive to what the model represents.
    Subtracting the mean of the frozen model's states makes cosines measure content (benign vs harmful
    centroids: raw cosine 0.7, centred -0.1); dividing by the mean centred norm makes l2 distances and
    their margins relative to the layer's scale, which grows several-fold with depth.
    """

    center: torch.Tensor | None
    """[L, d] or None."""
    scale: torch.Tensor | None
    """[L] or None."""

    @classmethod
    def fit(cls, frozen: torch.Tensor, *, center: bool, scale: bool) -> "LayerFrame":
        """Fit on frozen states [L, R, d]."""
        with torch.no_grad():
            x = frozen.float()
            mean = x.mean(dim=1) if center and x.shape[1] > 0 else None
            spread = None
            if scale:
                centred = x - mean[:, None, :] if mean is not None else x
                spread = centred.norm(dim=-1).mean(dim=-1).clamp_min(1e-6)
        return cls(mean, spread)

    def select(self, idx: list[int]) -> "LayerFrame":
        return LayerFrame(
            take_layers(self.center, idx) if self.center is not None else None,
            take_layers(self.scale, idx) if self.scale is not None else None,
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [L, ..., d] with the layer first."""
        extra = (1,) * (x.dim() - 2)
        if self.center is not None:
            c = self.center if self.center.device == x.device else self.center.to(x.device)
            x = x - c.reshape(c.shape[0], *extra, c.shape[1]).to(x.dtype)
        if self.scale is not None:
            sc = self.scale if self.scale.device == x.device else self.scale.to(x.device)
            x = x / sc.reshape(sc.shape[0], *extra, 1).to(x.dtype)
        return x


def _flatten_layers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, R, d] -> ([L*R, d], layer index [L*R])."""
    num_layers, rows, dim = x.shape
    layer_of_row = torch.arange(num_layers, device=x.device)[:, None].expand(num_layers, rows).reshape(-1)
    return x.reshape(num_layers * rows, dim), layer_of_row


def crl_benign_triplet(
    trained: torch.Tensor,
    frozen: torch.Tensor,
    harmful_centroid: torch.Tensor,
    *,
    positive_distance: str,
    negative_distance: str,
    margin: float,
    mix_weight: float,
    extra_negatives: torch.Tensor | None = None,
    extra_negative_index: torch.Tensor | None = None,
) -> TripletOutput:
    """Benign triplet: anchor h'(x), positive h(x), negative the harmful centroid of its layer.

    trained, frozen: [L, R, d]; harmful_centroid: [L, d]. With mined negatives, extra_negatives
    [S, k, d] with extra_negative_index [L*R] are used instead of the centroid (the caller may
    concatenate the centroid into them).
    """
    from crl.kernels import triplet_loss

    anchors, layer_of_row = _flatten_layers(trained)
    positives = frozen.reshape(anchors.shape)
    if extra_negatives is None:
        negatives = harmful_centroid.unsqueeze(1)  # [L, 1, d]
        negative_index = layer_of_row
    else:
        negatives, negative_index = extra_negatives, extra_negative_index
    return triplet_loss(
        anchors, positives, negatives,
        negative_index=negative_index,
        distance_positive=positive_distance, distance_negative=negative_distance,
        margin=margin, mix_weight=mix_weight,
        check_indices=False,  # built here (layer of each row) or by the step (mined entries): in range
    )


def crl_harmful_triplet(
    trained: torch.Tensor,
    frozen: torch.Tensor,
    harmful_centroid: torch.Tensor,
    *,
    positive_distance: str,
    negative_distance: str,
    margin: float,
    mix_weight: float,
    extra_negatives: torch.Tensor | None = None,
    extra_negative_index: torch.Tensor | None = None,
) -> TripletOutput:
    """Harmful triplet: anchor h'(x), positive the harmful centroid of its layer, negative h(x).

    Pulls harmful states into one collapsed region and pushes them from where the original model
    put them. trained, frozen: [L, R, d]; harmful_centroid: [L, d] (carries gradient).
    """
    from crl.kernels import triplet_loss

    anchors, layer_of_row = _flatten_layers(trained)
    if extra_negatives is None:
        negatives = frozen.reshape(anchors.shape)
        negative_index = None
    else:
        negatives, negative_index = extra_negatives, extra_negative_index
    return triplet_loss(
        anchors, harmful_centroid, negatives,
        positive_index=layer_of_row, negative_index=negative_index,
        distance_positive=positive_distance, distance_negative=negative_distance,
        margin=margin, mix_weight=mix_weight,
        check_indices=False,  # built here (layer of each row) or by the step (mined entries): in range
    )


KL_REDUCTIONS = ("token_mean", "batchmean")


def retain_kl(
    frozen_logits: torch.Tensor, trained_logits: torch.Tensor, temperature: float, *,
    reduction: str = "token_mean", num_sequences: int | None = None,
) -> torch.Tensor:
    """T^2 * KL(softmax(z_M / T) || softmax(z_M' / T)) over the given [N, V] token rows.

    `reduction`: ``token_mean`` averages the per-token KL over the N rows; ``batchmean`` sums it over
    the rows and divides by `num_sequences`, the number of sequences the rows come from: the reference
    code's ``F.kl_div(..., reduction="batchmean")`` on [B, T, V] logits, whose padded positions hold
    zero logits in both models (a uniform distribution each, so a KL of 0), which sums over tokens and
    vocabulary and divides by B."""
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"retain_kl: reduction must be one of {', '.join(KL_REDUCTIONS)}, got {reduction!r}")
    if reduction == "batchmean" and (num_sequences is None or num_sequences < 1):
        raise ValueError(f"retain_kl: reduction 'batchmean' needs num_sequences >= 1, got {num_sequences!r}")
    if frozen_logits.shape[0] == 0:
        return trained_logits.sum() * 0.0
    log_p = F.log_softmax(frozen_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(trained_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if reduction == "batchmean":
        return temperature**2 * kl.sum() / num_sequences
    return temperature**2 * kl.mean()


def circuit_breaker_terms(
    trained_retain: torch.Tensor,
    frozen_retain: torch.Tensor,
    trained_harmful: torch.Tensor,
    frozen_harmful: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Circuit Breakers (representation rerouting, arXiv 2406.04313): returns (retain, reroute).

    retain = mean ||h'_R - h_R||; reroute = mean relu(cos(h'_H, h_H)); the caller weights them
    with c_ret = alpha * t and c_rr = alpha * (1 - t), t going from 0 to 1/2 over training.
    """
    retain = (trained_retain.float() - frozen_retain.float()).norm(dim=-1).mean()
    reroute = torch.relu(cosine_similarity(trained_harmful, frozen_harmful)).mean()
    return retain, reroute


def pooled_by_sample(rows: torch.Tensor, row_sample: torch.Tensor, num_samples: int) -> torch.Tensor:
    """[L, R, d] rows -> [L, S, d] mean over each sample's rows (samples without rows give 0).

    Counts by `index_add_` (a `bincount` on a GPU reads the largest index back to the host)."""
    num_layers, num_rows, dim = rows.shape
    sums = rows.new_zeros(num_layers, num_samples, dim, dtype=torch.float32)
    sums.index_add_(1, row_sample, rows.float())
    counts = sums.new_zeros(num_samples).index_add_(0, row_sample, sums.new_ones(num_rows)).clamp_min(1)
    return sums / counts[None, :, None]


def repbend_terms(
    trained_benign: torch.Tensor,
    frozen_benign: torch.Tensor,
    trained_harmful: torch.Tensor,
    frozen_harmful: torch.Tensor,
    harmful_row_sample: torch.Tensor,
    num_harmful_samples: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RepBend (arXiv 2504.01550): returns (benign distance, harmful distance, harmful dissimilarity).

    The loss is alpha * benign - beta * harmful + gamma * dissimilarity (+ epsilon * KL), where
    dissimilarity = 1 - mean pairwise cosine among the trained model's per-sample harmful states.
    """
    benign = (trained_benign.float() - frozen_benign.float()).norm(dim=-1).mean()
    harmful = (trained_harmful.float() - frozen_harmful.float()).norm(dim=-1).mean()
    pooled = pooled_by_sample(trained_harmful, harmful_row_sample, num_harmful_samples)  # [L, S, d]
    unit = F.normalize(pooled, dim=-1, eps=1e-8)
    sims = unit @ unit.transpose(1, 2)  # [L, S, S]
    samples = pooled.shape[1]
    if samples > 1:
        # the off-diagonal entries in row-major order (what a boolean ~eye mask selects), computed
        # on the device: a boolean mask index there is a nonzero, which synchronises with the host
        k = torch.arange(samples * (samples - 1), device=sims.device)
        i, j = k // (samples - 1), k % (samples - 1)
        off_diagonal = i * samples + j + (j >= i).long()
        mean_cos = sims.reshape(sims.shape[0], samples * samples).index_select(1, off_diagonal).mean()
    else:
        mean_cos = sims.new_ones(())
    return benign, harmful, 1.0 - mean_cos


__all__ = [
    "LayerFrame", "LayerRows", "RowIndex", "circuit_breaker_terms", "crl_benign_triplet", "crl_harmful_triplet",
    "KL_REDUCTIONS", "pooled_by_sample", "repbend_terms", "retain_kl", "select_rows", "take_layers",
]
