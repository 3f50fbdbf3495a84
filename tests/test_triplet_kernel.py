"""The fused Triton triplet kernel against the torch reference (the specification).

On a machine without CUDA the kernel runs in Triton's interpreter on the CPU: TRITON_INTERPRET=1
must be set before triton is first imported, so this module sets it before importing anything
that could import triton. Sizes are small because the interpreter is slow.
"""

from __future__ import annotations

import os

try:
    import torch

    _CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency of the package
    _CUDA = False
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
try:
    import crl  # noqa: F401
except ImportError:  # running from a source tree without an install
    sys.path.insert(0, str(REPO / "python"))

triton = pytest.importorskip("triton", reason="triton is not installed")

from crl.kernels import dispatch  # noqa: E402
from crl.kernels import triplet_loss  # noqa: E402
from crl.kernels.triplet import KernelConfig, triton_interpreted, triplet_loss_triton  # noqa: E402
from crl.losses.distances import DISTANCES  # noqa: E402
from crl.losses.triplet import triplet_loss_reference  # noqa: E402

INTERPRETED = triton_interpreted()
if not _CUDA and not INTERPRETED:
    pytest.skip(
        "triton was imported before this module could enable its interpreter (TRITON_INTERPRET=1) "
        "and there is no GPU: run this file alone, or set TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )
DEVICE = "cpu" if INTERPRETED else "cuda"

# Configurations covering both kernel modes: rows in registers (whole d) and two passes over d chunks.
SINGLE = KernelConfig(block_r=4, block_d=64, single_pass=True)
TWO_PASS = KernelConfig(block_r=4, block_d=16, single_pass=False)


def _leaves(*tensors, grads=(True, True, True)):
    return [t.detach().clone().requires_grad_(g) for t, g in zip(tensors, grads)]


def _compare(
    anchors, positives, negatives, *, config=None, grads=(True, True, True), grad_scale=1.0, dtype_tol=None, **kwargs
):
    """Run kernel and reference on copies of the inputs; assert loss, statistics and gradients agree."""
    ka, kp, kn = _leaves(anchors, positives, negatives, grads=grads)
    ra, rp, rn = _leaves(anchors, positives, negatives, grads=grads)
    out = triplet_loss_triton(ka, kp, kn, config=config, **kwargs)
    ref = triplet_loss_reference(ra, rp, rn, **kwargs)
    if any(grads):
        (out.loss * grad_scale).backward()
        (ref.loss * grad_scale).backward()
    fp32 = anchors.dtype == torch.float32 and positives.dtype == torch.float32 and negatives.dtype == torch.float32
    rtol = 1e-5 if fp32 else 2e-2
    for name in ("loss", "active_fraction", "mean_positive_distance", "mean_negative_distance"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32 and got.dim() == 0, name
        assert torch.isfinite(got), name
        torch.testing.assert_close(got.cpu(), want.detach().cpu(), rtol=1e-5 if fp32 else 1e-4, atol=1e-6, msg=name)
    assert not out.active_fraction.requires_grad
    for name, k, r in (("anchors", ka, ra), ("positives", kp, rp), ("negatives", kn, rn)):
        if not r.requires_grad:
            assert k.grad is None
            continue
        assert k.grad is not None, name
        assert k.grad.dtype == r.grad.dtype and k.grad.shape == r.grad.shape, name
        assert torch.isfinite(k.grad.float()).all(), name
        want = r.grad.float()
        scale = want.abs().max().item()
        tol = dtype_tol if dtype_tol is not None else rtol
        torch.testing.assert_close(k.grad.float(), want, rtol=tol, atol=tol * max(scale, 1e-30), msg=name)
    return out, ref


def _rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("distance_positive", DISTANCES)
@pytest.mark.parametrize("distance_negative", DISTANCES)
def test_every_distance_pair(distance_positive, distance_negative):
    gen = torch.Generator().manual_seed(hash((distance_positive, distance_negative)) % 2**31)
    rows, d = 13, 37  # rows not a multiple of the block, d not a power of two
    a, p, n = _rand(rows, d, gen=gen), _rand(rows, d, gen=gen), _rand(rows, d, gen=gen)
    # A margin in the middle of the hinge's range, so that some triplets are active and some not.
    margin = {"l2": 0.5, "cosine": 0.05, "l2_normalized": 0.02, "mix": 0.5}[distance_negative]
    reduction = "mean" if (DISTANCES.index(distance_positive) + DISTANCES.index(distance_negative)) % 2 else "sum"
    config = SINGLE if DISTANCES.index(distance_positive) % 2 else TWO_PASS
    _compare(a, p, n, config=config, distance_positive=distance_positive, distance_negative=distance_negative,
             margin=margin, mix_weight=0.7, reduction=reduction)


@pytest.mark.parametrize("config", [SINGLE, TWO_PASS, None], ids=["single", "two_pass", "default"])
@pytest.mark.parametrize("sorted_index", [True, False], ids=["runs", "scattered"])
def test_shared_positives_and_per_sample_negatives(config, sorted_index):
    """positives [P, d] via positive_index and negatives [S, k, d] via negative_index, k > 1."""
    gen = torch.Generator().manual_seed(7)
    rows, d, P, S, k = 23, 45, 3, 5, 3
    a, p, n = _rand(rows, d, gen=gen), _rand(P, d, gen=gen), _rand(S, k, d, gen=gen)
    pi = torch.randint(0, P, (rows,), generator=gen)
    ni = torch.randint(0, S, (rows,), generator=gen)
    if sorted_index:  # runs of rows sharing a positive / a sample, as the training batches lay them out
        pi, ni = pi.sort().values, ni.sort().values
    _compare(a, p, n, config=config, positive_index=pi.to(DEVICE), negative_index=ni.to(torch.int32).to(DEVICE),
             distance_positive="l2", distance_negative="cosine", margin=1.2)


def test_centroid_positive_with_mix_and_weights():
    """The harmful triplet: one centroid per layer as the positive, per-sample mined negatives, a row mask."""
    gen = torch.Generator().manual_seed(11)
    layers, per_layer, d, S, k = 2, 9, 40, 3, 4
    rows = layers * per_layer
    a = _rand(rows, d, gen=gen)
    centroids = _rand(layers, d, gen=gen)
    n = _rand(S, k, d, gen=gen)
    pi = torch.arange(layers).repeat_interleave(per_layer).to(DEVICE)
    ni = torch.randint(0, S, (rows,), generator=gen).sort().values.to(DEVICE)
    w = (torch.rand(rows, generator=gen) > 0.3).float().to(DEVICE)
    _compare(a, centroids, n, positive_index=pi, negative_index=ni, weights=w,
             distance_positive="mix", distance_negative="mix", margin=1.0, mix_weight=2.0, config=SINGLE)


@pytest.mark.parametrize("margin", [100.0, -100.0], ids=["all_active", "none_active"])
def test_margin_extremes(margin):
    gen = torch.Generator().manual_seed(3)
    a, p, n = _rand(9, 33, gen=gen), _rand(9, 33, gen=gen), _rand(4, 2, 33, gen=gen)
    ni = torch.randint(0, 4, (9,), generator=gen).to(DEVICE)
    out, _ = _compare(a, p, n, negative_index=ni, distance_positive="cosine", distance_negative="l2",
                      margin=margin, config=TWO_PASS)
    assert out.active_fraction.item() == (1.0 if margin > 0 else 0.0)


def test_masked_rows_and_float_weights():
    gen = torch.Generator().manual_seed(5)
    rows, d = 14, 29
    a, p, n = _rand(rows, d, gen=gen), _rand(rows, d, gen=gen), _rand(rows, d, gen=gen)
    w = torch.rand(rows, generator=gen)
    w[3:8] = 0.0  # fully masked rows, including a whole block
    # Masked rows contain large values: they must not leak into the loss or the gradients.
    a[3:8] *= 1e3
    _compare(a, p, n, weights=w.to(DEVICE), margin=2.0, config=SINGLE)
    _compare(a, p, n, weights=(w > 0.5).to(DEVICE), margin=2.0, config=TWO_PASS, reduction="sum")


def test_all_rows_masked_gives_zero():
    gen = torch.Generator().manual_seed(6)
    a, p, n = _rand(5, 20, gen=gen), _rand(5, 20, gen=gen), _rand(5, 20, gen=gen)
    out, _ = _compare(a, p, n, weights=torch.zeros(5, device=DEVICE), margin=5.0, config=SINGLE)
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("kind", ["cosine", "l2_normalized", "mix", "l2"])
def test_zero_vectors_no_nan(kind):
    gen = torch.Generator().manual_seed(8)
    rows, d = 8, 24
    a, p, n = _rand(rows, d, gen=gen), _rand(rows, d, gen=gen), _rand(rows, d, gen=gen)
    a[0] = 0.0  # zero anchor
    p[1] = 0.0  # zero positive
    n[2] = 0.0  # zero negative
    a[3] = 0.0
    p[3] = 0.0
    n[3] = 0.0  # all zero
    p[4] = a[4]  # identical anchor and positive (l2 distance 0: subgradient 0)
    out, ref = _compare(a, p, n, distance_positive=kind, distance_negative=kind, margin=0.3, config=TWO_PASS)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("kind", ["cosine", "mix"])
def test_tiny_vectors_clamped_norm_product(kind):
    """0 < |a| |p| < eps: the reference clamps the norm product (cos = a.p / eps); so does the kernel."""
    gen = torch.Generator().manual_seed(18)
    rows, d = 6, 24
    a, p, n = _rand(rows, d, gen=gen), _rand(rows, d, gen=gen), _rand(rows, d, gen=gen)
    a[:3] *= 1e-5
    p[:3] *= 1e-5
    p[3:] = a[3:] * 1e-10  # parallel, clamped: cos = |a|^2 1e-10 / eps
    _compare(a, p, n, distance_positive=kind, distance_negative="l2", margin=10.0, config=SINGLE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    gen = torch.Generator().manual_seed(9)
    rows, d, S, k = 21, 50, 4, 2
    a, p, n = _rand(rows, d, dtype=dtype, gen=gen), _rand(2, d, dtype=dtype, gen=gen), _rand(S, k, d, dtype=dtype, gen=gen)
    pi = torch.randint(0, 2, (rows,), generator=gen).sort().values.to(DEVICE)
    ni = torch.randint(0, S, (rows,), generator=gen).to(DEVICE)
    # Anchor grads are stored in the input dtype (one rounding), the reference casts once too.
    _compare(a, p, n, positive_index=pi, negative_index=ni, distance_positive="l2", distance_negative="cosine",
             margin=0.5, config=SINGLE, dtype_tol=2e-2)
    _compare(a, p, n, positive_index=pi, negative_index=ni, distance_positive="l2_normalized",
             distance_negative="mix", margin=1.0, config=TWO_PASS, dtype_tol=2e-2, reduction="sum")


def test_mixed_dtypes_fp32_centroid_bf16_anchors():
    gen = torch.Generator().manual_seed(10)
    a = _rand(12, 31, dtype=torch.bfloat16, gen=gen)
    c = _rand(1, 31, gen=gen)
    n = _rand(12, 31, dtype=torch.bfloat16, gen=gen)
    pi = torch.zeros(12, dtype=torch.long, device=DEVICE)
    _compare(a, c, n, positive_index=pi, distance_positive="cosine", distance_negative="cosine", margin=0.5,
             config=SINGLE, dtype_tol=2e-2)


@pytest.mark.parametrize("grads", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["anchors", "positives", "negatives"])
def test_partial_requires_grad_and_grad_output_scaling(grads):
    gen = torch.Generator().manual_seed(12)
    a, p, n = _rand(10, 26, gen=gen), _rand(10, 26, gen=gen), _rand(10, 26, gen=gen)
    _compare(a, p, n, grads=grads, grad_scale=-2.5, margin=1.5, config=TWO_PASS)


def test_no_grad_path_and_reuse_in_bigger_graph():
    gen = torch.Generator().manual_seed(13)
    a, p, n = _rand(10, 26, gen=gen), _rand(10, 26, gen=gen), _rand(10, 26, gen=gen)
    with torch.no_grad():
        out = triplet_loss_triton(a, p, n, margin=1.5)
    ref = triplet_loss_reference(a, p, n, margin=1.5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    # The kernel's loss combined with another term: grad_output != 1 reaches the kernel's backward.
    ka, ra = a.clone().requires_grad_(True), a.clone().requires_grad_(True)
    (0.5 * triplet_loss_triton(ka, p, n, margin=1.5).loss + (ka**2).sum()).backward()
    (0.5 * triplet_loss_reference(ra, p, n, margin=1.5).loss + (ra**2).sum()).backward()
    torch.testing.assert_close(ka.grad, ra.grad, rtol=1e-5, atol=1e-6)


def test_non_contiguous_rows():
    gen = torch.Generator().manual_seed(14)
    big = _rand(12, 64, gen=gen)
    a = big[:, 5:35]  # row stride 64, last dim contiguous
    p = _rand(30, 12, gen=gen).t()  # last dim not contiguous: copied
    n = _rand(12, 30, gen=gen)
    _compare(a, p, n, margin=1.0, config=SINGLE)


def test_directional_derivative_matches_finite_difference():
    """gradcheck-style: <grad, v> against a central difference of the kernel's own loss."""
    gen = torch.Generator().manual_seed(15)
    rows, d = 9, 21
    a, p, n = _rand(rows, d, gen=gen), _rand(3, d, gen=gen), _rand(rows, d, gen=gen)
    pi = torch.randint(0, 3, (rows,), generator=gen).to(DEVICE)
    kw = dict(positive_index=pi, distance_positive="mix", distance_negative="cosine", margin=2.0, config=SINGLE)
    a64 = a.clone().requires_grad_(True)
    p64 = p.clone().requires_grad_(True)
    triplet_loss_triton(a64, p64, n, **kw).loss.backward()
    va, vp = _rand(rows, d, gen=gen), _rand(3, d, gen=gen)
    eps = 1e-2
    with torch.no_grad():
        up = triplet_loss_triton(a + eps * va, p + eps * vp, n, **kw).loss.double()
        down = triplet_loss_triton(a - eps * va, p - eps * vp, n, **kw).loss.double()
    numeric = ((up - down) / (2 * eps)).item()
    analytic = ((a64.grad * va).sum() + (p64.grad * vp).sum()).item()
    assert math.isclose(numeric, analytic, rel_tol=2e-3, abs_tol=1e-4), (numeric, analytic)


def test_validation_errors_match_reference():
    a, p, n = _rand(4, 8), _rand(4, 8), _rand(4, 8)
    with pytest.raises(ValueError, match="positives"):
        triplet_loss_triton(a, _rand(3, 8), n)
    with pytest.raises(ValueError, match="negative_index"):
        triplet_loss_triton(a, p, _rand(2, 3, 8))
    with pytest.raises(ValueError, match="distance_positive"):
        triplet_loss_triton(a, p, n, distance_positive="dot")
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        triplet_loss_triton(a.double(), p.double(), n.double())
    with pytest.raises(ValueError, match="weights"):
        triplet_loss_triton(a, p, n, weights=torch.ones(4, device=DEVICE, requires_grad=True))


def test_empty_batch():
    a = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    out = triplet_loss_triton(a, torch.zeros(0, 8, device=DEVICE), torch.zeros(0, 8, device=DEVICE))
    out.loss.backward()
    assert out.loss.item() == 0.0 and a.grad.shape == (0, 8)


def test_dispatch_backends(monkeypatch):
    a, p, n = _rand(6, 10), _rand(6, 10), _rand(6, 10)
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.resolve_backend(a) == "torch"
    ref = triplet_loss(a, p, n, margin=1.0)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.resolve_backend(a) == "triton"
    out = triplet_loss(a, p, n, margin=1.0)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.resolve_backend(a) == ("triton" if a.is_cuda else "torch")
    assert dispatch.resolve_backend(a, "torch") == "torch"  # the argument overrides the variable
    # auto sends weights that need a gradient to the reference (the kernel treats them as constants)
    w = torch.ones(6, requires_grad=True, device=DEVICE)
    triplet_loss(a, p, n, weights=w).loss.backward()
    assert w.grad is not None
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="CRL_TRIPLET_BACKEND"):
        triplet_loss(a, p, n)


def test_bench_smoke(tmp_path):
    """benches/triplet_kernel.py --smoke: the tiny interpreter (or GPU) run writes its JSON."""
    spec = importlib.util.spec_from_file_location("crl_bench_triplet_kernel", REPO / "benches" / "triplet_kernel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--output", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert data["mode"] == "smoke" and data["cases"]
    assert all(case["max_abs_grad_error"] < 1e-4 for case in data["cases"])


def test_strided_indices_are_read_as_given():
    """A strided index view (every other entry of a longer index) means what it says: the kernel
    makes indices contiguous before reading them with stride 1."""
    gen = torch.Generator().manual_seed(21)
    rows, d, k = 11, 24, 3
    a, p, n = _rand(rows, d, gen=gen), _rand(4, d, gen=gen), _rand(5, k, d, gen=gen)
    long_p = torch.randint(0, 4, (2 * rows,), generator=gen).to(DEVICE)
    long_n = torch.randint(0, 5, (2 * rows,), generator=gen).to(DEVICE)
    pi, ni = long_p[::2], long_n[1::2]
    assert not pi.is_contiguous() and not ni.is_contiguous()
    for config in (SINGLE, TWO_PASS):
        _compare(a, p, n, positive_index=pi, negative_index=ni, distance_positive="cosine",
                 distance_negative="l2", margin=1.0, config=config)


def test_second_backward_names_the_problem():
    """The kernel's gradients are computed in the forward and scaled in place by the backward: a
    second backward through the same forward must say so, not fail with an in-place error."""
    gen = torch.Generator().manual_seed(22)
    a, p, n = _leaves(_rand(6, 16, gen=gen), _rand(6, 16, gen=gen), _rand(6, 16, gen=gen))
    out = triplet_loss_triton(a, p, n, margin=2.0, config=TWO_PASS)
    (3.0 * out.loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_index_range_check_is_optional(monkeypatch):
    """check_indices=False skips the range check (a device sync); CRL_DEBUG_CHECKS=1 restores it."""
    gen = torch.Generator().manual_seed(23)
    a, p = _rand(4, 8, gen=gen), _rand(2, 8, gen=gen)
    n = _rand(4, 8, gen=gen)
    bad = torch.tensor([0, 1, 2, 1], device=DEVICE)  # 2 is out of range for 2 positives
    for fn in (triplet_loss_reference, triplet_loss_triton):
        with pytest.raises(ValueError, match=r"positive_index: values must lie in \[0, 2\)"):
            fn(a, p, n, positive_index=bad)
    good = torch.tensor([0, 1, 1, 0], device=DEVICE)
    calls = []
    monkeypatch.setattr(torch, "aminmax", lambda *args, **kw: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    for fn in (triplet_loss_reference, triplet_loss_triton):
        fn(a, p, n, positive_index=good, check_indices=False)
    assert not calls
    monkeypatch.undo()
    monkeypatch.setenv("CRL_DEBUG_CHECKS", "1")
    for fn in (triplet_loss_reference, triplet_loss_triton):
        with pytest.raises(ValueError, match="positive_index"):
            fn(a, p, n, positive_index=bad, check_indices=False)


def test_cuda_configs_are_two_pass_and_bounded():
    """Every CUDA default is two-pass with at most 2 rows per block (the shapes scripts/
    kernel_aot_check.py compiles without spills); more than MAX_KERNEL_K negatives go to the
    reference under the auto backend and are refused by the kernel with a clear error."""
    from crl.kernels.launch_config import MAX_KERNEL_K, default_config

    for d in (64, 576, 2048, 4096, 8192):
        for k in (1, 2, 3, 4, 8, 16, 31, 64, MAX_KERNEL_K):
            for sp in (False, True):
                for sn in (False, True):
                    cfg = default_config(d, k, sp, sn)
                    assert not cfg.single_pass and cfg.block_r <= 2 and cfg.block_d <= 256, (d, k, cfg)
    with pytest.raises(ValueError, match=f"at most {MAX_KERNEL_K} negatives"):
        default_config(4096, MAX_KERNEL_K + 1, False, False)
    many = torch.randn(2, MAX_KERNEL_K + 1, 8)
    seen = []
    monkey = dispatch.triplet_loss_reference

    def spy(*args, **kwargs):
        seen.append(1)
        return monkey(*args, **kwargs)

    original_resolve = dispatch.resolve_backend
    try:
        dispatch.triplet_loss_reference = spy
        dispatch.resolve_backend = lambda anchors, backend=None: "triton"  # as for CUDA tensors under auto
        dispatch.triplet_loss(torch.randn(3, 8), torch.randn(3, 8), many, negative_index=torch.tensor([0, 1, 1]),
                              backend="auto")
    finally:
        dispatch.triplet_loss_reference = monkey
        dispatch.resolve_backend = original_resolve
    assert seen == [1]


@pytest.mark.parametrize("config", [SINGLE, TWO_PASS], ids=["single", "two_pass"])
def test_non_finite_inputs_give_a_non_finite_loss(config):
    """NaN or Inf in a row makes the loss non-finite, as in the reference: the kernel must not report
    a finite loss over NaN gradients (the training loop stops on a non-finite loss)."""
    gen = torch.Generator().manual_seed(24)
    for bad in (float("nan"), float("inf")):
        a, p, n = _rand(7, 20, gen=gen), _rand(7, 20, gen=gen), _rand(7, 20, gen=gen)
        a[3, 5] = bad
        out = triplet_loss_triton(a, p, n, distance_positive="l2", distance_negative="cosine", margin=1.0, config=config)
        ref = triplet_loss_reference(a, p, n, distance_positive="l2", distance_negative="cosine", margin=1.0)
        assert not torch.isfinite(ref.loss)
        assert not torch.isfinite(out.loss), (bad, out.loss)
