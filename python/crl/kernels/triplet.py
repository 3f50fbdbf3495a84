"""Fused Triton triplet loss: host side (launch configuration and the autograd Function).

`triplet_loss_triton` has the signature and the semantics of
`crl.losses.triplet.triplet_loss_reference` (the specification). One kernel computes, per block of
rows, the fp32 distances from fp32/bf16/fp16 inputs, the hinge and the per-block loss partials, and,
when a gradient is needed, writes the gradients during the forward pass (the way Liger-Kernel's
fused losses do): the anchors' gradient in the anchors' dtype, a per-row positive/negative gradient
in its own dtype, and the gradient of shared positives [P, d] / per-sample negatives [S, k, d] into
small fp32 buffers of that shape (atomic adds). Backward only multiplies by grad_output. There is no
[rows, d] fp32 temporary.

CUDA tensors run the compiled kernel; CPU tensors run the same kernel in Triton's interpreter (slow,
for tests). Weights are treated as constants (no gradient to them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from crl.losses.distances import DISTANCES
from crl.losses.triplet import TripletOutput, resolve_triplet_shapes

_DIST_CODE = {name: i for i, name in enumerate(DISTANCES)}  # l2 0, cosine 1, l2_normalized 2, mix 3
_L2_KINDS = ("l2", "mix")
_COS_KINDS = ("cosine", "l2_normalized", "mix")
_TINY = torch.finfo(torch.float32).tiny
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_modules: dict[bool, ModuleType] = {}  # one entry: the loaded kernel module
_lock = threading.Lock()


@contextlib.contextmanager
def _interpret_env(interpret: bool) -> Iterator[None]:
    """TRITON_INTERPRET set to `interpret` for the duration (triton reads it lazily in places)."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def triton_interpreted() -> bool:
    """Whether triton was imported in interpreter mode (TRITON_INTERPRET=1 at its first import).

    Triton's own helpers (tl.zeros, tl.sum, ...) are decorated when triton is imported, so the
    interpreter works only if it was on then, and compiled kernels only if it was off.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _kernels() -> ModuleType:
    """The kernel module, loaded in the mode triton itself was imported in (see triton_interpreted)."""
    with _lock:
        mod = _modules.get(True)
        if mod is not None:
            return mod
        interpret = triton_interpreted()
        path = Path(__file__).with_name("_triplet_jit.py")
        name = "crl.kernels._triplet_jit"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        with _interpret_env(interpret):
            spec.loader.exec_module(mod)
        mod.INTERPRETED = interpret
        _modules[True] = mod
        return mod


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclass(frozen=True)
class KernelConfig:
    """Launch configuration (see `default_config`); the benchmark sweeps a few."""

    block_r: int
    block_d: int
    single_pass: bool
    num_warps: int = 4
    programs_per_sm: int = 4

    def describe(self) -> str:
        mode = "single-pass" if self.single_pass else "two-pass"
        return f"{mode} BLOCK_R={self.block_r} BLOCK_D={self.block_d} warps={self.num_warps} progs/SM={self.programs_per_sm}"


def default_config(d: int, k: int, shared_positive: bool, shared_negative: bool, *, device_type: str = "cuda") -> KernelConfig:
    """Heuristic launch configuration. Not timed on hardware yet (see benches/triplet_kernel.py).

    Rows whose fp32 tiles fit in registers (the whole of d at once) are read from memory once;
    otherwise two passes over d in chunks (the second mostly from L2). The sizes keep the register
    use below spilling for sm_90 as reported by ptxas (compiled without a GPU): single pass d=4096,
    k=1, 16 warps: 64 registers; two passes BLOCK_R=4, BLOCK_D=128, k=4 with a shared positive,
    8 warps: 166 registers. Single-pass tiles with k=4 and atomics made ptxas run for many minutes,
    hence the cap.
    """
    bk = _next_pow2(k)
    bd_full = _next_pow2(d)
    tiles = 2 + bk + (1 if shared_positive else 0) + (bk if shared_negative else 0)
    if device_type != "cuda":
        # Interpreter: few, large programs are what is fast (each op is one numpy call).
        bd = min(bd_full, 256)
        single = bd >= d
        return KernelConfig(block_r=8 if single else 4, block_d=bd if not single else bd_full, single_pass=single,
                            num_warps=4, programs_per_sm=1)
    if bd_full * tiles <= 12288:
        elems = bd_full * tiles
        warps = 16 if elems > 6144 else 8 if elems > 2048 else 4
        return KernelConfig(block_r=1, block_d=bd_full, single_pass=True, num_warps=warps, programs_per_sm=4)
    bd = min(bd_full, 256 if bk == 1 else 128)
    br = max(1, min(16, 4096 // (bd * tiles)))
    br = 1 << (br.bit_length() - 1)
    return KernelConfig(block_r=br, block_d=bd, single_pass=False, num_warps=8, programs_per_sm=4)


def _num_programs(n_blocks: int, device: torch.device, cfg: KernelConfig) -> tuple[int, int]:
    """(grid, iterations per program): persistent programs over contiguous row blocks."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, sms * cfg.programs_per_sm)
    else:
        target = 4  # the interpreter runs programs one after another: few programs, several iterations
    grid = max(1, min(n_blocks, target))
    iters = -(-n_blocks // grid)
    grid = max(1, -(-n_blocks // iters))
    return grid, iters


def _rowmajor(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    positive_index: torch.Tensor | None,
    negative_index: torch.Tensor | None,
    weights: torch.Tensor | None,
    distance_positive: str,
    distance_negative: str,
    margin: float,
    mix_weight: float,
    reduction: str,
    need_ga: bool,
    need_gp: bool,
    need_gn: bool,
    config: KernelConfig | None,
):
    k = resolve_triplet_shapes(
        anchors, positives, negatives, positive_index, negative_index, weights,
        distance_positive, distance_negative, reduction,
    )
    for name, t in (("anchors", anchors), ("positives", positives), ("negatives", negatives)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected fp32, bf16 or fp16, got {t.dtype}")
        if t.device != anchors.device:
            raise ValueError(f"{name}: expected device {anchors.device}, got {t.device}")
    device = anchors.device
    rows, d = anchors.shape
    a = _rowmajor(anchors)
    p = _rowmajor(positives)
    n = _rowmajor(negatives)
    per_sample = n.dim() == 3
    if per_sample:
        stride_ns, stride_nk = n.stride(0), n.stride(1)
    else:
        stride_ns, stride_nk = n.stride(0), 0
    gp_atomic = positive_index is not None
    gn_atomic = per_sample

    pidx = positive_index.to(device) if positive_index is not None else None
    nidx = negative_index.to(device) if negative_index is not None else None
    if weights is not None:
        w = weights.detach().to(device=device, dtype=torch.float32).contiguous()
        total_w = w.sum()
    else:
        w = None
        total_w = torch.tensor(float(rows), device=device, dtype=torch.float32)
    denom = torch.clamp(total_w, min=_TINY)
    scale = (1.0 / denom) if reduction == "mean" else torch.ones((), device=device, dtype=torch.float32)
    scale = scale.reshape(1)

    ga = torch.empty_like(a, memory_format=torch.contiguous_format) if need_ga else None
    if need_gp:
        gp = torch.zeros(p.shape, device=device, dtype=torch.float32) if gp_atomic else torch.empty(p.shape, device=device, dtype=p.dtype)
    else:
        gp = None
    if need_gn:
        gn = torch.zeros(n.shape, device=device, dtype=torch.float32) if gn_atomic else torch.empty(n.shape, device=device, dtype=n.dtype)
    else:
        gn = None

    cfg = config or default_config(d, k, gp_atomic and need_gp, gn_atomic and need_gn, device_type=device.type)
    block_d = max(cfg.block_d, _next_pow2(d)) if cfg.single_pass else cfg.block_d
    n_blocks = -(-rows // cfg.block_r)
    grid, iters = _num_programs(n_blocks, device, cfg)
    partials = torch.empty((grid, 4), device=device, dtype=torch.float32)

    mod = _kernels()
    interpret = mod.INTERPRETED
    if device.type != "cuda" and not interpret:
        raise RuntimeError(
            "the Triton triplet kernel got CPU tensors but triton was imported without its interpreter: "
            "set TRITON_INTERPRET=1 before triton is first imported (or use CRL_TRIPLET_BACKEND=torch)"
        )
    dummy = a
    with _interpret_env(interpret) if interpret else contextlib.nullcontext():
        _run_kernel(mod, grid, (
                a, p, n,
                pidx if pidx is not None else dummy,
                nidx if nidx is not None else dummy,
                w if w is not None else dummy,
                scale,
                ga if ga is not None else dummy,
                gp if gp is not None else dummy,
                gn if gn is not None else dummy,
                partials,
                rows, d, k, iters,
                a.stride(0), p.stride(0), stride_ns, stride_nk,
                ga.stride(0) if ga is not None else 0,
                gp.stride(0) if gp is not None else 0,
                (gn.stride(0) if gn is not None else 0),
                (gn.stride(1) if (gn is not None and per_sample) else 0),
                float(margin), float(mix_weight),
        ), dict(
                DIST_P=_DIST_CODE[distance_positive], DIST_N=_DIST_CODE[distance_negative],
                P_L2=distance_positive in _L2_KINDS, P_COS=distance_positive in _COS_KINDS,
                N_L2=distance_negative in _L2_KINDS, N_COS=distance_negative in _COS_KINDS,
                HAS_PIDX=pidx is not None, HAS_NIDX=nidx is not None, HAS_W=w is not None,
                NEED_GA=need_ga, NEED_GP=need_gp, NEED_GN=need_gn,
                GP_ATOMIC=gp_atomic, GN_ATOMIC=gn_atomic,
                SINGLE_PASS=cfg.single_pass,
                BLOCK_R=cfg.block_r, BLOCK_K=_next_pow2(k), BLOCK_D=block_d,
                num_warps=cfg.num_warps,
        ))
    sums = partials.sum(0)  # [4]: weighted loss, active, positive distance, negative distance
    loss = sums[0] * scale[0]
    stats = sums[1:] / denom
    return loss, stats[0], stats[1], stats[2], ga, gp, gn


def _run_kernel(mod: ModuleType, grid: int, args: tuple, kwargs: dict) -> None:
    mod.triplet_fwd_kernel[(grid,)](*args, **kwargs)


class _TripletLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, positives, negatives, positive_index, negative_index, weights, options):
        (distance_positive, distance_negative, margin, mix_weight, reduction, need_ga, need_gp, need_gn, config) = options
        loss, active, mean_pos, mean_neg, ga, gp, gn = _launch(
            anchors, positives, negatives, positive_index, negative_index, weights,
            distance_positive, distance_negative, margin, mix_weight, reduction,
            need_ga, need_gp, need_gn, config,
        )
        ctx.positive_dtype = positives.dtype
        ctx.negative_dtype = negatives.dtype
        ctx.has = (ga is not None, gp is not None, gn is not None)
        ctx.save_for_backward(*(g for g in (ga, gp, gn) if g is not None))
        ctx.mark_non_differentiable(active, mean_pos, mean_neg)
        return loss, active, mean_pos, mean_neg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_unused):
        saved = list(ctx.saved_tensors)  # checks that nothing modified them (a second backward would)
        grads = [saved.pop(0) if has else None for has in ctx.has]
        ga, gp, gn = grads
        if grad_loss is None:
            return None, None, None, None, None, None, None
        # Skip the scaling pass when grad_output is exactly 1 (a sync, as in Liger-Kernel).
        unit = grad_loss.numel() == 1 and bool(grad_loss == 1)
        if ga is not None and not unit:
            ga.mul_(grad_loss.to(ga.device))  # in place: no second [R, d] buffer
        if gp is not None:
            if gp.dtype != ctx.positive_dtype or not unit:  # fp32 [P, d] buffer (small) or per-row
                gp = (gp if unit else gp.mul_(grad_loss)).to(ctx.positive_dtype)
        if gn is not None:
            if gn.dtype != ctx.negative_dtype or not unit:
                gn = (gn if unit else gn.mul_(grad_loss)).to(ctx.negative_dtype)
        return ga, gp, gn, None, None, None, None


def triplet_loss_triton(
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
    config: KernelConfig | None = None,
) -> TripletOutput:
    """The fused kernel; same arguments and result as `triplet_loss_reference` (plus `config`).

    Gradients flow to anchors, positives and negatives (whichever require grad); `weights` get no
    gradient (an error if they require one: use the torch backend for that).
    """
    if anchors.dim() == 2 and (anchors.shape[0] == 0 or anchors.shape[1] == 0):
        # Nothing to launch: the reference handles the empty case (loss 0, gradients 0).
        from crl.losses.triplet import triplet_loss_reference

        return triplet_loss_reference(
            anchors, positives, negatives, positive_index=positive_index, negative_index=negative_index,
            weights=weights, distance_positive=distance_positive, distance_negative=distance_negative,
            margin=margin, mix_weight=mix_weight, reduction=reduction,  # type: ignore[arg-type]
        )
    if weights is not None and weights.requires_grad and torch.is_grad_enabled():
        raise ValueError("weights: the fused kernel gives no gradient to weights; detach them or use the torch backend")
    grad = torch.is_grad_enabled()
    need = (grad and anchors.requires_grad, grad and positives.requires_grad, grad and negatives.requires_grad)
    options = (distance_positive, distance_negative, float(margin), float(mix_weight), reduction, *need, config)
    if any(need):
        loss, active, mean_pos, mean_neg = _TripletLossFunction.apply(
            anchors, positives, negatives, positive_index, negative_index, weights, options
        )
    else:
        loss, active, mean_pos, mean_neg, *_ = _launch(
            anchors, positives, negatives, positive_index, negative_index, weights,
            distance_positive, distance_negative, float(margin), float(mix_weight), reduction,
            False, False, False, config,
        )
    return TripletOutput(loss, active, mean_pos, mean_neg)
