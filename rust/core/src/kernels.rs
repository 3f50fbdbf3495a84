//! Micro-block packing and micro-kernels for every SIMD path.
//!
//! Layouts (all pieces are 64 bytes):
//! * fp32 micro-block: `[dp/16][R][16]`, query panel `[dp][L]`;
//! * bf16 pair micro-block: `[dp/32][R][32]`, query panel `[dp/2][L][2]`.
//!
//! A kernel computes `out[r * L + lane] = sum_c block[r][c] * panel[c][lane]` for the `R x L` tile.

use crate::{Elems, Geometry, Job, Packed, Simd, PIECE_BF16, PIECE_F32};

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
                        let v = f32::from_bits((sp[t] as u32) << 16);
                        dst[t] = v;
                        acc[t] += v * v;
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
    pack_generic(src, d, rb, nrows, r, pairs, bf, bb, ss, nn)
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
    use std::arch::x86_64::*;

    /// AVX-512 fp32: R rows x V zmm of queries.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn k512<const V: usize, const R: usize>(bp: *const f32, qp: *const f32, dp: usize, out: *mut f32) {
        let l = 16 * V;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut qv = [_mm512_setzero_ps(); V];
        for kb in 0..dp / 16 {
            let b = bp.add(kb * R * 16);
            let q = qp.add(kb * 16 * l);
            for kk in 0..16 {
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
    pub unsafe fn k512bf16<const V: usize, const R: usize>(bp: *const u16, qp: *const u16, dp: usize, out: *mut f32) {
        let l = 16 * V;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        let mut qv = [_mm512_setzero_si512(); V];
        for kb in 0..dp / 32 {
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
    pub unsafe fn k256<const V: usize, const R: usize>(bp: *const f32, qp: *const f32, dp: usize, out: *mut f32) {
        let l = 8 * V;
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        let mut qv = [_mm256_setzero_ps(); V];
        for kb in 0..dp / 16 {
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
pub(crate) fn run_kernel(simd: Simd, g: Geometry, pk: &Packed, p: usize, buf_f32: &[f32], buf_bf16: &[u16], out: &mut [f32]) {
    let dp = pk.dp;
    let l = g.lanes;
    let r = g.rows;
    assert!(out.len() >= r * l);
    if g.bf16_pairs {
        let qp = &pk.bf16.as_slice()[p * dp * l..(p + 1) * dp * l];
        assert!(buf_bf16.len() >= dp * r);
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match l {
                16 => x86::k512bf16::<1, 16>(buf_bf16.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr()),
                32 => x86::k512bf16::<2, 12>(buf_bf16.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr()),
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
                (16, 16) => x86::k512::<1, 16>(buf_f32.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr()),
                (32, 12) => x86::k512::<2, 12>(buf_f32.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr()),
                _ => unreachable!(),
            }
        },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe {
            match (l, r) {
                (8, 12) => x86::k256::<1, 12>(buf_f32.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr()),
                (16, 6) => x86::k256::<2, 6>(buf_f32.as_ptr(), qp.as_ptr(), dp, out.as_mut_ptr()),
                _ => unreachable!(),
            }
        },
        _ => kernel_scalar(buf_f32, qp, dp, out),
    }
}
