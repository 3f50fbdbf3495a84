//! Micro-block packing and micro-kernels for every SIMD path.
//!
//! Layouts (all pieces are 64 bytes):
//! * fp32 micro-block: `[dp/16][R][16]`, query panel `[dp][L]`;
//! * bf16 pair micro-block: `[dp/32][R][32]`, query panel `[dp/2][L][2]`.
//!
//! A kernel computes `out[r * L + lane] = sum_c block[r][c] * panel[c][lane]` for the `R x L` tile.

use crate::{Elems, Geometry, Job, Metric, Packed, Simd, PIECE_BF16, PIECE_F32};

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct A64([u8; 64]);

/// A zero-initialised, 64-byte aligned buffer of `f32` or `u16`.
pub(crate) struct AVec<T: Copy> {
    raw: Vec<A64>,
    len: usize,
    _p: std::marker::PhantomData<T>,
}

impl<T: Copy> AVec<T> {
    /// Only for plain-old-data `T` whose all-zero bit pattern is valid (f32, u16).
    pub fn zeroed(len: usize) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        AVec { raw: vec![A64([0; 64]); bytes.div_ceil(64)], len, _p: std::marker::PhantomData }
    }
    pub fn as_slice(&self) -> &[T] {
        unsafe { std::slice::from_raw_parts(self.raw.as_ptr() as *const T, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.raw.as_mut_ptr() as *mut T, self.len) }
    }
}

// ---------------------------------------------------------------------------------------------
// packing of one bank micro-block (with the row sums of squares where the metric needs them)

#[inline(always)]
fn pack_generic(
    src: Elems,
    d: usize,
    rb: usize,
    nrows: usize,
    r: usize,
    pairs: bool,
    buf_f32: &mut [f32],
    buf_bf16: &mut [u16],
    sumsq: &mut [f32],
    need_norm: bool,
) {
    for rr in 0..nrows {
        let row0 = (rb + rr) * d;
        let mut acc = [0f32; 16];
        match (src, pairs) {
            (Elems::F32(s), _) => {
                let row = &s[row0..row0 + d];
                let full = d / PIECE_F32;
                for kb in 0..full {
                    let sp: &[f32; 16] = row[kb * 16..kb * 16 + 16].try_into().unwrap();
                    let dst: &mut [f32; 16] = (&mut buf_f32[(kb * r + rr) * 16..(kb * r + rr) * 16 + 16]).try_into().unwrap();
                    *dst = *sp;
                    if need_norm {
                        for t in 0..16 {
                            acc[t] += sp[t] * sp[t];
                        }
                    }
                }
                if full * 16 < d {
                    let dst = &mut buf_f32[(full * r + rr) * 16..(full * r + rr) * 16 + 16];
                    for t in 0..16 {
                        let c = full * 16 + t;
                        let v = if c < d { row[c] } else { 0.0 };
                        dst[t] = v;
                        acc[t] += v * v;
                    }
                }
            }
            (Elems::Bf16(s), false) => {
                let row = &s[row0..row0 + d];
                let full = d / PIECE_F32;
                for kb in 0..full {
                    let sp: &[u16; 16] = row[kb * 16..kb * 16 + 16].try_into().unwrap();
                    let dst: &mut [f32; 16] = (&mut buf_f32[(kb * r + rr) * 16..(kb * r + rr) * 16 + 16]).try_into().unwrap();
                    for t in 0..16 {
                        dst[t] = f32::from_bits((sp[t] as u32) << 16);
                    }
                    if need_norm {
                        for t in 0..16 {
                            acc[t] += dst[t] * dst[t];
                        }
                    }
                }
                if full * 16 < d {
                    let dst = &mut buf_f32[(full * r + rr) * 16..(full * r + rr) * 16 + 16];
                    for t in 0..16 {
                        let c = full * 16 + t;
                        let v = if c < d { f32::from_bits((row[c] as u32) << 16) } else { 0.0 };
                        dst[t] = v;
                        acc[t] += v * v;
                    }
                }
            }
            (Elems::Bf16(s), true) => {
                let row = &s[row0..row0 + d];
                let full = d / PIECE_BF16;
                for kb in 0..full {
                    let sp: &[u16; 32] = row[kb * 32..kb * 32 + 32].try_into().unwrap();
                    let dst: &mut [u16; 32] = (&mut buf_bf16[(kb * r + rr) * 32..(kb * r + rr) * 32 + 32]).try_into().unwrap();
                    *dst = *sp;
                    if need_norm {
                        for t in 0..16 {
                            let a = f32::from_bits((sp[2 * t] as u32) << 16);
                            let b = f32::from_bits((sp[2 * t + 1] as u32) << 16);
                            acc[t] += a * a + b * b;
                        }
                    }
                }
                if full * 32 < d {
                    let dst = &mut buf_bf16[(full * r + rr) * 32..(full * r + rr) * 32 + 32];
                    for t in 0..32 {
                        let c = full * 32 + t;
                        let v = if c < d { row[c] } else { 0 };
                        dst[t] = v;
                        let f = f32::from_bits((v as u32) << 16);
                        acc[t / 2] += f * f;
                    }
                }
            }
        }
        if need_norm {
            sumsq[rr] = acc.iter().sum();
        } else {
            sumsq[rr] = 0.0;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn pack_avx512(
    src: Elems, d: usize, rb: usize, nrows: usize, r: usize, pairs: bool,
    bf: &mut [f32], bb: &mut [u16], ss: &mut [f32], nn: bool,
) {
    if pairs {
        pack_generic(src, d, rb, nrows, r, pairs, bf, bb, ss, nn)
    } else {
        pack_f32_avx512(src, d, rb, nrows, r, bf, ss, nn)
    }
}

/// fp32 micro-block `[dp/16][R][16]` from fp32 or bf16 rows (widened), with explicit AVX-512: the
/// compiler's version of `pack_generic` widened bf16 at about one element per cycle, and with one
/// query panel (Q <= 32) packing took longer than the multiply. Depth-major order, so that the
/// block is written front to back; the row sums of squares are added lane by lane in the generic
/// version's order (bit-identical norms).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn pack_f32_avx512(src: Elems, d: usize, rb: usize, nrows: usize, r: usize, bf: &mut [f32], ss: &mut [f32], nn: bool) {
    use std::arch::x86_64::*;
    // one accumulator per row: every AVX-512 geometry has at most 16 rows
    let mut acc = [_mm512_setzero_ps(); 16];
    let dp = d.div_ceil(PIECE_F32) * PIECE_F32;
    assert!(bf.len() >= dp * r && ss.len() >= nrows && nrows <= r && nrows <= acc.len());
    assert!(src.len() >= (rb + nrows) * d);
    let full = d / PIECE_F32;
    let tail = d - full * PIECE_F32;
    let dst = bf.as_mut_ptr();
    for kb in 0..full + (tail > 0) as usize {
        let n = if kb < full { PIECE_F32 } else { tail };
        // n < 16: the row's last piece, zero past its end
        let m = if n >= 16 { 0xffffu16 } else { ((1u32 << n) - 1) as u16 };
        for rr in 0..nrows {
            let at = (rb + rr) * d + kb * PIECE_F32;
            let v = match src {
                Elems::F32(s) => _mm512_maskz_loadu_ps(m, s.as_ptr().add(at)),
                Elems::Bf16(s) => dot::widen512(m, s.as_ptr().add(at)),
            };
            _mm512_store_ps(dst.add((kb * r + rr) * PIECE_F32), v);
            if nn {
                acc[rr] = _mm512_add_ps(acc[rr], _mm512_mul_ps(v, v));
            }
        }
    }
    for rr in 0..nrows {
        ss[rr] = 0.0;
        if nn {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[rr]);
            ss[rr] = lanes.iter().sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_avx2(
    src: Elems, d: usize, rb: usize, nrows: usize, r: usize, pairs: bool,
    bf: &mut [f32], bb: &mut [u16], ss: &mut [f32], nn: bool,
) {
    pack_generic(src, d, rb, nrows, r, pairs, bf, bb, ss, nn)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_block(
    simd: Simd,
    g: Geometry,
    j: &Job,
    rb: usize,
    nrows: usize,
    _dp: usize,
    buf_f32: &mut [f32],
    buf_bf16: &mut [u16],
    sumsq: &mut [f32],
    need_norm: bool,
) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx512Bf16 => unsafe {
            pack_avx512(j.bank, j.d, rb, nrows, g.rows, g.bf16_pairs, buf_f32, buf_bf16, sumsq, need_norm)
        },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe {
            pack_avx2(j.bank, j.d, rb, nrows, g.rows, g.bf16_pairs, buf_f32, buf_bf16, sumsq, need_norm)
        },
        _ => pack_generic(j.bank, j.d, rb, nrows, g.rows, g.bf16_pairs, buf_f32, buf_bf16, sumsq, need_norm),
    }
}

// ---------------------------------------------------------------------------------------------
// micro-kernels

/// Portable fallback: 4 rows x 8 lanes.
fn kernel_scalar(bp: &[f32], qp: &[f32], dp: usize, out: &mut [f32]) {
    const R: usize = 4;
    const L: usize = 8;
    let mut acc = [[0f32; L]; R];
    for kb in 0..dp / 16 {
        let b = &bp[kb * R * 16..(kb + 1) * R * 16];
        for kk in 0..16 {
            let qv: &[f32; L] = qp[(kb * 16 + kk) * L..(kb * 16 + kk + 1) * L].try_into().unwrap();
            for r in 0..R {
                let bv = b[r * 16 + kk];
                for t in 0..L {
                    acc[r][t] += bv * qv[t];
                }
            }
        }
    }
    for r in 0..R {
        out[r * L..(r + 1) * L].copy_from_slice(&acc[r]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::Metric;
    use std::arch::x86_64::*;

    /// Software prefetch (into L2) of the next bank micro-block, one 64-byte line per row per
    /// step of the kernel's outer loop, so that its memory reads overlap the current tile's math.
    #[derive(Clone, Copy)]
    pub struct Pf {
        pub base: *const u8,
        pub stride: usize,
        pub rows: usize,
        pub bytes: usize,
    }

    impl Pf {
        pub const NONE: Pf = Pf { base: std::ptr::null(), stride: 0, rows: 0, bytes: 0 };
        #[inline(always)]
        pub unsafe fn fetch(&self, kb: usize) {
            if !self.base.is_null() {
                // the kernel walks 64-byte pieces; a row of `bytes` has bytes/64 lines
                let off = kb * 64;
                if off < self.bytes {
                    for r in 0..self.rows {
                        _mm_prefetch::<_MM_HINT_T1>(self.base.wrapping_add(r * self.stride + off) as *const i8);
                    }
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn candidates512(raw: *const f32, l: usize, thr: *const f32, qn: *const f32, metric: Metric,
                                binv: f32, bn: f32) -> u64 {
        let mut mask = 0u64;
        for v in 0..l / 16 {
            let x = _mm512_loadu_ps(raw.add(16 * v));
            let g = match metric {
                Metric::Ip => x,
                Metric::Cosine => _mm512_mul_ps(_mm512_mul_ps(x, _mm512_loadu_ps(qn.add(16 * v))), _mm512_set1_ps(binv)),
                Metric::L2 => {
                    let dist = _mm512_add_ps(_mm512_sub_ps(_mm512_loadu_ps(qn.add(16 * v)), _mm512_mul_ps(_mm512_set1_ps(2.0), x)),
                                             _mm512_set1_ps(bn));
                    _mm512_sub_ps(_mm512_setzero_ps(), _mm512_max_ps(dist, _mm512_setzero_ps()))
                }
            };
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(g, _mm512_loadu_ps(thr.add(16 * v)));
            let d = _mm512_sub_ps(x, x); // NaN exactly where x is not finite
            let odd = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(d, d);
            mask |= ((keep | odd) as u64) << (16 * v);
        }
        mask
    }

    /// AVX-512 fp32: R rows x V zmm of queries.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn k512<const V: usize, const R: usize>(bp: *const f32, qp: *const f32, dp: usize, out: *mut f32, pf: Pf) {
        let l = 16 * V;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut qv = [_mm512_setzero_ps(); V];
        for kb in 0..dp / 16 {
            pf.fetch(kb);
            let b = bp.add(kb * R * 16);
            let q = qp.add(kb * 16 * l);
            // pull the next depth block's query lines (and bank lines) from L2 into L1 one block
            // ahead, so the micro-kernel's loads hit L1 (past the end is harmless: a hint)
            let qn = q.wrapping_add(16 * l) as *const i8;
            let bn = b.wrapping_add(R * 16) as *const i8;
            for kk in 0..16 {
                for v in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(qn.wrapping_add((kk * l + v * 16) * 4));
                }
                if kk < R {
                    _mm_prefetch::<_MM_HINT_T0>(bn.wrapping_add(kk * 64));
                }
                for v in 0..V {
                    qv[v] = _mm512_load_ps(q.add(kk * l + v * 16));
                }
                for r in 0..R {
                    let bb = _mm512_set1_ps(*b.add(r * 16 + kk));
                    for v in 0..V {
                        acc[r][v] = _mm512_fmadd_ps(bb, qv[v], acc[r][v]);
                    }
                }
            }
        }
        for r in 0..R {
            for v in 0..V {
                _mm512_storeu_ps(out.add(r * l + v * 16), acc[r][v]);
            }
        }
    }

    /// AVX-512 BF16: R rows x V zmm of queries, `vdpbf16ps` on bf16 pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn k512bf16<const V: usize, const R: usize>(bp: *const u16, qp: *const u16, dp: usize, out: *mut f32, pf: Pf) {
        let l = 16 * V;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut qv = [_mm512_setzero_si512(); V];
        for kb in 0..dp / 32 {
            pf.fetch(kb);
            let b = bp.add(kb * R * 32);
            let q = qp.add(kb * 16 * l * 2);
            for kk in 0..16 {
                for v in 0..V {
                    qv[v] = _mm512_load_si512(q.add((kk * l + v * 16) * 2) as *const _);
                }
                for r in 0..R {
                    let pair = (b.add(r * 32 + 2 * kk) as *const i32).read_unaligned();
                    let bb: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    for v in 0..V {
                        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], std::mem::transmute::<__m512i, __m512bh>(qv[v]), bb);
                    }
                }
            }
        }
        for r in 0..R {
            for v in 0..V {
                _mm512_storeu_ps(out.add(r * l + v * 16), acc[r][v]);
            }
        }
    }

    /// AVX2 + FMA fp32: R rows x V ymm of queries.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn k256<const V: usize, const R: usize>(bp: *const f32, qp: *const f32, dp: usize, out: *mut f32, pf: Pf) {
        let l = 8 * V;
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        let mut qv = [_mm256_setzero_ps(); V];
        for kb in 0..dp / 16 {
            pf.fetch(kb);
            let b = bp.add(kb * R * 16);
            let q = qp.add(kb * 16 * l);
            for kk in 0..16 {
                for v in 0..V {
                    qv[v] = _mm256_load_ps(q.add(kk * l + v * 8));
                }
                for r in 0..R {
                    let bb = _mm256_set1_ps(*b.add(r * 16 + kk));
                    for v in 0..V {
                        acc[r][v] = _mm256_fmadd_ps(bb, qv[v], acc[r][v]);
                    }
                }
            }
        }
        for r in 0..R {
            for v in 0..V {
                _mm256_storeu_ps(out.add(r * l + v * 8), acc[r][v]);
            }
        }
    }
}

/// Run the micro-kernel of `simd` for query panel `p` against the packed micro-block.
pub(crate) fn run_kernel(
    simd: Simd,
    g: Geometry,
    pk: &Packed,
    p: usize,
    buf_f32: &[f32],
    buf_bf16: &[u16],
    out: &mut [f32],
    next: Option<(&Job, usize, usize)>,
) {
    let dp = pk.dp;
    let l = g.lanes;
    let r = g.rows;
    assert!(out.len() >= r * l);
    #[cfg(target_arch = "x86_64")]
    let pf = match next {
        Some((j, row, nrows)) => {
            let (base, es) = match j.bank {
                Elems::F32(s) => (s[row * j.d..].as_ptr() as *const u8, 4),
                Elems::Bf16(s) => (s[row * j.d..].as_ptr() as *const u8, 2),
            };
            // each step of the kernel's outer loop consumes <= 64 bytes of every row (16 f32, 32 bf16
            // pairs, or 16 widened bf16), so one line per row per step covers the next block in time
            let row_bytes = j.d * es;
            x86::Pf { base, stride: row_bytes, rows: nrows, bytes: row_bytes }
        }
        None => x86::Pf::NONE,
    };
    if g.bf16_pairs {
        let qp = &pk.bf16.as_slice()[p * dp * l..(p + 1) * dp * l];
        assert!(buf_bf16.len() >= dp * r);
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match l {
                16 => x86::k512bf16::<1, 16>(buf_bf16.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr(), pf),
                32 => x86::k512bf16::<2, 12>(buf_bf16.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr(), pf),
                _ => unreachable!(),
            }
        }
        return;
    }
    let qp = &pk.f32.as_slice()[p * dp * l..(p + 1) * dp * l];
    assert!(buf_f32.len() >= dp * r);
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx512Bf16 => unsafe {
            match (l, r) {
                (16, 16) => x86::k512::<1, 16>(buf_f32.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr(), pf),
                (32, 12) => x86::k512::<2, 12>(buf_f32.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr(), pf),
                _ => unreachable!(),
            }
        },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe {
            match (l, r) {
                (8, 12) => x86::k256::<1, 12>(buf_f32.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr(), pf),
                (16, 6) => x86::k256::<2, 6>(buf_f32.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr(), pf),
                _ => unreachable!(),
            }
        },
        _ => {
            let _ = next;
            kernel_scalar(buf_f32, qp, dp, out)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// streaming dot-product kernels for few queries: bank rows read in place (no packing), each row
// dotted against up to 4 queries at a time, sums of squares of the rows fused in the same pass.

#[cfg(target_arch = "x86_64")]
mod dot {
    use std::arch::x86_64::*;

    /// Software prefetch distance (bytes ahead on each streamed bank row).
    const PF_AHEAD: usize = 2048;

    /// out[r * DOT_MAX_Q + q] = <row r, query q>, for R rows and QG queries; optional row sums of squares.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn f32_512<const QG: usize, const R: usize>(
        rows: [*const f32; R], qs: [*const f32; QG], d: usize, out: *mut f32, ss: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); QG]; R];
        let mut nrm = [_mm512_setzero_ps(); R];
        let full = d / 16;
        let tail = d % 16;
        let norm = !ss.is_null();
        for c in 0..full + (tail > 0) as usize {
            let m: __mmask16 = if c < full { 0xffff } else { ((1u32 << tail) - 1) as u16 };
            let mut qv = [_mm512_setzero_ps(); QG];
            for q in 0..QG {
                qv[q] = _mm512_maskz_loadu_ps(m, qs[q].add(c * 16));
            }
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(rows[r].wrapping_add(c * 16 + PF_AHEAD / 4) as *const i8);
                let b = _mm512_maskz_loadu_ps(m, rows[r].add(c * 16));
                for q in 0..QG {
                    acc[r][q] = _mm512_fmadd_ps(b, qv[q], acc[r][q]);
                }
                if norm {
                    nrm[r] = _mm512_fmadd_ps(b, b, nrm[r]);
                }
            }
        }
        for r in 0..R {
            for q in 0..QG {
                *out.add(r * crate::DOT_MAX_Q + q) = _mm512_reduce_add_ps(acc[r][q]);
            }
            if norm {
                *ss.add(r) = _mm512_reduce_add_ps(nrm[r]);
            }
        }
    }

    /// The `m` lanes of 16 bf16 at `p`, widened to fp32 (zero elsewhere).
    #[inline(always)]
    pub(crate) unsafe fn widen512(m: __mmask16, p: *const u16) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// bf16 widened to fp32 (AVX-512 without BF16).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn bf16w_512<const QG: usize, const R: usize>(
        rows: [*const u16; R], qs: [*const u16; QG], d: usize, out: *mut f32, ss: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); QG]; R];
        let mut nrm = [_mm512_setzero_ps(); R];
        let full = d / 16;
        let tail = d % 16;
        let norm = !ss.is_null();
        for c in 0..full + (tail > 0) as usize {
            let m: __mmask16 = if c < full { 0xffff } else { ((1u32 << tail) - 1) as u16 };
            let mut qv = [_mm512_setzero_ps(); QG];
            for q in 0..QG {
                qv[q] = widen512(m, qs[q].add(c * 16));
            }
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(rows[r].wrapping_add(c * 16 + PF_AHEAD / 2) as *const i8);
                let b = widen512(m, rows[r].add(c * 16));
                for q in 0..QG {
                    acc[r][q] = _mm512_fmadd_ps(b, qv[q], acc[r][q]);
                }
                if norm {
                    nrm[r] = _mm512_fmadd_ps(b, b, nrm[r]);
                }
            }
        }
        for r in 0..R {
            for q in 0..QG {
                *out.add(r * crate::DOT_MAX_Q + q) = _mm512_reduce_add_ps(acc[r][q]);
            }
            if norm {
                *ss.add(r) = _mm512_reduce_add_ps(nrm[r]);
            }
        }
    }

    /// bf16 pairs with vdpbf16ps (rows and queries are both row-major, so pairs line up).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn bf16dp_512<const QG: usize, const R: usize>(
        rows: [*const u16; R], qs: [*const u16; QG], d: usize, out: *mut f32, ss: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); QG]; R];
        let mut nrm = [_mm512_setzero_ps(); R];
        let full = d / 32;
        let tail = d % 32;
        let norm = !ss.is_null();
        for c in 0..full + (tail > 0) as usize {
            let m: __mmask32 = if c < full { u32::MAX } else { (1u32 << tail) - 1 };
            let mut qv = [_mm512_setzero_si512(); QG];
            for q in 0..QG {
                qv[q] = _mm512_maskz_loadu_epi16(m, qs[q].add(c * 32) as *const i16);
            }
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(rows[r].wrapping_add(c * 32 + PF_AHEAD / 2) as *const i8);
                let b: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi16(m, rows[r].add(c * 32) as *const i16));
                for q in 0..QG {
                    acc[r][q] = _mm512_dpbf16_ps(acc[r][q], b, std::mem::transmute::<__m512i, __m512bh>(qv[q]));
                }
                if norm {
                    nrm[r] = _mm512_dpbf16_ps(nrm[r], b, b);
                }
            }
        }
        for r in 0..R {
            for q in 0..QG {
                *out.add(r * crate::DOT_MAX_Q + q) = _mm512_reduce_add_ps(acc[r][q]);
            }
            if norm {
                *ss.add(r) = _mm512_reduce_add_ps(nrm[r]);
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn ld_f32(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[inline(always)]
    unsafe fn ld_bf16(p: *const u16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    macro_rules! avx2_dot {
        ($name:ident, $t:ty, $ld:ident, $conv:expr) => {
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $name<const QG: usize, const R: usize>(
                rows: [*const $t; R], qs: [*const $t; QG], d: usize, out: *mut f32, ss: *mut f32,
            ) {
                let mut acc = [[_mm256_setzero_ps(); QG]; R];
                let mut nrm = [_mm256_setzero_ps(); R];
                let full = d / 8;
                let norm = !ss.is_null();
                for c in 0..full {
                    let mut qv = [_mm256_setzero_ps(); QG];
                    for q in 0..QG {
                        qv[q] = $ld(qs[q].add(c * 8));
                    }
                    for r in 0..R {
                        let b = $ld(rows[r].add(c * 8));
                        for q in 0..QG {
                            acc[r][q] = _mm256_fmadd_ps(b, qv[q], acc[r][q]);
                        }
                        if norm {
                            nrm[r] = _mm256_fmadd_ps(b, b, nrm[r]);
                        }
                    }
                }
                let conv = $conv;
                for r in 0..R {
                    let mut tn = 0f32;
                    for c in full * 8..d {
                        let b: f32 = conv(*rows[r].add(c));
                        tn += b * b;
                    }
                    for q in 0..QG {
                        let mut t = 0f32;
                        for c in full * 8..d {
                            t += conv(*rows[r].add(c)) * conv(*qs[q].add(c));
                        }
                        *out.add(r * crate::DOT_MAX_Q + q) = hsum256(acc[r][q]) + t;
                    }
                    if norm {
                        *ss.add(r) = hsum256(nrm[r]) + tn;
                    }
                }
            }
        };
    }
    avx2_dot!(f32_256, f32, ld_f32, |x: f32| x);
    avx2_dot!(bf16_256, u16, ld_bf16, |x: u16| f32::from_bits((x as u32) << 16));
}

/// Streaming path: scores of rows [rb, rb + nrows) against every query (<= 8) into
/// `out[r * DOT_MAX_Q + q]`, and the rows' sums of squares into `sumsq` when `need_norm`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_dot(simd: Simd, g: Geometry, j: &Job, rb: usize, nrows: usize, out: &mut [f32], sumsq: &mut [f32], need_norm: bool) {
    const R: usize = 4;
    assert!(g.rows == R && nrows >= 1 && nrows <= R && j.q <= crate::DOT_MAX_Q && out.len() >= R * crate::DOT_MAX_Q && sumsq.len() >= R);
    assert!(rb + nrows <= j.n);
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let d = j.d;
        // rows past the end repeat the last valid row (their results are ignored)
        let rowi = |r: usize| (rb + r.min(nrows - 1)) * d;
        // up to 4 queries: 4 rows x q accumulators; 5..16 queries: 2 rows x (<= 8 queries) at a
        // time (the second query group re-reads the two rows from L1)
        let (halves, hr) = if j.q <= 4 { (1, 4) } else { (2, 2) };
        let groups: &[(usize, usize)] = if j.q <= 8 { &[(0, 8)] } else { &[(0, 8), (8, 16)] };
        for h in 0..halves {
          for &(g0, g1) in groups {
            let r0 = h * hr;
            let ss = if need_norm && g0 == 0 { sumsq.as_mut_ptr().add(r0) } else { std::ptr::null_mut() };
            let o = out.as_mut_ptr().add(r0 * crate::DOT_MAX_Q + g0);
            let nq = j.q.min(g1) - g0;
            macro_rules! go {
                ($f:ident, $bank:expr, $qs:expr) => {{
                    let b = $bank;
                    let qsl = $qs;
                    let qp = |i: usize| qsl.as_ptr().add((g0 + i) * d);
                    if hr == 4 {
                        let rows: [_; 4] = std::array::from_fn(|r| b.as_ptr().add(rowi(r)));
                        match nq {
                            1 => dot::$f::<1, 4>(rows, [qp(0)], d, o, ss),
                            2 => dot::$f::<2, 4>(rows, std::array::from_fn(qp), d, o, ss),
                            3 => dot::$f::<3, 4>(rows, std::array::from_fn(qp), d, o, ss),
                            _ => dot::$f::<4, 4>(rows, std::array::from_fn(qp), d, o, ss),
                        }
                    } else {
                        let rows: [_; 2] = std::array::from_fn(|r| b.as_ptr().add(rowi(r0 + r)));
                        match nq {
                            1 => dot::$f::<1, 2>(rows, [qp(0)], d, o, ss),
                            2 => dot::$f::<2, 2>(rows, std::array::from_fn(qp), d, o, ss),
                            3 => dot::$f::<3, 2>(rows, std::array::from_fn(qp), d, o, ss),
                            4 => dot::$f::<4, 2>(rows, std::array::from_fn(qp), d, o, ss),
                            5 => dot::$f::<5, 2>(rows, std::array::from_fn(qp), d, o, ss),
                            6 => dot::$f::<6, 2>(rows, std::array::from_fn(qp), d, o, ss),
                            7 => dot::$f::<7, 2>(rows, std::array::from_fn(qp), d, o, ss),
                            _ => dot::$f::<8, 2>(rows, std::array::from_fn(qp), d, o, ss),
                        }
                    }
                }};
            }
            match (simd, j.bank, j.queries) {
                (Simd::Avx512 | Simd::Avx512Bf16, Elems::F32(b), Elems::F32(q)) => go!(f32_512, b, q),
                (Simd::Avx512Bf16, Elems::Bf16(b), Elems::Bf16(q)) => go!(bf16dp_512, b, q),
                (Simd::Avx512, Elems::Bf16(b), Elems::Bf16(q)) => go!(bf16w_512, b, q),
                (Simd::Avx2, Elems::F32(b), Elems::F32(q)) => go!(f32_256, b, q),
                (Simd::Avx2, Elems::Bf16(b), Elems::Bf16(q)) => go!(bf16_256, b, q),
                _ => unreachable!("streaming path on {simd:?}"),
            }
          }
        }
        if !need_norm {
            sumsq[..R].fill(0.0);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (simd, g, j, rb, nrows, out, sumsq, need_norm);
        unreachable!("streaming path needs x86_64");
    }
}

// ---------------------------------------------------------------------------------------------
// the fused top-k's first check, vectorised

/// Whether [`candidate_lanes`] runs vector code on this path (AVX-512).
pub(crate) fn has_candidate_filter(simd: Simd) -> bool {
    matches!(simd, Simd::Avx512 | Simd::Avx512Bf16)
}

/// Lanes of one tile row (`raw`: a panel's raw scores) that may enter their heap: the metric's score
/// is at least the heap's threshold, or the raw score is not finite (the scalar path recomputes
/// those). `>=` rather than the heap's `>`, computed with the scalar path's operations in the same
/// order: a superset of the lanes the exact check keeps, which then decides.
pub(crate) fn candidate_lanes(simd: Simd, raw: &[f32], thr: &[f32], qnorm: Option<&[f32]>, metric: Metric, binv: f32,
                              bn: f32) -> u64 {
    let l = raw.len();
    assert!(thr.len() == l && l % 16 == 0 && l <= 64 && qnorm.map_or(metric == Metric::Ip, |q| q.len() == l));
    match simd {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 | Simd::Avx512Bf16 => unsafe {
            x86::candidates512(raw.as_ptr(), l, thr.as_ptr(), qnorm.map_or(std::ptr::null(), |q| q.as_ptr()), metric, binv, bn)
        },
        _ => crate::lane_mask(l),
    }
}
