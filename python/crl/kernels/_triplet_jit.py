"""Triton kernels of the fused triplet loss (see crl.kernels.triplet for the host side).

This module is loaded by crl.kernels.triplet twice, once compiled (CUDA tensors) and once under
Triton's interpreter (CPU tensors), because `triton.jit` decides between the two when the decorator
runs. Do not import it directly.

Per row r (anchor a, positive p, negatives n_j, j < K), with the statistics of one pass over d
(all in fp32): |a|^2, |p|^2, a.p, |a - p|^2 and the same for every n_j. A distance D(x, y) of either
kind has a gradient that is a per-row linear combination of x, y and (x - y):

    dD/dx = cd (x - y) + fy y + fbx x        dD/dy = -cd (x - y) + fy x + fby y

so the second pass (which writes the gradients) only needs those few per-row scalars.
"""

import triton
import triton.language as tl

# crl.losses.distances.NORM_EPS: norm products below this are clamped (cosine of a zero row is 0).
NORM_EPS = tl.constexpr(1e-8)


@triton.jit
def _distance_terms(xx, yy, xy, dd, mix_weight, KIND: tl.constexpr):
    """Distance and gradient coefficients from row statistics (elementwise, any shape).

    KIND: 0 l2, 1 cosine, 2 l2_normalized, 3 mix. Returns (D, cd, fy, fbx, fby) with
    dD/dx = cd (x - y) + fy y + fbx x and dD/dy = -cd (x - y) + fy x + fby y, matching the autograd
    of crl.losses.distances.pairwise_distance exactly (sqrt subgradient 0 at 0, clamped norm product).
    """
    pos = dd > 0
    l2 = tl.where(pos, tl.sqrt(tl.where(pos, dd, 1.0)), 0.0)
    inv_l2 = tl.where(pos, 1.0 / tl.where(pos, l2, 1.0), 0.0)
    nx = tl.where(xx > 0, tl.sqrt(tl.where(xx > 0, xx, 1.0)), 0.0)
    ny = tl.where(yy > 0, tl.sqrt(tl.where(yy > 0, yy, 1.0)), 0.0)
    q = nx * ny
    unclamped = q >= NORM_EPS
    inv_qc = 1.0 / tl.maximum(q, NORM_EPS)
    cos = xy * inv_qc
    # d cos/dx = y / qc - [q >= eps] * xy * ny / (q^2 nx) * x  (nx, ny > 0 where q >= eps)
    bx = tl.where(unclamped, -(cos * inv_qc) * ny / tl.where(unclamped, nx, 1.0), 0.0)
    by = tl.where(unclamped, -(cos * inv_qc) * nx / tl.where(unclamped, ny, 1.0), 0.0)
    zero = tl.zeros_like(cos)
    if KIND == 0:
        dist = l2
        cd = inv_l2
        f = zero
    elif KIND == 1:
        dist = 1.0 - cos
        cd = zero
        f = zero - 1.0
    elif KIND == 2:
        dist = (1.0 - cos) * 0.5
        cd = zero
        f = zero - 0.5
    else:
        dist = l2 + mix_weight * (1.0 - tl.maximum(cos, 0.0))
        cd = inv_l2
        f = tl.where(cos > 0, zero - mix_weight, zero)
    return dist, cd, f * inv_qc, f * bx, f * by


@triton.jit
def _chunk_stats(a, p, n, P_L2: tl.constexpr, P_COS: tl.constexpr, N_L2: tl.constexpr, N_COS: tl.constexpr):
    """Partial sums over one chunk of d: a [BR, BD], p [BR, BD], n [BR, BK, BD] (fp32)."""
    aa = tl.sum(a * a, 1)
    pp = tl.zeros_like(aa)
    ap = tl.zeros_like(aa)
    dp = tl.zeros_like(aa)
    if P_COS:
        pp = tl.sum(p * p, 1)
        ap = tl.sum(a * p, 1)
    if P_L2:
        dap = a - p
        dp = tl.sum(dap * dap, 1)
    a3 = a[:, None, :]
    nn = tl.sum(n * 0.0, 2)
    an = nn
    dn = nn
    if N_COS:
        nn = tl.sum(n * n, 2)
        an = tl.sum(a3 * n, 2)
    if N_L2:
        dan = a3 - n
        dn = tl.sum(dan * dan, 2)
    return aa, pp, ap, dp, nn, an, dn


@triton.jit
def _chunk_grads(a, p, n, ca, cpd, cpy, gpy, cnd, cny, gny):
    """Gradient tiles of one chunk: anchors [BR, BD], positives [BR, BD], negatives [BR, BK, BD]."""
    dap = a - p
    a3 = a[:, None, :]
    dan = a3 - n
    cnd3 = cnd[:, :, None]
    cny3 = cny[:, :, None]
    ga = ca[:, None] * a + cpd[:, None] * dap + cpy[:, None] * p + tl.sum(cnd3 * dan + cny3 * n, 1)
    gp = cpy[:, None] * a + gpy[:, None] * p - cpd[:, None] * dap
    gn = cny3 * a3 + gny[:, :, None] * n - cnd3 * dan
    return ga, gp, gn


@triton.jit
def triplet_fwd_kernel(
    a_ptr, p_ptr, n_ptr, pidx_ptr, nidx_ptr, w_ptr, scale_ptr,
    ga_ptr, gp_ptr, gn_ptr, part_ptr,
    R, D, K, ITERS,
    stride_a, stride_p, stride_ns, stride_nk,
    stride_ga, stride_gp, stride_gns, stride_gnk,
    margin, mix_weight,
    DIST_P: tl.constexpr, DIST_N: tl.constexpr,
    P_L2: tl.constexpr, P_COS: tl.constexpr, N_L2: tl.constexpr, N_COS: tl.constexpr,
    HAS_PIDX: tl.constexpr, HAS_NIDX: tl.constexpr, HAS_W: tl.constexpr,
    NEED_GA: tl.constexpr, NEED_GP: tl.constexpr, NEED_GN: tl.constexpr,
    GP_ATOMIC: tl.constexpr, GN_ATOMIC: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Loss statistics and (optionally) gradients of ITERS consecutive blocks of BLOCK_R rows.

    Program `pid` owns row blocks [pid * ITERS, (pid + 1) * ITERS). Outputs:
    - part_ptr[pid, 0:4]: sum_r w_r row_loss_r, sum_r w_r active_r, sum_r w_r D_p, sum_r w_r mean_j D_n;
    - ga (anchors' dtype): dL/da per row, already multiplied by the reduction weight;
    - gp / gn: per row (stored in their dtype), or, when GP_ATOMIC / GN_ATOMIC (shared positives
      [P, d] / per-sample negatives [S, k, d]), atomically added into fp32 buffers of that shape.
    SINGLE_PASS (BLOCK_D >= D): rows stay in registers between the statistics and the gradients,
    and shared gradients are summed in registers over runs of rows with the same index, flushed with
    one atomic add per run. Otherwise two passes over d in BLOCK_D chunks; shared gradients are
    summed over the block's rows when they all use the same index (one atomic per block).
    """
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    kmask = offs_k < K
    inv_k = 1.0 / K
    scale = tl.load(scale_ptr).to(tl.float32)

    acc_loss = tl.zeros([BLOCK_R], tl.float32)
    acc_act = tl.zeros([BLOCK_R], tl.float32)
    acc_dp = tl.zeros([BLOCK_R], tl.float32)
    acc_dn = tl.zeros([BLOCK_R], tl.float32)
    # Register accumulators for shared gradients (SINGLE_PASS): the run of rows with index cur_*.
    acc_gp = tl.zeros([BLOCK_D], tl.float32)
    acc_gn = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    cur_p = (pid * 0 - 1).to(tl.int64)
    cur_n = (pid * 0 - 1).to(tl.int64)
    dmask1 = offs_d < D
    gn_tile = gn_ptr + offs_k[:, None] * stride_gnk + offs_d[None, :]

    for it in range(0, ITERS):
        rows = (pid * ITERS + it) * BLOCK_R + offs_r
        rmask = rows < R
        rows64 = rows.to(tl.int64)
        if HAS_PIDX:
            pi = tl.load(pidx_ptr + rows64, mask=rmask, other=0).to(tl.int64)
        else:
            pi = rows64
        if HAS_NIDX:
            ni = tl.load(nidx_ptr + rows64, mask=rmask, other=0).to(tl.int64)
        else:
            ni = rows64
        if HAS_W:
            w = tl.load(w_ptr + rows64, mask=rmask, other=0.0).to(tl.float32)
        else:
            w = rmask.to(tl.float32)
        m2 = rmask[:, None]
        m3 = rmask[:, None, None] & kmask[None, :, None]
        a_rows = a_ptr + rows64[:, None] * stride_a
        p_rows = p_ptr + pi[:, None] * stride_p
        n_rows = n_ptr + ni[:, None, None] * stride_ns + offs_k[None, :, None] * stride_nk

        # ---- pass 1: statistics in fp32
        if SINGLE_PASS:
            a = tl.load(a_rows + offs_d[None, :], mask=m2 & (offs_d < D)[None, :], other=0.0).to(tl.float32)
            p = tl.load(p_rows + offs_d[None, :], mask=m2 & (offs_d < D)[None, :], other=0.0).to(tl.float32)
            n = tl.load(n_rows + offs_d[None, None, :], mask=m3 & (offs_d < D)[None, None, :], other=0.0).to(
                tl.float32
            )
            aa, pp, ap, dp, nn, an, dn = _chunk_stats(a, p, n, P_L2, P_COS, N_L2, N_COS)
        else:
            aa = tl.zeros([BLOCK_R], tl.float32)
            pp = tl.zeros([BLOCK_R], tl.float32)
            ap = tl.zeros([BLOCK_R], tl.float32)
            dp = tl.zeros([BLOCK_R], tl.float32)
            nn = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
            an = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
            dn = tl.zeros([BLOCK_R, BLOCK_K], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + offs_d
                dm = (cols < D)[None, :]
                a = tl.load(a_rows + cols[None, :], mask=m2 & dm, other=0.0).to(tl.float32)
                p = tl.load(p_rows + cols[None, :], mask=m2 & dm, other=0.0).to(tl.float32)
                n = tl.load(n_rows + cols[None, None, :], mask=m3 & (cols < D)[None, None, :], other=0.0).to(
                    tl.float32
                )
                s_aa, s_pp, s_ap, s_dp, s_nn, s_an, s_dn = _chunk_stats(a, p, n, P_L2, P_COS, N_L2, N_COS)
                aa += s_aa
                pp += s_pp
                ap += s_ap
                dp += s_dp
                nn += s_nn
                an += s_an
                dn += s_dn

        # ---- distances, hinge, per-row loss
        d_pos, cdp, fyp, fbxp, fbyp = _distance_terms(aa, pp, ap, dp, mix_weight, DIST_P)
        d_neg, cdn, fyn, fbxn, fbyn = _distance_terms(aa[:, None], nn, an, dn, mix_weight, DIST_N)
        h = d_pos[:, None] - d_neg + margin
        active = (h > 0) & kmask[None, :]
        actf = active.to(tl.float32)
        n_active = tl.sum(actf, 1)
        # A NaN hinge is not active (as in the reference) but must reach the loss: a finite loss over
        # NaN gradients would hide the failure from the training loop's check.
        acc_loss += w * (tl.sum(tl.where(active | ((h != h) & kmask[None, :]), h, 0.0), 1) * inv_k)
        acc_act += w * (n_active * inv_k)
        acc_dp += w * d_pos
        acc_dn += w * (tl.sum(tl.where(kmask[None, :], d_neg, 0.0), 1) * inv_k)

        # ---- pass 2: gradients, already multiplied by the reduction weight
        if NEED_GA or NEED_GP or NEED_GN:
            coef = w * scale * inv_k
            g_pos = coef * n_active  # dL/dD_p
            g_neg = -coef[:, None] * actf  # dL/dD_n
            ca = g_pos * fbxp + tl.sum(g_neg * fbxn, 1)
            cpd = g_pos * cdp
            cpy = g_pos * fyp
            gpy = g_pos * fbyp
            cnd = g_neg * cdn
            cny = g_neg * fyn
            gny = g_neg * fbyn
            if GP_ATOMIC:
                p_lo = tl.min(tl.where(rmask, pi, 2**62), 0)
                p_hi = tl.max(tl.where(rmask, pi, -1), 0)
            if GN_ATOMIC:
                n_lo = tl.min(tl.where(rmask, ni, 2**62), 0)
                n_hi = tl.max(tl.where(rmask, ni, -1), 0)
            if SINGLE_PASS:
                ga, gp, gn = _chunk_grads(a, p, n, ca, cpd, cpy, gpy, cnd, cny, gny)
                dm2 = m2 & (offs_d < D)[None, :]
                if NEED_GA:
                    tl.store(ga_ptr + rows64[:, None] * stride_ga + offs_d[None, :],
                             ga.to(ga_ptr.dtype.element_ty), mask=dm2)
                if NEED_GP:
                    if GP_ATOMIC:
                        if p_lo == p_hi:
                            if p_lo != cur_p:
                                tl.atomic_add(gp_ptr + cur_p * stride_gp + offs_d, acc_gp,
                                              mask=offs_d < tl.where(cur_p >= 0, D, 0), sem="relaxed")
                                acc_gp = tl.sum(gp, 0)
                                cur_p = p_lo
                            else:
                                acc_gp += tl.sum(gp, 0)
                        else:
                            tl.atomic_add(gp_ptr + pi[:, None] * stride_gp + offs_d[None, :], gp, mask=dm2,
                                          sem="relaxed")
                    else:
                        tl.store(gp_ptr + rows64[:, None] * stride_gp + offs_d[None, :],
                                 gp.to(gp_ptr.dtype.element_ty), mask=dm2)
                if NEED_GN:
                    dm3 = m3 & (offs_d < D)[None, None, :]
                    gn_rows = gn_ptr + ni[:, None, None] * stride_gns + offs_k[None, :, None] * stride_gnk
                    if GN_ATOMIC:
                        if n_lo == n_hi:
                            if n_lo != cur_n:
                                tl.atomic_add(gn_tile + cur_n * stride_gns, acc_gn,
                                              mask=(offs_k < tl.where(cur_n >= 0, K, 0))[:, None]
                                              & dmask1[None, :], sem="relaxed")
                                acc_gn = tl.sum(gn, 0)
                                cur_n = n_lo
                            else:
                                acc_gn += tl.sum(gn, 0)
                        else:
                            tl.atomic_add(gn_rows + offs_d[None, None, :], gn, mask=dm3, sem="relaxed")
                    else:
                        tl.store(gn_rows + offs_d[None, None, :], gn.to(gn_ptr.dtype.element_ty), mask=dm3)
            else:
                for d0 in range(0, D, BLOCK_D):
                    cols = d0 + offs_d
                    cm = cols < D
                    dm2 = m2 & cm[None, :]
                    dm3 = m3 & cm[None, None, :]
                    a = tl.load(a_rows + cols[None, :], mask=dm2, other=0.0).to(tl.float32)
                    p = tl.load(p_rows + cols[None, :], mask=dm2, other=0.0).to(tl.float32)
                    n = tl.load(n_rows + cols[None, None, :], mask=dm3, other=0.0).to(tl.float32)
                    ga, gp, gn = _chunk_grads(a, p, n, ca, cpd, cpy, gpy, cnd, cny, gny)
                    if NEED_GA:
                        tl.store(ga_ptr + rows64[:, None] * stride_ga + cols[None, :],
                                 ga.to(ga_ptr.dtype.element_ty), mask=dm2)
                    if NEED_GP:
                        if GP_ATOMIC:
                            if p_lo == p_hi:
                                tl.atomic_add(gp_ptr + p_lo * stride_gp + cols, tl.sum(gp, 0), mask=cm,
                                              sem="relaxed")
                            else:
                                tl.atomic_add(gp_ptr + pi[:, None] * stride_gp + cols[None, :], gp, mask=dm2,
                                              sem="relaxed")
                        else:
                            tl.store(gp_ptr + rows64[:, None] * stride_gp + cols[None, :],
                                     gp.to(gp_ptr.dtype.element_ty), mask=dm2)
                    if NEED_GN:
                        gn_rows = gn_ptr + ni[:, None, None] * stride_gns + offs_k[None, :, None] * stride_gnk
                        if GN_ATOMIC:
                            if n_lo == n_hi:
                                tl.atomic_add(gn_tile + n_lo * stride_gns + d0, tl.sum(gn, 0),
                                              mask=kmask[:, None] & cm[None, :], sem="relaxed")
                            else:
                                tl.atomic_add(gn_rows + cols[None, None, :], gn, mask=dm3, sem="relaxed")
                        else:
                            tl.store(gn_rows + cols[None, None, :], gn.to(gn_ptr.dtype.element_ty), mask=dm3)

    if SINGLE_PASS:
        if NEED_GP:
            if GP_ATOMIC:
                tl.atomic_add(gp_ptr + cur_p * stride_gp + offs_d, acc_gp,
                              mask=offs_d < tl.where(cur_p >= 0, D, 0), sem="relaxed")
        if NEED_GN:
            if GN_ATOMIC:
                tl.atomic_add(gn_tile + cur_n * stride_gns, acc_gn,
                              mask=(offs_k < tl.where(cur_n >= 0, K, 0))[:, None] & dmask1[None, :], sem="relaxed")

    tl.store(part_ptr + pid * 4 + 0, tl.sum(acc_loss, 0))
    tl.store(part_ptr + pid * 4 + 1, tl.sum(acc_act, 0))
    tl.store(part_ptr + pid * 4 + 2, tl.sum(acc_dp, 0))
    tl.store(part_ptr + pid * 4 + 3, tl.sum(acc_dn, 0))
