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
class LayerRows:
    states: torch.Tensor
    """[L, R, d] hidden states of the selected tokens at each layer."""
    layers: list[int]
    """The layer number of each of the L slices."""
    row_sample: torch.Tensor
    """[R] int64: index (within the micro-batch) of the sample each row belongs to."""

    def at(self, layers: list[int]) -> torch.Tensor:
        """The [len(layers), R, d] slice of the given layers (a view when they are contiguous)."""
        idx = [self.layers.index(l) for l in layers]
        if idx == list(range(idx[0], idx[0] + len(idx))):
            return self.states[idx[0] : idx[0] + len(idx)]
        return self.states[idx]


def select_rows(hidden: dict[int, torch.Tensor], token_mask: torch.Tensor, layers: list[int]) -> LayerRows:
    """Stack the masked tokens of each layer's [B, T, d] states into [L, R, d]."""
    flat_mask = token_mask.reshape(-1)
    states = torch.stack([hidden[l].reshape(-1, hidden[l].shape[-1])[flat_mask] for l in layers])
    batch, seq = token_mask.shape
    row_sample = torch.arange(batch, device=token_mask.device).repeat_interleave(seq)[flat_mask]
    return LayerRows(states, list(layers), row_sample)


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
            self.center[idx] if self.center is not None else None, self.scale[idx] if self.scale is not None else None
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: [L, ..., d] with the layer first."""
        extra = (1,) * (x.dim() - 2)
        if self.center is not None:
            c = self.center.to(x.device)
            x = x - c.reshape(c.shape[0], *extra, c.shape[1]).to(x.dtype)
        if self.scale is not None:
            sc = self.scale.to(x.device)
            x = x / sc.reshape(sc.shape[0], *extra, 1).to(x.dtype)
        return x


def _flatten_layers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, R, d] -> ([L*R, d], layer index [L*R])."""
    num_layers, rows, dim = x.shape
    layer_of_row = torch.arange(num_layers, device=x.device).repeat_interleave(rows)
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
    )


def retain_kl(
    frozen_logits: torch.Tensor, trained_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(z_M / T) || softmax(z_M' / T)), averaged over the given [N, V] token rows."""
    if frozen_logits.shape[0] == 0:
        return trained_logits.sum() * 0.0
    log_p = F.log_softmax(frozen_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(trained_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
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
    """[L, R, d] rows -> [L, S, d] mean over each sample's rows (samples without rows give 0)."""
    num_layers, _, dim = rows.shape
    sums = rows.new_zeros(num_layers, num_samples, dim, dtype=torch.float32)
    sums.index_add_(1, row_sample, rows.float())
    counts = torch.bincount(row_sample, minlength=num_samples).clamp_min(1).to(sums.dtype)
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
        off_diagonal = ~torch.eye(samples, dtype=torch.bool, device=sims.device)
        mean_cos = sims[:, off_diagonal].mean()
    else:
        mean_cos = sims.new_ones(())
    return benign, harmful, 1.0 - mean_cos


__all__ = [
    "LayerFrame", "LayerRows", "circuit_breaker_terms", "crl_benign_triplet", "crl_harmful_triplet",
    "pooled_by_sample", "repbend_terms", "retain_kl", "select_rows",
]
