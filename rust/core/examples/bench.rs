//! Single-process micro-benchmark of the core: `cargo run --release --example bench -- Q N D THREADS [simd] [bf16] [reps]`
//! (`CRL_BF16_GEMM=dot|widen` forces the bf16 GEMM, as in the extension)
use crl_core::*;
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn peak_fma(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_set1_ps(1.0); 12];
    let m = _mm512_set1_ps(0.999999);
    let c = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for x in a.iter_mut() {
            *x = _mm512_fmadd_ps(*x, m, c);
        }
    }
    let mut s = _mm512_setzero_ps();
    for x in a {
        s = _mm512_add_ps(s, x);
    }
    _mm512_reduce_add_ps(s)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let q: usize = a[1].parse().unwrap();
    let n: usize = a[2].parse().unwrap();
    let d: usize = a[3].parse().unwrap();
    let threads: usize = a[4].parse().unwrap();
    let simd = a.get(5).map(|s| Simd::parse(s).unwrap()).unwrap_or(Simd::best());
    let bf16 = a.get(6).map(|s| s == "bf16").unwrap_or(false);
    let reps: usize = a.get(7).map(|s| s.parse().unwrap()).unwrap_or(3);
    #[cfg(target_arch = "x86_64")]
    {
        let it = 20_000_000;
        let t = Instant::now();
        let r = unsafe { peak_fma(it) };
        let s = t.elapsed().as_secs_f64();
        eprintln!("single-core zmm FMA peak: {:.1} GFLOP/s ({r})", (it * 12 * 32) as f64 / s / 1e9);
    }
    let mut x = 1u32;
    let mut gen = |m: usize| -> Vec<f32> {
        (0..m).map(|_| { x = x.wrapping_mul(1664525).wrapping_add(1013904223); (x >> 9) as f32 / (1u32 << 23) as f32 - 0.5 }).collect()
    };
    let qv = gen(q * d);
    let bv = gen(n * d);
    let qb: Vec<u16> = qv.iter().map(|&v| f32_to_bf16(v)).collect();
    let bb: Vec<u16> = bv.iter().map(|&v| f32_to_bf16(v)).collect();
    let job = Job {
        queries: if bf16 { Elems::Bf16(&qb) } else { Elems::F32(&qv) },
        bank: if bf16 { Elems::Bf16(&bb) } else { Elems::F32(&bv) },
        q, n, d, query_groups: None, bank_groups: None,
    };
    let bf16_gemm = std::env::var("CRL_BF16_GEMM").ok().and_then(|v| Bf16Gemm::parse(&v)).unwrap_or(Bf16Gemm::Auto);
    let opt = Options { k: 10, simd, threads, bf16_gemm, ..Default::default() };
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let _ = search(&job, &opt).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    let fl = 2.0 * (q * n * d) as f64;
    let bytes = (n * d * if bf16 { 2 } else { 4 }) as f64;
    println!("q={q} n={n} d={d} t={threads} {simd:?} bf16={bf16}: {:.1} ms  {:.1} GFLOP/s  {:.1} GB/s", best * 1e3, fl / best / 1e9, bytes / best / 1e9);
}
