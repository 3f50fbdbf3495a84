"""Launch configurations of the fused triplet kernel, and the compile-time constants of one launch.

Free of torch and of triton, so that scripts/kernel_aot_check.py can compile every configuration
crl uses ahead of time for a GPU it does not have (sm_90), under any triton version, in a bare venv.

On CUDA every default configuration is two-pass (statistics over d in BLOCK_D chunks, then the
gradients in a second sweep that mostly hits L2). Compiled for sm_90, the single-pass tiles (a whole
row of d in registers) spill under Triton 3.6: a sliced 3-D layout puts a whole BLOCK_D row in each
thread, 20-82 KB of stack per thread, and ptxas ran for minutes on some. The two-pass tiles below
compile in about a second with no stack under Triton 3.6 and the newest Triton; the AOT check asserts
that for every shape crl uses (d 64-8192, per-row, shared positive, centroid gradient, k negatives,
fp32/bf16/fp16). Single-pass stays available for an explicit KernelConfig (the interpreter, sweeps).
"""

from __future__ import annotations

from dataclasses import dataclass

# The distance codes of crl.losses.distances.DISTANCES, in its order.
DISTANCE_CODES = {"l2": 0, "cosine": 1, "l2_normalized": 2, "mix": 3}
L2_KINDS = ("l2", "mix")
COS_KINDS = ("cosine", "l2_normalized", "mix")


def next_pow2(x: int) -> int:
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


# Per BLOCK_K (k rounded up to a power of two): (BLOCK_D, num_warps). The [BLOCK_R, BLOCK_K, BLOCK_D]
# negatives tile dominates the registers; these keep it at 4-8 fp32 values per thread, measured
# spill-free under Triton 3.6 and 3.9 for sm_90 (scripts/kernel_aot_check.py; 4 warps with BLOCK_D
# 128 at k 16, or 64 at k 64, already spill once every gradient is needed).
_CHUNKS = {1: (256, 4), 2: (256, 4), 4: (128, 4), 8: (128, 4), 16: (32, 4), 32: (32, 8), 64: (16, 8), 128: (16, 8)}
MAX_KERNEL_K = max(_CHUNKS)
"""The most negatives per row the CUDA kernel takes; crl.kernels.dispatch sends more to the reference."""


def default_config(d: int, k: int, shared_positive: bool, shared_negative: bool, *, device_type: str = "cuda") -> KernelConfig:
    """The launch configuration for rows of width d with k negatives each.

    `shared_positive` / `shared_negative`: the positive's / negatives' gradient is scattered into a
    shared buffer (atomics). CUDA: two passes over d in chunks of BLOCK_D columns (see _CHUNKS),
    also when d is narrower than a chunk (the rest is masked: narrower tiles get thread layouts that
    spill). At most two rows per block, since registers grow faster than the tile with BLOCK_R (the
    row statistics are replicated across the threads of a row; under Triton 3.6 four rows of a
    64-wide centroid tile spill, and so do two rows of a 64-wide tile with both gradients scattered).
    Every configuration this returns for d 64-8192 is compiled by scripts/kernel_aot_check.py.
    """
    bk = next_pow2(k)
    if device_type != "cuda":
        bd_full = next_pow2(d)
        # Interpreter: few, large programs are what is fast (each op is one numpy call).
        bd = min(bd_full, 256)
        single = bd >= d
        return KernelConfig(block_r=8 if single else 4, block_d=bd if not single else bd_full, single_pass=single,
                            num_warps=4, programs_per_sm=1)
    if bk > MAX_KERNEL_K:
        raise ValueError(f"k: the fused kernel takes at most {MAX_KERNEL_K} negatives per row, got {k} "
                         "(use the torch backend)")
    chunk, warps = _CHUNKS[bk]
    bd = chunk
    tiles = 2 + bk + (1 if shared_positive else 0) + (bk if shared_negative else 0)
    br = 2 if bd >= 128 and bd * tiles <= 1024 else 1
    return KernelConfig(block_r=br, block_d=bd, single_pass=False, num_warps=warps, programs_per_sm=4)


# Launch configurations that benches/triplet_kernel.py times against the default on a GPU, per case
# ("rows": per-row positives and negatives, d 4096; "centroid_k4": a shared centroid with its
# gradient and k = 4 mined negatives). scripts/kernel_aot_check.py compiles each of them too, so a
# sweep never meets a spilling or slow-compiling configuration on a lent GPU.
SWEEP_CONFIGS: dict[str, tuple[KernelConfig, ...]] = {
    "rows": (KernelConfig(1, 256, False, 4), KernelConfig(2, 128, False, 4), KernelConfig(2, 256, False, 8),
             KernelConfig(1, 512, False, 4), KernelConfig(2, 512, False, 8), KernelConfig(1, 1024, False, 8),
             KernelConfig(2, 256, False, 4, 8)),
    "centroid_k4": (KernelConfig(2, 128, False, 4), KernelConfig(1, 256, False, 4), KernelConfig(1, 64, False, 4),
                    KernelConfig(1, 128, False, 8), KernelConfig(1, 256, False, 8), KernelConfig(1, 128, False, 4, 8)),
}


def kernel_constexprs(
    *,
    d: int,
    k: int,
    distance_positive: str,
    distance_negative: str,
    has_positive_index: bool,
    has_negative_index: bool,
    has_weights: bool,
    need_ga: bool,
    need_gp: bool,
    need_gn: bool,
    per_sample_negatives: bool,
    config: KernelConfig,
) -> dict[str, int | bool]:
    """The constexpr arguments of `triplet_fwd_kernel` for one launch (one compiled variant each)."""
    return dict(
        DIST_P=DISTANCE_CODES[distance_positive], DIST_N=DISTANCE_CODES[distance_negative],
        P_L2=distance_positive in L2_KINDS, P_COS=distance_positive in COS_KINDS,
        N_L2=distance_negative in L2_KINDS, N_COS=distance_negative in COS_KINDS,
        HAS_PIDX=has_positive_index, HAS_NIDX=has_negative_index, HAS_W=has_weights,
        NEED_GA=need_ga, NEED_GP=need_gp, NEED_GN=need_gn,
        GP_ATOMIC=has_positive_index, GN_ATOMIC=per_sample_negatives,
        SINGLE_PASS=config.single_pass,
        BLOCK_R=config.block_r, BLOCK_K=next_pow2(k),
        BLOCK_D=max(config.block_d, next_pow2(d)) if config.single_pass else config.block_d,
    )


__all__ = ["DISTANCE_CODES", "MAX_KERNEL_K", "SWEEP_CONFIGS", "KernelConfig", "default_config", "kernel_constexprs", "next_pow2"]
