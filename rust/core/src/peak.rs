//! The arithmetic peak of a SIMD path, measured: a register-only loop of independent multiply-adds
//! (no memory traffic) on every thread at once. It is the ceiling the benchmark holds the GEMM path
//! to ("fraction of peak"), measured rather than computed from a clock and a port count that a VM
//! does not report reliably.

use std::time::Instant;

use crate::{pool, SearchError, Simd};

/// FLOP per second of `simd`'s multiply-add instruction on `threads` threads (bf16 = `vdpbf16ps`
/// on the AVX512-BF16 path; fp32 FMA otherwise), measured over about `seconds`.
pub fn peak_flops(simd: Simd, bf16: bool, threads: usize, seconds: f64) -> Result<f64, SearchError> {
    let p = pool(threads)?;
    let t = p.current_num_threads();
    let flops: f64 = p.install(|| {
        use rayon::prelude::*;
        (0..t).into_par_iter().map(|_| one_thread(simd, bf16, seconds)).sum()
    });
    Ok(flops)
}

pub(crate) fn one_thread(simd: Simd, bf16: bool, seconds: f64) -> f64 {
    let mut iters: u64 = 1 << 14;
    loop {
        let t0 = Instant::now();
        let flop = run(simd, bf16, iters);
        let dt = t0.elapsed().as_secs_f64();
        if dt >= seconds || iters >= 1 << 40 {
            return flop / dt;
        }
        iters *= 2;
    }
}

/// Run `iters` rounds of 24 independent accumulators; returns the FLOP done.
fn run(simd: Simd, bf16: bool, iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (simd, bf16) {
            (Simd::Avx512Bf16, true) => return x86::bf16_512(iters),
            (Simd::Avx512 | Simd::Avx512Bf16, _) => return x86::f32_512(iters),
            (Simd::Avx2, _) => return x86::f32_256(iters),
            _ => {}
        }
    }
    let mut acc = [1.0f32; 24];
    for i in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, (i & 1) as f32 * 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters as f64 * 24.0 * 2.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_512(iters: u64) -> f64 {
        let mut acc = [_mm512_setzero_ps(); 24];
        let a: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3f80u16 as i16));
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi16(0x3380u16 as i16));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        iters as f64 * 24.0 * 64.0 // 32 bf16 products and 32 adds per instruction
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32_512(iters: u64) -> f64 {
        let mut acc = [_mm512_setzero_ps(); 24];
        let a = _mm512_set1_ps(0.999_999);
        let b = _mm512_set1_ps(1e-7);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        iters as f64 * 24.0 * 32.0
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn f32_256(iters: u64) -> f64 {
        let mut acc = [_mm256_setzero_ps(); 24];
        let a = _mm256_set1_ps(0.999_999);
        let b = _mm256_set1_ps(1e-7);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        std::hint::black_box(acc);
        iters as f64 * 24.0 * 16.0
    }
}
