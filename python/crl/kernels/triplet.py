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

from crl.kernels.launch_config import KernelConfig, default_config, kernel_constexprs
from crl.losses.triplet import TripletOutput, resolve_triplet_shapes

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


@dataclass(frozen=True)
class _LaunchOptions:
    """What one call asks of the kernel besides its tensors."""

    distance_positive: str
    distance_negative: str
    margin: float
    mix_weight: float
    reduction: str
    need_ga: bool
    need_gp: bool
    need_gn: bool
    config: KernelConfig | None
    check_indices: bool = True


def _gradient_buffer(like: torch.Tensor, needed: bool, scattered: bool) -> torch.Tensor | None:
    """The gradient of `like`: an fp32 buffer of zeros when rows scatter into it (atomic adds),
    otherwise written once per row in the input's dtype."""
    if not needed:
        return None
    if scattered:
        return torch.zeros(like.shape, device=like.device, dtype=torch.float32)
    return torch.empty(like.shape, device=like.device, dtype=like.dtype)


def _launch(anchors, positives, negatives, positive_index, negative_index, weights, opts: _LaunchOptions):
    """One kernel launch: (loss, active, mean_pos, mean_neg, grad anchors, grad positives, grad negatives).

    Nothing here waits for the device: the mean's weight is computed on the device, indices are
    only range-checked when `check_indices` (see crl.losses.triplet.resolve_triplet_shapes)."""
    k = resolve_triplet_shapes(
        anchors, positives, negatives, positive_index, negative_index, weights,
        opts.distance_positive, opts.distance_negative, opts.reduction, check_indices=opts.check_indices,
    )
    for name, t in (("anchors", anchors), ("positives", positives), ("negatives", negatives)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected fp32, bf16 or fp16, got {t.dtype}")
        if t.device != anchors.device:
            raise ValueError(f"{name}: expected device {anchors.device}, got {t.device}")
    device = anchors.device
    rows, d = anchors.shape
    a, p, n = _rowmajor(anchors), _rowmajor(positives), _rowmajor(negatives)
    per_sample = n.dim() == 3
    gp_atomic = positive_index is not None
    # The kernel reads indices with stride 1: a strided view would be read wrongly.
    pidx = positive_index.to(device).contiguous() if positive_index is not None else None
    nidx = negative_index.to(device).contiguous() if negative_index is not None else None
    if weights is not None:
        w = weights.detach().to(device=device, dtype=torch.float32).contiguous()
        total_w = w.sum()
    else:
        w = None
        total_w = torch.full((), float(rows), device=device, dtype=torch.float32)  # a fill, not a host copy
    denom = torch.clamp(total_w, min=_TINY)
    scale = (1.0 / denom) if opts.reduction == "mean" else torch.ones((), device=device, dtype=torch.float32)
    scale = scale.reshape(1)

    ga = _gradient_buffer(a, opts.need_ga, scattered=False)
    gp = _gradient_buffer(p, opts.need_gp, scattered=gp_atomic)
    gn = _gradient_buffer(n, opts.need_gn, scattered=per_sample)

    cfg = opts.config or default_config(d, k, gp_atomic and opts.need_gp, per_sample and opts.need_gn,
                                        device_type=device.type)
    n_blocks = -(-rows // cfg.block_r)
    grid, iters = _num_programs(n_blocks, device, cfg)
    partials = torch.empty((grid, 4), device=device, dtype=torch.float32)

    constexprs = kernel_constexprs(
        d=d, k=k, distance_positive=opts.distance_positive, distance_negative=opts.distance_negative,
        has_positive_index=pidx is not None, has_negative_index=nidx is not None, has_weights=w is not None,
        need_ga=opts.need_ga, need_gp=opts.need_gp, need_gn=opts.need_gn, per_sample_negatives=per_sample,
        config=cfg,
    )
    _run_kernel(grid, iters, cfg, constexprs, a=a, p=p, n=n, pidx=pidx, nidx=nidx, w=w, scale=scale,
                ga=ga, gp=gp, gn=gn, partials=partials, margin=opts.margin, mix_weight=opts.mix_weight)
    sums = partials.sum(0)  # [4]: weighted loss, active, positive distance, negative distance
    loss = sums[0] * scale[0]
    stats = sums[1:] / denom
    return loss, stats[0], stats[1], stats[2], ga, gp, gn


def _run_kernel(grid: int, iters: int, cfg: KernelConfig, constexprs: dict, *, a, p, n, pidx, nidx, w, scale,
                ga, gp, gn, partials, margin: float, mix_weight: float) -> None:
    """Launch `triplet_fwd_kernel` (compiled on CUDA, interpreted on the CPU), every argument by keyword."""
    mod = _kernels()
    interpret = mod.INTERPRETED
    if a.device.type != "cuda" and not interpret:
        raise RuntimeError(
            "the Triton triplet kernel got CPU tensors but triton was imported without its interpreter: "
            "set TRITON_INTERPRET=1 before triton is first imported (or use CRL_TRIPLET_BACKEND=torch)"
        )
    rows, d = a.shape
    per_sample = n.dim() == 3
    unused = a  # any pointer: the kernel never reads an input that its constexprs switch off
    with _interpret_env(interpret) if interpret else contextlib.nullcontext():
        mod.triplet_fwd_kernel[(grid,)](
            a_ptr=a, p_ptr=p, n_ptr=n,
            pidx_ptr=pidx if pidx is not None else unused,
            nidx_ptr=nidx if nidx is not None else unused,
            w_ptr=w if w is not None else unused,
            scale_ptr=scale,
            ga_ptr=ga if ga is not None else unused,
            gp_ptr=gp if gp is not None else unused,
            gn_ptr=gn if gn is not None else unused,
            part_ptr=partials,
            R=rows, D=d, K=n.shape[1] if per_sample else 1, ITERS=iters,
            stride_a=a.stride(0), stride_p=p.stride(0),
            stride_ns=n.stride(0), stride_nk=n.stride(1) if per_sample else 0,
            stride_ga=ga.stride(0) if ga is not None else 0,
            stride_gp=gp.stride(0) if gp is not None else 0,
            stride_gns=gn.stride(0) if gn is not None else 0,
            stride_gnk=gn.stride(1) if (gn is not None and per_sample) else 0,
            margin=float(margin), mix_weight=float(mix_weight),
            num_warps=cfg.num_warps,
            **constexprs,
        )


class _TripletLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchors, positives, negatives, positive_index, negative_index, weights, opts: _LaunchOptions):
        loss, active, mean_pos, mean_neg, ga, gp, gn = _launch(
            anchors, positives, negatives, positive_index, negative_index, weights, opts
        )
        ctx.positive_dtype = positives.dtype
        ctx.negative_dtype = negatives.dtype
        ctx.has = (ga is not None, gp is not None, gn is not None)
        ctx.used = False
        ctx.save_for_backward(*(g for g in (ga, gp, gn) if g is not None))
        ctx.mark_non_differentiable(active, mean_pos, mean_neg)
        return loss, active, mean_pos, mean_neg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_unused):
        if ctx.used:
            raise RuntimeError(
                "the fused triplet kernel's backward ran twice on one forward (retain_graph=True): its "
                "gradients are computed in the forward and scaled in place, so they can be used once; "
                "recompute the loss, or use the torch backend (CRL_TRIPLET_BACKEND=torch)"
            )
        ctx.used = True
        saved = list(ctx.saved_tensors)
        ga, gp, gn = (saved.pop(0) if has else None for has in ctx.has)
        if grad_loss is None:
            return None, None, None, None, None, None, None
        # Always scaled, in place (no second [R, d] buffer): testing grad_output == 1 to skip it, as
        # Liger-Kernel does, would wait for the device.
        if ga is not None:
            ga.mul_(grad_loss.to(ga.device))
        if gp is not None:
            gp = gp.mul_(grad_loss).to(ctx.positive_dtype)
        if gn is not None:
            gn = gn.mul_(grad_loss).to(ctx.negative_dtype)
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
    check_indices: bool = True,
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
            check_indices=check_indices,
        )
    if weights is not None and weights.requires_grad and torch.is_grad_enabled():
        raise ValueError("weights: the fused kernel gives no gradient to weights; detach them or use the torch backend")
    grad = torch.is_grad_enabled()
    need = (grad and anchors.requires_grad, grad and positives.requires_grad, grad and negatives.requires_grad)
    opts = _LaunchOptions(
        distance_positive=distance_positive, distance_negative=distance_negative, margin=float(margin),
        mix_weight=float(mix_weight), reduction=reduction, need_ga=need[0], need_gp=need[1], need_gn=need[2],
        config=config, check_indices=check_indices,
    )
    if any(need):
        loss, active, mean_pos, mean_neg = _TripletLossFunction.apply(
            anchors, positives, negatives, positive_index, negative_index, weights, opts
        )
    else:
        loss, active, mean_pos, mean_neg, *_ = _launch(
            anchors, positives, negatives, positive_index, negative_index, weights, opts
        )
    return TripletOutput(loss, active, mean_pos, mean_neg)
