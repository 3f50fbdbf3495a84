"""The torch reference losses against values computed by hand, and gradcheck in float64."""

from __future__ import annotations

import math

import pytest
import torch

from crl.losses.distances import pairwise_distance
from crl.losses.objectives import circuit_breaker_terms, pooled_by_sample, repbend_terms, retain_kl, select_rows
from crl.losses.triplet import triplet_loss_reference

R2 = 1 / math.sqrt(2)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("l2", 1.0),
        ("cosine", 1 - R2),
        ("l2_normalized", (1 - R2) / 2),
        ("mix", 1.0 + 0.5 * (1 - R2)),
    ],
)
def test_distances_by_hand(kind: str, expected: float) -> None:
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[1.0, 1.0]])
    assert pairwise_distance(x, y, kind, mix_weight=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_l2_is_euclidean() -> None:
    assert pairwise_distance(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]), "l2").item() == pytest.approx(5.0)


def test_mix_clips_negative_cosine() -> None:
    # cos = -1: relu(cos) = 0, so the cosine part is the full weight.
    d = pairwise_distance(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]), "mix", mix_weight=2.0)
    assert d.item() == pytest.approx(2.0 + 2.0)


@pytest.mark.parametrize("kind", ["l2", "cosine", "l2_normalized", "mix"])
def test_zero_vectors_have_finite_values_and_gradients(kind: str) -> None:
    x = torch.zeros(3, 5, requires_grad=True)
    y = torch.zeros(3, 5)
    d = pairwise_distance(x, y, kind)
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(x.grad).all()


def test_triplet_by_hand() -> None:
    anchors = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    positives = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # d_p = 5, 1
    negatives = torch.tensor([[0.0, 1.0], [0.0, 10.0]])  # d_n = 1, 10
    out = triplet_loss_reference(anchors, positives, negatives, margin=1.0)
    # row 0: relu(5 - 1 + 1) = 5; row 1: relu(1 - 10 + 1) = 0
    assert out.loss.item() == pytest.approx(2.5)
    assert out.active_fraction.item() == pytest.approx(0.5)
    assert out.mean_positive_distance.item() == pytest.approx(3.0)
    assert out.mean_negative_distance.item() == pytest.approx(5.5)
    total = triplet_loss_reference(anchors, positives, negatives, margin=1.0, reduction="sum")
    assert total.loss.item() == pytest.approx(5.0)


def test_triplet_weights_exclude_rows() -> None:
    anchors = torch.zeros(2, 2)
    positives = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    negatives = torch.tensor([[0.0, 1.0], [0.0, 10.0]])
    out = triplet_loss_reference(anchors, positives, negatives, weights=torch.tensor([0.0, 1.0]), margin=1.0)
    assert out.loss.item() == pytest.approx(0.0)
    assert out.active_fraction.item() == pytest.approx(0.0)
    none = triplet_loss_reference(anchors, positives, negatives, weights=torch.zeros(2), margin=1.0)
    assert none.loss.item() == 0.0 and torch.isfinite(none.loss)


def test_triplet_indexed_positives_and_per_sample_negatives() -> None:
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # two shared positives
    positive_index = torch.tensor([0, 1, 1])
    negatives = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 3.0], [0.0, 5.0]]])  # S=2, k=2
    negative_index = torch.tensor([0, 1, 0])
    out = triplet_loss_reference(
        anchors, positives, negatives, positive_index=positive_index, negative_index=negative_index, margin=1.0
    )
    # row 0: d_p 0, d_n [0, 2] -> hinges [1, 0] -> 0.5
    # row 1: d_p 1, d_n [2, 4] -> hinges [0, 0] -> 0
    # row 2: d_p sqrt2, d_n [1, sqrt5] -> hinges [sqrt2, max(0, sqrt2 - sqrt5 + 1)]
    r2 = math.sqrt(2.0)
    row2 = (r2 + max(0.0, r2 - math.sqrt(5.0) + 1)) / 2
    assert out.loss.item() == pytest.approx((0.5 + 0 + row2) / 3, rel=1e-6)
    assert out.active_fraction.item() == pytest.approx((0.5 + 0 + 1.0) / 3, rel=1e-6)


def test_triplet_gradcheck_float64() -> None:
    torch.manual_seed(0)
    a = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    n = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    pi = torch.tensor([0, 1, 0, 1, 1])
    ni = torch.tensor([0, 1, 2, 2, 0])
    w = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
    for dp, dn in [("l2", "cosine"), ("mix", "l2_normalized"), ("cosine", "l2")]:

        def f(a, p, n):
            pa = p[pi]
            na = n[ni]
            d_pos = _dist64(a, pa, dp)
            d_neg = _dist64(a.unsqueeze(1), na, dn)
            hinge = torch.relu(d_pos.unsqueeze(1) - d_neg + 3.0).mean(1)
            return (w * hinge).sum() / w.sum()

        assert torch.autograd.gradcheck(f, (a, p, n))
        # and the reference agrees with this float64 formula
        ref = triplet_loss_reference(
            a, p, n, positive_index=pi, negative_index=ni, weights=w,
            distance_positive=dp, distance_negative=dn, margin=3.0,
        )
        assert ref.loss.item() == pytest.approx(f(a, p, n).item(), rel=1e-5)


def _dist64(x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    l2 = (x - y).pow(2).sum(-1).sqrt()
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    return {"l2": l2, "cosine": 1 - cos, "l2_normalized": (1 - cos) / 2, "mix": l2 + (1 - torch.relu(cos))}[kind]


def test_triplet_rejects_bad_shapes() -> None:
    a = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="positives"):
        triplet_loss_reference(a, torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="negative_index"):
        triplet_loss_reference(a, torch.zeros(3, 4), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="distance_positive"):
        triplet_loss_reference(a, a, a, distance_positive="manhattan")
    with pytest.raises(ValueError, match="positive_index"):
        triplet_loss_reference(a, torch.zeros(2, 4), a, positive_index=torch.tensor([0, 1, 2]))


def test_retain_kl_by_hand() -> None:
    frozen = torch.tensor([[0.0, 0.0]])
    trained = torch.tensor([[2.0, 0.0]])
    t = 2.0
    q1 = math.e / (math.e + 1)
    q = [q1, 1 - q1]
    expected = t * t * sum(0.5 * math.log(0.5 / qi) for qi in q)
    assert retain_kl(frozen, trained, t).item() == pytest.approx(expected, rel=1e-6)
    assert retain_kl(trained, trained, t).item() == pytest.approx(0.0, abs=1e-7)


def test_circuit_breaker_terms_by_hand() -> None:
    trained_r = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    frozen_r = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    trained_h = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    frozen_h = torch.tensor([[[1.0, 1.0], [-1.0, 0.0]]])
    retain, reroute = circuit_breaker_terms(trained_r, frozen_r, trained_h, frozen_h)
    assert retain.item() == pytest.approx(1.0)  # (0 + 2) / 2
    assert reroute.item() == pytest.approx(R2 / 2)  # (cos 45deg + relu(-1)) / 2


def test_repbend_terms_by_hand() -> None:
    tb = torch.tensor([[[0.0, 3.0]]])
    fb = torch.tensor([[[4.0, 0.0]]])  # distance 5
    th = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    fh = torch.zeros(1, 3, 2)
    sample = torch.tensor([0, 0, 1])  # sample 0 pools to (1, 0); sample 1 to (0, 1): cosine 0
    benign, harmful, dissim = repbend_terms(tb, fb, th, fh, sample, 2)
    assert benign.item() == pytest.approx(5.0)
    assert harmful.item() == pytest.approx(1.0)
    assert dissim.item() == pytest.approx(1.0)


def test_select_rows_and_pooling() -> None:
    hidden = {1: torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2), 2: torch.zeros(2, 3, 2)}
    mask = torch.tensor([[True, False, True], [False, True, False]])
    rows = select_rows(hidden, mask, [1, 2])
    assert rows.states.shape == (2, 3, 2)
    assert rows.row_sample.tolist() == [0, 0, 1]
    assert rows.states[0].tolist() == [[0.0, 1.0], [4.0, 5.0], [8.0, 9.0]]
    pooled = pooled_by_sample(rows.states, rows.row_sample, 2)
    assert pooled[0].tolist() == [[2.0, 3.0], [8.0, 9.0]]


def test_layer_frame_centres_and_scales() -> None:
    from crl.losses.objectives import LayerFrame

    torch.manual_seed(0)
    shared = torch.tensor([50.0, -30.0, 0.0, 0.0])  # a large component every token carries
    frozen = shared + torch.randn(2, 9, 4)
    frame = LayerFrame.fit(frozen, center=True, scale=True)
    out = frame.apply(frozen)
    assert torch.allclose(out.mean(dim=1), torch.zeros(2, 4), atol=1e-5)
    assert torch.allclose(out.norm(dim=-1).mean(dim=1), torch.ones(2), atol=1e-5)
    # [L, S, k, d] tensors (mined negatives) get the same per-layer map
    negatives = frozen[:, :6].reshape(2, 3, 2, 4)
    assert torch.allclose(frame.apply(negatives), out[:, :6].reshape(2, 3, 2, 4), atol=1e-6)
    # raw cosines are dominated by the shared component; centred ones are not
    raw = torch.nn.functional.cosine_similarity(frozen[0, 0], frozen[0, 1], dim=0)
    centred = torch.nn.functional.cosine_similarity(out[0, 0], out[0, 1], dim=0)
    assert raw > 0.99 and abs(centred) < 0.9
    plain = LayerFrame.fit(frozen, center=False, scale=False)
    assert plain.apply(frozen) is frozen
