//! crl-core: exact top-k search of queries against one or several banks.
//!
//! This crate holds the whole search (no Python types), so that `cargo test --release` from the
//! repository root exercises it without libpython. The Python bindings live in `rust/src/lib.rs`.
//!
//! # Algorithm
//!
//! The search is a GEMM `bank[N, d] x queries[Q, d]^T` fused with a per-query top-k. Queries are
//! packed once per call into *panels* of `L` queries laid out `[k][L]` (the vector lanes hold
//! queries). The bank is never copied as a whole: each task walks a chunk of bank rows in
//! micro-blocks of `R` rows, copies one micro-block into a small cache-resident buffer laid out in
//! 64-byte pieces `[k/16][R][16]` (computing the row norms in the same pass where the metric needs
//! them), and then runs the register-blocked micro-kernel (`R` rows x `L` queries of accumulators,
//! bank values broadcast from the buffer, query vectors loaded from the panel) for every query panel
//! of the task while the micro-block is hot. When the task's panels outgrow L2, up to 8 micro-blocks
//! are packed as a group and each panel is swept across the whole group, so queries come from the
//! last-level cache once per group. Each bank row is read from memory once per query super-block
//! (all queries unless they exceed [`SUPERBLOCK_BYTES`]). After each micro-kernel call
//! the `R x L` scores are filtered (group exclusion, score window) and offered to the per-query
//! top-k heaps inside the loop. Chunks run in parallel on a rayon pool; their heaps are merged at
//! the end.
//!
//! bf16 on the AVX512-BF16 path uses `vdpbf16ps` on bf16 pairs (products are exact in fp32 and
//! accumulate in fp32); on the other paths bf16 is widened to fp32 while packing the micro-block.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

mod kernels;
mod peak;
mod topk;

pub use peak::peak_flops;

pub use topk::TopK;

/// Query panels of one task are kept below this many bytes (so they stay in the last-level cache
/// while a bank micro-block is swept against all of them).
pub const SUPERBLOCK_BYTES: usize = 8 << 20;

/// Similarity measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Inner product, higher is better.
    Ip,
    /// Cosine similarity, higher is better. A zero vector has cosine 0 with everything.
    Cosine,
    /// Squared Euclidean distance, *lower* is better (results ascending).
    L2,
}

impl Metric {
    pub fn parse(s: &str) -> Option<Metric> {
        match s.to_ascii_lowercase().as_str() {
            "ip" | "inner_product" | "dot" => Some(Metric::Ip),
            "cosine" | "cos" => Some(Metric::Cosine),
            "l2" | "euclidean" | "sqeuclidean" => Some(Metric::L2),
            _ => None,
        }
    }
    /// The padding score for slots where fewer than k entries qualify.
    pub fn worst(self) -> f32 {
        match self {
            Metric::L2 => f32::INFINITY,
            _ => f32::NEG_INFINITY,
        }
    }
}

/// Instruction-set path of the micro-kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Simd {
    Scalar,
    Avx2,
    Avx512,
    /// AVX-512 with `vdpbf16ps` for bf16 inputs (fp32 inputs use the plain AVX-512 kernel).
    Avx512Bf16,
}

impl Simd {
    pub fn name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
            Simd::Avx512Bf16 => "avx512bf16",
        }
    }
    pub fn parse(s: &str) -> Option<Simd> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Some(Simd::Scalar),
            "avx2" => Some(Simd::Avx2),
            "avx512" => Some(Simd::Avx512),
            "avx512bf16" | "avx512_bf16" => Some(Simd::Avx512Bf16),
            _ => None,
        }
    }
    /// The paths this CPU supports, best first.
    pub fn supported() -> Vec<Simd> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let f512 = std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl");
            if f512 && std::arch::is_x86_feature_detected!("avx512bf16") {
                v.push(Simd::Avx512Bf16);
            }
            if f512 {
                v.push(Simd::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                v.push(Simd::Avx2);
            }
        }
        v.push(Simd::Scalar);
        v
    }
    pub fn is_supported(self) -> bool {
        Simd::supported().contains(&self)
    }
    /// The best supported path.
    pub fn best() -> Simd {
        Simd::supported()[0]
    }
}

/// A borrowed matrix, row-major and contiguous: fp32, or bf16 as raw bits.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Elems<'_> {
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::Bf16(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_bf16(&self) -> bool {
        matches!(self, Elems::Bf16(_))
    }
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Elems::F32(s) => s[i],
            Elems::Bf16(s) => bf16_to_f32(s[i]),
        }
    }
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Round-to-nearest-even fp32 -> bf16 bits (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// One bank with its queries.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    pub queries: Elems<'a>,
    pub bank: Elems<'a>,
    pub q: usize,
    pub n: usize,
    pub d: usize,
    /// Group of each query [q]; bank rows of the same group are excluded.
    pub query_groups: Option<&'a [i64]>,
    /// Group of each bank row [n].
    pub bank_groups: Option<&'a [i64]>,
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub k: usize,
    pub metric: Metric,
    /// Score window, in the metric's own units (squared distance for L2), inclusive.
    pub min_score: f32,
    pub max_score: f32,
    pub simd: Simd,
    /// 0 = all cores.
    pub threads: usize,
    pub check_finite: bool,
    /// How bf16 inputs are multiplied on the AVX512-BF16 path with many queries (see `Bf16Gemm`).
    pub bf16_gemm: Bf16Gemm,
}

/// bf16 GEMM on the AVX512-BF16 path: `vdpbf16ps` on bf16 pairs, or the bank widened to fp32 as it
/// is packed and multiplied by fp32 FMAs. Both are exact products accumulated in fp32. Which is
/// faster depends on the CPU: on Sapphire Rapids-class Xeons `vdpbf16ps` retires half the FLOP/s of
/// fp32 FMAs (measured: 94 against 178 GFLOP/s per thread), on Zen 4 it is the faster one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Gemm {
    /// Widen at `WIDEN_MIN_Q` queries or more when the CPU's fp32 FMAs outrun `vdpbf16ps` (a probe
    /// of a few milliseconds, once per process); `vdpbf16ps` otherwise (with fewer queries packing
    /// twice the bytes costs more than the multiply saves).
    Auto,
    DotProduct,
    Widen,
}

/// Queries from which `Bf16Gemm::Auto` may widen: every query count past the streaming kernels
/// (`DOT_MAX_Q`). Measured on a Xeon (N 65536, d 4096, 2 threads) with the AVX-512 packer, widening
/// is 1.26x faster than `vdpbf16ps` at 9 queries, 1.4x at 12 and 16, 1.6x at 32, 1.8x at 64 and 128.
/// (With the compiler's packer it was slower below 128 queries: the packing cost more than the
/// multiply saved.)
pub const WIDEN_MIN_Q: usize = DOT_MAX_Q + 1;

impl Bf16Gemm {
    pub fn parse(s: &str) -> Option<Bf16Gemm> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Some(Bf16Gemm::Auto),
            "dot" | "dp" | "dpbf16" => Some(Bf16Gemm::DotProduct),
            "widen" | "fp32" => Some(Bf16Gemm::Widen),
            _ => None,
        }
    }
}

/// Whether fp32 FMAs outrun `vdpbf16ps` per FLOP on this CPU (by 15%), probed once.
pub fn widening_is_faster() -> bool {
    static FASTER: OnceLock<bool> = OnceLock::new();
    *FASTER.get_or_init(|| {
        if !Simd::Avx512Bf16.is_supported() {
            return false;
        }
        let (dp, fma) = (peak::one_thread(Simd::Avx512Bf16, true, 0.002), peak::one_thread(Simd::Avx512, false, 0.002));
        fma > 1.15 * dp
    })
}

impl Default for Options {
    fn default() -> Self {
        Options {
            k: 10,
            metric: Metric::Ip,
            min_score: f32::NEG_INFINITY,
            max_score: f32::INFINITY,
            simd: Simd::best(),
            threads: 0,
            check_finite: true,
            bf16_gemm: Bf16Gemm::Auto,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum SearchError {
    /// Invalid argument: (argument name, message).
    Invalid(&'static str, String),
    /// NaN or Inf in an input: (argument name, bank index, row).
    NonFinite(&'static str, usize, usize),
    /// Finite inputs whose true score does not fit in fp32: (argument with the larger norm, bank
    /// index, query, bank row).
    Overflow(&'static str, usize, usize, usize),
    /// The output buffers could not be allocated (bytes).
    OutOfMemory(usize),
}

impl std::fmt::Display for SearchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SearchError::Invalid(arg, msg) => write!(f, "{arg}: {msg}"),
            SearchError::NonFinite(arg, l, row) => {
                write!(f, "{arg} contains NaN or Inf (bank {l}, row {row}); expected finite values")
            }
            SearchError::Overflow(arg, l, q, row) => write!(
                f,
                "{arg}: the score of query {q} against row {row} of bank {l} overflows float32 (values too large); \
                 expected scores within the float32 range"
            ),
            SearchError::OutOfMemory(bytes) => write!(
                f,
                "out: could not allocate the output ({:.1} GiB of scores and ids)",
                *bytes as f64 / (1u64 << 30) as f64
            ),
        }
    }
}

impl std::error::Error for SearchError {}

fn invalid(arg: &'static str, msg: impl Into<String>) -> SearchError {
    SearchError::Invalid(arg, msg.into())
}

/// Default number of threads (all cores).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// The largest explicit thread count accepted: 1024, or the number of cores if larger.
pub fn max_threads() -> usize {
    default_threads().max(1024)
}

/// A dedicated rayon pool per thread count, created on first use and cached.
pub fn pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, SearchError> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let t = if threads == 0 { default_threads() } else { threads };
    if t > max_threads() {
        return Err(invalid("threads", format!("expected 1 <= threads <= {}, got {t}", max_threads())));
    }
    let mut m = POOLS.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = m.get(&t) {
        return Ok(p.clone());
    }
    let p = rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .thread_name(|i| format!("crl-native-{i}"))
        .build()
        .map_err(|e| invalid("threads", format!("could not start {t} worker threads: {e}")))?;
    let p = Arc::new(p);
    m.insert(t, p.clone());
    Ok(p)
}

/// Total physical memory in bytes, where the platform tells (Linux: /proc/meminfo).
fn physical_memory() -> Option<usize> {
    static MEM: OnceLock<Option<usize>> = OnceLock::new();
    *MEM.get_or_init(|| {
        let s = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        kb.checked_mul(1024)
    })
}

/// Bytes per output slot (an f32 score and an i64 id).
const SLOT_BYTES: usize = 12;

/// The number of output slots for `rows` queries (all banks together) with `k` results each,
/// checking that the output can exist. `k > max_n` (more results than the largest bank has rows)
/// only adds padding, so a `k > max_n` whose output (counting at least one row) would exceed the
/// physical memory is rejected as an invalid `k` rather than attempted.
pub fn output_len(rows: usize, k: usize, max_n: usize) -> Result<usize, SearchError> {
    let too_large = |why: String| {
        invalid(
            "k",
            format!(
                "k = {k} is too large: {why}; at most {max_n} results exist per query (the bank size), \
                 slots past that are padding (id -1)"
            ),
        )
    };
    let bytes = rows.max(1).checked_mul(k).and_then(|s| s.checked_mul(SLOT_BYTES));
    let bytes = match bytes {
        Some(b) if b <= isize::MAX as usize => b,
        _ => return Err(too_large(format!("the output [{rows}, {k}] would exceed the address space"))),
    };
    if k > max_n {
        if let Some(mem) = physical_memory() {
            if bytes > mem {
                return Err(too_large(format!(
                    "the output [{}, {k}] would need {:.1} GiB, more than this machine's {:.1} GiB of memory",
                    rows.max(1),
                    bytes as f64 / (1u64 << 30) as f64,
                    mem as f64 / (1u64 << 30) as f64
                )));
            }
        }
    }
    Ok(rows * k)
}

/// Output buffers for [`search_many`]: `rows * k` slots (see [`output_len`]), allocated fallibly
/// (an allocation failure is an error, not an abort).
pub fn alloc_output(rows: usize, k: usize, max_n: usize) -> Result<(Vec<f32>, Vec<i64>), SearchError> {
    let len = output_len(rows, k, max_n)?;
    let fail = || {
        if k > max_n {
            invalid(
                "k",
                format!(
                    "k = {k} is too large: the padded output [{rows}, {k}] could not be allocated; at most \
                     {max_n} results exist per query (the bank size)"
                ),
            )
        } else {
            SearchError::OutOfMemory(len * SLOT_BYTES)
        }
    };
    let mut s: Vec<f32> = Vec::new();
    let mut i: Vec<i64> = Vec::new();
    s.try_reserve_exact(len).map_err(|_| fail())?;
    i.try_reserve_exact(len).map_err(|_| fail())?;
    s.resize(len, 0.0);
    i.resize(len, 0);
    Ok((s, i))
}

/// Check argument consistency (everything but finiteness).
pub fn validate(jobs: &[Job], opt: &Options) -> Result<(), SearchError> {
    if opt.k < 1 {
        return Err(invalid("k", format!("expected k >= 1, got {}", opt.k)));
    }
    if opt.min_score.is_nan() || opt.max_score.is_nan() {
        return Err(invalid("min_score", "min_score and max_score must not be NaN"));
    }
    if opt.min_score > opt.max_score {
        return Err(invalid(
            "min_score",
            format!("expected min_score <= max_score, got {} > {}", opt.min_score, opt.max_score),
        ));
    }
    if !opt.simd.is_supported() {
        return Err(invalid("simd", format!("path {:?} is not supported by this CPU", opt.simd.name())));
    }
    for j in jobs {
        if j.d == 0 {
            return Err(invalid("queries", "expected d >= 1"));
        }
        if j.n == 0 {
            return Err(invalid("bank", "bank is empty (expected at least one row)"));
        }
        if j.queries.len() != j.q * j.d {
            return Err(invalid("queries", "length is not q * d"));
        }
        if j.bank.len() != j.n * j.d {
            return Err(invalid("bank", "length is not n * d"));
        }
        if j.queries.is_bf16() != j.bank.is_bf16() {
            return Err(invalid("bank", "queries and bank must have the same element type"));
        }
        match (j.query_groups, j.bank_groups) {
            (None, None) => {}
            (Some(qg), Some(bg)) => {
                if qg.len() != j.q {
                    return Err(invalid("query_groups", format!("expected length {}, got {}", j.q, qg.len())));
                }
                if bg.len() != j.n {
                    return Err(invalid("bank_groups", format!("expected length {}, got {}", j.n, bg.len())));
                }
            }
            _ => return Err(invalid("query_groups", "query_groups and bank_groups must be given together")),
        }
    }
    Ok(())
}

/// Tile geometry of a path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    /// queries per panel
    pub lanes: usize,
    /// bank rows per micro-block
    pub rows: usize,
    /// whether bf16 is consumed in pairs (vdpbf16ps) rather than widened
    pub bf16_pairs: bool,
    /// streaming mode for few queries: bank rows are read in place and dotted against every
    /// query (no packing, no redundant lanes); `lanes` is then [`DOT_MAX_Q`]
    pub dot: bool,
}

/// Up to this many queries (per job) use the streaming dot-product kernels (`lanes` = this).
pub const DOT_MAX_Q: usize = 8;

pub(crate) fn geometry(simd: Simd, bf16: bool, q: usize, policy: Bf16Gemm) -> Geometry {
    if simd != Simd::Scalar && q <= DOT_MAX_Q {
        return Geometry { lanes: DOT_MAX_Q, rows: 4, bf16_pairs: bf16 && simd == Simd::Avx512Bf16, dot: true };
    }
    let (lanes, rows) = match simd {
        Simd::Scalar => (8, 4),
        Simd::Avx2 => {
            if q <= 8 {
                (8, 12)
            } else {
                (16, 6)
            }
        }
        Simd::Avx512 | Simd::Avx512Bf16 => {
            if q <= 16 {
                (16, 16)
            } else {
                (32, 12)
            }
        }
    };
    let pairs = bf16 && simd == Simd::Avx512Bf16 && match policy {
        Bf16Gemm::DotProduct => true,
        Bf16Gemm::Widen => false,
        Bf16Gemm::Auto => q < WIDEN_MIN_Q || !widening_is_faster(),
    };
    Geometry { lanes, rows, bf16_pairs: pairs, dot: false }
}

/// Elements per 64-byte piece of the packed layouts.
pub(crate) const PIECE_F32: usize = 16;
pub(crate) const PIECE_BF16: usize = 32;

/// Packed queries of one job.
pub(crate) struct Packed {
    /// fp32 panels `[panel][dp][lanes]` or bf16 pair panels `[panel][dp/2][lanes][2]`
    pub f32: kernels::AVec<f32>,
    pub bf16: kernels::AVec<u16>,
    /// padded depth (multiple of the piece size)
    pub dp: usize,
    pub panels: usize,
    /// per query: 1/|q| (cosine) or |q|^2 (L2), unused for Ip
    pub qnorm: Vec<f32>,
    /// per query: [`FAST`], [`SLOW`] (norm outside the fp32-safe range: float64 path) or [`BAD`]
    /// (NaN/Inf, only reached with `check_finite` off: never qualifies)
    pub qclass: Vec<u8>,
    /// per panel: whether any of its queries is not [`FAST`]
    pub panel_special: Vec<bool>,
}

/// Classes of queries and bank rows.
pub(crate) const FAST: u8 = 0;
pub(crate) const SLOW: u8 = 1;
pub(crate) const BAD: u8 = 2;

/// Sums of squares in `[SAFE_LO, SAFE_HI]` (or exactly 0) are safe for the fp32 fast path of
/// `cosine` and `l2`: with both norms in `[1e-15, 1e15]` no product, partial sum or norm under- or
/// overflows fp32 enough to matter. Vectors outside (tiny or huge, but finite) are scored in
/// float64 from the original values, pair by pair.
pub const SAFE_LO: f32 = 1e-30;
pub const SAFE_HI: f32 = 1e30;

#[inline]
fn in_safe_range(s: f64) -> bool {
    s == 0.0 || (s >= SAFE_LO as f64 && s <= SAFE_HI as f64)
}

fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

fn pack_queries(j: &Job, g: Geometry, metric: Metric) -> Packed {
    let l = g.lanes;
    let panels = j.q.div_ceil(l);
    let mut qnorm = vec![0.0f32; j.q];
    let mut qclass = vec![FAST; j.q];
    for qi in 0..j.q {
        let s = sumsq64(j.queries, j.d, qi);
        qclass[qi] = if !s.is_finite() {
            BAD
        } else if metric == Metric::Ip || in_safe_range(s) {
            FAST
        } else {
            SLOW
        };
        if qclass[qi] == FAST {
            qnorm[qi] = match metric {
                Metric::Ip => 0.0,
                Metric::Cosine => {
                    if s > 0.0 {
                        (1.0 / s.sqrt()) as f32
                    } else {
                        0.0
                    }
                }
                Metric::L2 => s as f32,
            };
        }
    }
    let panel_special = (0..panels).map(|p| qclass[p * l..((p + 1) * l).min(j.q)].iter().any(|&c| c != FAST)).collect();
    if g.dot {
        return Packed {
            f32: kernels::AVec::zeroed(0),
            bf16: kernels::AVec::zeroed(0),
            dp: 0,
            panels,
            qnorm,
            qclass,
            panel_special,
        };
    }
    if g.bf16_pairs {
        let dp = round_up(j.d, PIECE_BF16);
        let Elems::Bf16(src) = j.queries else { unreachable!() };
        let mut outv = kernels::AVec::<u16>::zeroed(panels * dp * l);
        let out = outv.as_mut_slice();
        for p in 0..panels {
            let base = &mut out[p * dp * l..(p + 1) * dp * l];
            for lane in 0..l {
                let qi = p * l + lane;
                if qi >= j.q {
                    break;
                }
                let row = &src[qi * j.d..(qi + 1) * j.d];
                for (c, &v) in row.iter().enumerate() {
                    base[((c / 2) * l + lane) * 2 + (c & 1)] = v;
                }
            }
        }
        Packed { f32: kernels::AVec::zeroed(0), bf16: outv, dp, panels, qnorm, qclass, panel_special }
    } else {
        let dp = round_up(j.d, PIECE_F32);
        let mut outv = kernels::AVec::<f32>::zeroed(panels * dp * l);
        let out = outv.as_mut_slice();
        for p in 0..panels {
            let base = &mut out[p * dp * l..(p + 1) * dp * l];
            for lane in 0..l {
                let qi = p * l + lane;
                if qi >= j.q {
                    break;
                }
                for c in 0..j.d {
                    base[c * l + lane] = j.queries.get(qi * j.d + c);
                }
            }
        }
        Packed { f32: outv, bf16: kernels::AVec::zeroed(0), dp, panels, qnorm, qclass, panel_special }
    }
}

fn first_non_finite(e: Elems, d: usize) -> Option<usize> {
    match e {
        Elems::F32(s) => s.iter().position(|x| !x.is_finite()).map(|i| i / d),
        Elems::Bf16(s) => s.iter().position(|&b| b & 0x7f80 == 0x7f80).map(|i| i / d),
    }
}

/// Sum of squares of row `row` in float64 (exact up to summation rounding for any fp32 values;
/// non-finite iff the row holds NaN or Inf).
fn sumsq64(e: Elems, d: usize, row: usize) -> f64 {
    match e {
        Elems::F32(s) => s[row * d..(row + 1) * d].iter().map(|&x| (x as f64) * (x as f64)).sum(),
        Elems::Bf16(s) => s[row * d..(row + 1) * d]
            .iter()
            .map(|&b| {
                let x = bf16_to_f32(b) as f64;
                x * x
            })
            .sum(),
    }
}

/// Outcome of scoring one (query, bank row) pair in float64.
enum Slow {
    /// the goodness (higher is better: -distance for L2)
    Score(f32),
    /// never qualifies (non-finite query, or an overflowing score with `check_finite` off)
    Skip,
    /// the bank row holds NaN/Inf
    BadRow,
    Err(SearchError),
}

/// Score query `qi` against bank row `row` in float64 from the original values: the fallback for
/// pairs whose fp32 score is non-finite or whose norms are outside the fp32-safe range. The result
/// is the float64 score rounded to fp32 (the L2 distance as the sum of squared differences).
#[cold]
#[inline(never)]
fn slow_score(j: &Job, li: usize, qi: usize, row: usize, metric: Metric, check_finite: bool) -> Slow {
    let d = j.d;
    let (mut dot, mut qq, mut bb, mut dd) = (0f64, 0f64, 0f64, 0f64);
    for c in 0..d {
        let x = j.queries.get(qi * d + c) as f64;
        let y = j.bank.get(row * d + c) as f64;
        dot += x * y;
        qq += x * x;
        bb += y * y;
        dd += (x - y) * (x - y);
    }
    if !bb.is_finite() {
        return Slow::BadRow;
    }
    if !qq.is_finite() {
        return Slow::Skip;
    }
    let score = match metric {
        Metric::Ip => dot,
        Metric::Cosine => {
            if qq > 0.0 && bb > 0.0 {
                (dot / (qq.sqrt() * bb.sqrt())).clamp(-1.0, 1.0)
            } else {
                0.0
            }
        }
        Metric::L2 => dd,
    } as f32;
    if !score.is_finite() {
        if !check_finite {
            return Slow::Skip;
        }
        let arg = if qq >= bb { "queries" } else { "bank" };
        return Slow::Err(SearchError::Overflow(arg, li, qi, row));
    }
    Slow::Score(if metric == Metric::L2 { -score } else { score })
}

/// One unit of parallel work: a chunk of bank rows against a range of query panels of one job.
#[derive(Clone, Copy, Debug)]
struct Task {
    job: usize,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
}

struct TaskOut {
    heaps: Vec<TopK>,
    err: Option<SearchError>,
}

/// Search every job; results go to `scores`/`ids`, job after job, each `[q, k]` best first.
pub fn search_many(jobs: &[Job], opt: &Options, scores: &mut [f32], ids: &mut [i64]) -> Result<(), SearchError> {
    validate(jobs, opt)?;
    let rows = jobs.iter().try_fold(0usize, |a, j| a.checked_add(j.q));
    let max_n = jobs.iter().map(|j| j.n).max().unwrap_or(0);
    let total = match rows {
        Some(rows) => output_len(rows, opt.k, max_n)?,
        None => return Err(invalid("queries", "too many queries")),
    };
    if scores.len() != total || ids.len() != total {
        return Err(invalid("out", format!("expected output buffers of length {total}")));
    }
    let threads = if opt.threads == 0 { default_threads() } else { opt.threads };
    let pool = pool(threads)?;
    pool.install(|| search_in_pool(jobs, opt, threads, scores, ids))
}

fn search_in_pool(
    jobs: &[Job],
    opt: &Options,
    threads: usize,
    scores: &mut [f32],
    ids: &mut [i64],
) -> Result<(), SearchError> {
    // 1. finiteness of queries, packing
    if opt.check_finite {
        for (li, j) in jobs.iter().enumerate() {
            if let Some(row) = first_non_finite(j.queries, j.d) {
                return Err(SearchError::NonFinite("queries", li, row));
            }
        }
    }
    let geoms: Vec<Geometry> = jobs.iter().map(|j| geometry(opt.simd, j.bank.is_bf16(), j.q, opt.bf16_gemm)).collect();
    let packed: Vec<Packed> = jobs
        .par_iter()
        .zip(geoms.par_iter())
        .map(|(j, g)| pack_queries(j, *g, opt.metric))
        .collect();

    // 2. tasks
    let mut tasks = Vec::new();
    let njobs_with_q = jobs.iter().filter(|j| j.q > 0).count().max(1);
    for (li, j) in jobs.iter().enumerate() {
        if j.q == 0 {
            continue;
        }
        let g = geoms[li];
        let pk = &packed[li];
        let panel_bytes = (pk.dp * g.lanes * if g.bf16_pairs { 2 } else { 4 }).max(1);
        let per_sb = (SUPERBLOCK_BYTES / panel_bytes).max(1);
        let nsb = pk.panels.div_ceil(per_sb);
        // enough chunks for load balance, but chunks of at least a few micro-blocks
        let want = (16 * threads).div_ceil(njobs_with_q * nsb).max(1);
        let min_rows = g.rows * 8;
        let mut chunk = round_up(j.n.div_ceil(want), g.rows).max(min_rows);
        chunk = chunk.min(round_up(j.n, g.rows));
        for s in 0..nsb {
            let p0 = s * per_sb;
            let p1 = ((s + 1) * per_sb).min(pk.panels);
            let mut r0 = 0;
            while r0 < j.n {
                let r1 = (r0 + chunk).min(j.n);
                tasks.push(Task { job: li, r0, r1, p0, p1 });
                r0 = r1;
            }
        }
    }

    // 3. run
    let outs: Vec<TaskOut> = tasks
        .par_iter()
        .map(|t| run_task(t, &jobs[t.job], &packed[t.job], geoms[t.job], opt))
        .collect();
    for o in &outs {
        if let Some(e) = &o.err {
            return Err(e.clone());
        }
    }

    // 4. merge per (job, query)
    let k = opt.k;
    let total_q: usize = jobs.iter().map(|j| j.q).sum();
    let worst = opt.metric.worst();
    // group task outputs by job
    let mut by_job: Vec<Vec<(usize, &TaskOut)>> = vec![Vec::new(); jobs.len()];
    for (t, o) in tasks.iter().zip(outs.iter()) {
        by_job[t.job].push((t.p0, o));
    }
    let mut rows: Vec<(usize, usize, &mut [f32], &mut [i64])> = Vec::with_capacity(total_q);
    {
        let mut s_rest: &mut [f32] = scores;
        let mut i_rest: &mut [i64] = ids;
        for (li, j) in jobs.iter().enumerate() {
            for qi in 0..j.q {
                let (s, sr) = s_rest.split_at_mut(k);
                let (i, ir) = i_rest.split_at_mut(k);
                s_rest = sr;
                i_rest = ir;
                rows.push((li, qi, s, i));
            }
        }
    }
    let flip = opt.metric == Metric::L2;
    rows.par_iter_mut().for_each(|(li, qi, s, i)| {
        let g = geoms[*li];
        let mut cand: Vec<(f32, i64)> = Vec::new();
        for (p0, o) in &by_job[*li] {
            // the heaps of a task cover panels p0..p1, i.e. queries p0*lanes ..
            let first_q = *p0 * g.lanes;
            if *qi < first_q || *qi - first_q >= o.heaps.len() {
                continue;
            }
            cand.extend(o.heaps[*qi - first_q].entries());
        }
        cand.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
        for slot in 0..k {
            if slot < cand.len() {
                s[slot] = if flip { -cand[slot].0 } else { cand[slot].0 };
                i[slot] = cand[slot].1;
            } else {
                s[slot] = worst;
                i[slot] = -1;
            }
        }
    });
    Ok(())
}

/// Per-row data of the current micro-block.
struct Block {
    buf_f32: kernels::AVec<f32>,
    buf_bf16: kernels::AVec<u16>,
    sumsq: Vec<f32>,
}

fn run_task(t: &Task, j: &Job, pk: &Packed, g: Geometry, opt: &Options) -> TaskOut {
    let l = g.lanes;
    let r = g.rows;
    let q0 = t.p0 * l;
    let q1 = (t.p1 * l).min(j.q);
    // a task sees r1 - r0 bank rows, so it never holds more entries than that (k may be huge)
    let cap = opt.k.min(t.r1 - t.r0);
    let mut heaps: Vec<TopK> = (q0..q1).map(|_| TopK::new(cap)).collect();
    // Per lane of the task's panels: the heap's threshold (+inf past the last query) and the query's
    // norm term, so that a vector compare can skip the lanes no score of a tile row can enter.
    let simd_filter = kernels::has_candidate_filter(opt.simd) && !g.dot;
    let task_lanes = (t.p1 - t.p0) * l;
    let mut thr = vec![f32::INFINITY; if simd_filter { task_lanes } else { 0 }];
    let mut qn_pad = vec![0f32; if simd_filter && opt.metric != Metric::Ip { task_lanes } else { 0 }];
    if simd_filter {
        for qi in q0..q1 {
            thr[qi - q0] = f32::NEG_INFINITY;
            if opt.metric != Metric::Ip {
                qn_pad[qi - q0] = pk.qnorm[qi];
            }
        }
    }
    let need_norm = opt.metric != Metric::Ip;
    let group = group_blocks(g, pk.dp, t.p1 - t.p0);
    // elements of one packed micro-block in each buffer (0 for the one this geometry does not use)
    let bs_f32 = if g.bf16_pairs || g.dot { 0 } else { pk.dp * r };
    let bs_bf16 = if g.bf16_pairs && !g.dot { pk.dp * r } else { 0 };
    let mut blk = Block {
        buf_f32: kernels::AVec::zeroed(group * bs_f32),
        buf_bf16: kernels::AVec::zeroed(group * bs_bf16),
        sumsq: vec![0f32; group * r],
    };
    let mut out = vec![0f32; r * l];
    // window in "goodness" space (higher is better): L2 goodness is -distance
    let (gmin, gmax) = if opt.metric == Metric::L2 {
        (-opt.max_score, -opt.min_score)
    } else {
        (opt.min_score, opt.max_score)
    };
    let mut rclass = vec![FAST; group * r];
    // (first row, rows) of each micro-block of the current group
    let mut blocks: Vec<(usize, usize)> = Vec::with_capacity(group);
    let mut rb = t.r0;
    while rb < t.r1 {
        blocks.clear();
        let mut gb = rb;
        while blocks.len() < group && gb < t.r1 {
            let bi = blocks.len();
            let nrows = (t.r1 - gb).min(r);
            let sumsq = &mut blk.sumsq[bi * r..(bi + 1) * r];
            if g.dot {
                kernels::run_dot(opt.simd, g, j, gb, nrows, &mut out, sumsq, need_norm);
            } else {
                let bf = &mut blk.buf_f32.as_mut_slice()[bi * bs_f32..(bi + 1) * bs_f32];
                let bb = &mut blk.buf_bf16.as_mut_slice()[bi * bs_bf16..(bi + 1) * bs_bf16];
                kernels::pack_block(opt.simd, g, j, gb, nrows, pk.dp, bf, bb, sumsq, need_norm);
            }
            let rclass = &mut rclass[bi * r..(bi + 1) * r];
            let rb = gb;
            // classify the rows: fp32 norm in the safe range (fast), else recheck in float64: zero
            // (fast), NaN/Inf (bad), tiny or huge (slow: float64 per pair). Ip needs no norms; its rows
            // are examined only when a score is non-finite.
            for rr in 0..nrows {
                rclass[rr] = FAST;
                if !need_norm {
                    continue;
                }
                let bn = sumsq[rr];
                if bn >= SAFE_LO && bn <= SAFE_HI {
                    continue;
                }
                let row = rb + rr;
                let s64 = sumsq64(j.bank, j.d, row);
                if !s64.is_finite() {
                    if opt.check_finite {
                        return TaskOut { heaps, err: Some(SearchError::NonFinite("bank", t.job, row)) };
                    }
                    rclass[rr] = BAD;
                } else if s64 == 0.0 {
                    sumsq[rr] = 0.0;
                } else {
                    rclass[rr] = SLOW;
                }
            }
            blocks.push((gb, nrows));
            gb += nrows;
            if g.dot {
                break; // the streaming kernel's scores are in `out`: filter them now
            }
        }
        let next_group = gb;
        for p in t.p0..t.p1 {
            for (bi, &(rb, nrows)) in blocks.iter().enumerate() {
                let rclass = &mut rclass[bi * r..(bi + 1) * r];
                let sumsq = &blk.sumsq[bi * r..(bi + 1) * r];
                if !g.dot {
                    // while the last panel runs, prefetch the next group's bank rows (block bi's share)
                    let next = next_group + bi * r;
                    let pf = if p + 1 == t.p1 && next < t.r1 { Some((j, next, (t.r1 - next).min(r))) } else { None };
                    let bf = &blk.buf_f32.as_slice()[bi * bs_f32..(bi + 1) * bs_f32];
                    let bb = &blk.buf_bf16.as_slice()[bi * bs_bf16..(bi + 1) * bs_bf16];
                    kernels::run_kernel(opt.simd, g, pk, p, bf, bb, &mut out, pf);
                }
                let pq0 = p * l;
                let lanes_valid = (j.q - pq0).min(l);
                let panel_special = pk.panel_special[p];
                'rows: for rr in 0..nrows {
                    if rclass[rr] == BAD {
                        continue;
                    }
                    let row = rb + rr;
                    let row_slow = rclass[rr] == SLOW;
                    let bn = sumsq[rr];
                    let binv = if bn > 0.0 { 1.0 / bn.sqrt() } else { 0.0 };
                    let bg = j.bank_groups.map(|bg| bg[row]);
                    let maybe_special = row_slow || panel_special;
                    let orow = &out[rr * l..rr * l + lanes_valid];
                    // the lane loop, specialised on whether any pair of this row and panel may need the
                    // float64 path (tiny/huge norms; non-finite fp32 scores are checked in both)
                    macro_rules! lanes {
                        ($special:expr, $lanes:expr) => {
                            for lane in $lanes {
                                let raw = orow[lane];
                                let qi = pq0 + lane;
                                let fast = raw.is_finite() && !($special && (row_slow || pk.qclass[qi] != FAST));
                                let gval = if fast {
                                    match opt.metric {
                                        Metric::Ip => raw,
                                        Metric::Cosine => raw * pk.qnorm[qi] * binv,
                                        Metric::L2 => {
                                            // clamp rounding below zero
                                            let dist = pk.qnorm[qi] - 2.0 * raw + bn;
                                            -(if dist < 0.0 { 0.0 } else { dist })
                                        }
                                    }
                                } else {
                                    // rare: a tiny/huge norm, or a non-finite fp32 score (NaN/Inf
                                    // input, or an fp32 overflow of finite values): float64
                                    if pk.qclass[qi] == BAD {
                                        continue; // non-finite queries never qualify (check_finite off)
                                    }
                                    match slow_score(j, t.job, qi, row, opt.metric, opt.check_finite) {
                                        Slow::Score(v) => v,
                                        Slow::Skip => continue,
                                        Slow::BadRow => {
                                            if opt.check_finite {
                                                return TaskOut { heaps, err: Some(SearchError::NonFinite("bank", t.job, row)) };
                                            }
                                            rclass[rr] = BAD; // non-finite rows never qualify
                                            continue 'rows;
                                        }
                                        Slow::Err(e) => return TaskOut { heaps, err: Some(e) },
                                    }
                                };
                                let h = &mut heaps[qi - q0];
                                if gval > h.threshold() && gval >= gmin && gval <= gmax {
                                    if let (Some(bgv), Some(qg)) = (bg, j.query_groups) {
                                        if qg[qi] == bgv {
                                            continue;
                                        }
                                    }
                                    h.push(gval, row as i64);
                                    if simd_filter {
                                        thr[qi - q0] = h.threshold();
                                    }
                                }
                            }
                        };
                    }
                    if maybe_special {
                        lanes!(true, 0..lanes_valid);
                    } else if simd_filter {
                        // only the lanes whose score may reach the heap (or is non-finite) go on
                        let at = (p - t.p0) * l;
                        let qn = if qn_pad.is_empty() { None } else { Some(&qn_pad[at..at + l]) };
                        let mask = kernels::candidate_lanes(opt.simd, &out[rr * l..rr * l + l], &thr[at..at + l], qn,
                                                            opt.metric, binv, bn);
                        lanes!(false, BitLanes(mask & lane_mask(lanes_valid)));
                    } else {
                        lanes!(false, 0..lanes_valid);
                    }
                }
            }
        }
        rb = next_group;
    }
    TaskOut { heaps, err: None }
}

/// The set lanes of a mask, lowest first.
struct BitLanes(u64);

impl Iterator for BitLanes {
    type Item = usize;
    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let lane = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(lane)
    }
}

/// The lowest `lanes` bits set.
#[inline(always)]
pub(crate) fn lane_mask(lanes: usize) -> u64 {
    if lanes >= 64 { u64::MAX } else { (1u64 << lanes) - 1 }
}

/// Bytes of packed bank kept per group of micro-blocks: with the query panel (at most 512 KiB at
/// d = 4096, fp32) this stays inside a 2 MiB L2.
const GROUP_BYTES: usize = 768 << 10;

/// Query panels up to this many bytes in all stay in L2 across micro-blocks by themselves.
const L2_QUERY_BYTES: usize = 1 << 20;

/// Micro-blocks packed together and swept against each query panel in turn, so that a panel is
/// read from the last-level cache once per group rather than once per micro-block (up to 8x less
/// traffic of queries at large Q: +15% at Q = 1024, d = 2048 on a 2 MiB-L2 Xeon). Queries that fit
/// in L2 anyway, and the streaming kernels, keep one block: a group would only crowd L2 (-10% at
/// Q = 64, d = 4096).
fn group_blocks(g: Geometry, dp: usize, panels: usize) -> usize {
    let elem = if g.bf16_pairs { 2 } else { 4 };
    if g.dot || panels * dp * g.lanes * elem <= L2_QUERY_BYTES {
        return 1;
    }
    let block_bytes = (g.rows * dp * elem).max(1);
    (GROUP_BYTES / block_bytes).clamp(1, 8)
}

/// Convenience: a single job, results as vectors `[q * k]`.
pub fn search(job: &Job, opt: &Options) -> Result<(Vec<f32>, Vec<i64>), SearchError> {
    validate(std::slice::from_ref(job), opt)?;
    let (mut s, mut i) = alloc_output(job.q, opt.k, job.n)?;
    search_many(std::slice::from_ref(job), opt, &mut s, &mut i)?;
    Ok((s, i))
}
