//! The core against a naive implementation, on every SIMD path this CPU supports.

use crl_core::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % ((hi - lo + 1) as u64)) as i64
    }
    fn normal(&mut self) -> f32 {
        // sum of uniforms, good enough
        let mut s = 0.0f64;
        for _ in 0..4 {
            s += (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        }
        ((s - 2.0) * 1.7) as f32
    }
}

/// Naive search in f64 over the (already rounded) values; ties broken by the smaller id.
fn naive(q: &[f32], b: &[f32], nq: usize, n: usize, d: usize, qg: Option<&[i64]>, bg: Option<&[i64]>,
         opt: &Options) -> (Vec<f32>, Vec<i64>) {
    let k = opt.k;
    let mut so = vec![opt.metric.worst(); nq * k];
    let mut io = vec![-1i64; nq * k];
    for i in 0..nq {
        let qi = &q[i * d..(i + 1) * d];
        let qn: f64 = qi.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
        let mut c: Vec<(f64, i64)> = Vec::new();
        for r in 0..n {
            if let (Some(qg), Some(bg)) = (qg, bg) {
                if qg[i] == bg[r] {
                    continue;
                }
            }
            let br = &b[r * d..(r + 1) * d];
            let dot: f64 = qi.iter().zip(br).map(|(&x, &y)| x as f64 * y as f64).sum();
            let bn: f64 = br.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
            let s = match opt.metric {
                Metric::Ip => dot,
                Metric::Cosine => if qn > 0.0 && bn > 0.0 { dot / (qn.sqrt() * bn.sqrt()) } else { 0.0 },
                Metric::L2 => qi.iter().zip(br).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum(),
            };
            let sf = s as f32;
            if sf < opt.min_score || sf > opt.max_score {
                continue;
            }
            let g = if opt.metric == Metric::L2 { -s } else { s };
            c.push((g, r as i64));
        }
        c.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        for (slot, &(g, id)) in c.iter().take(k).enumerate() {
            so[i * k + slot] = if opt.metric == Metric::L2 { -g as f32 } else { g as f32 };
            io[i * k + slot] = id;
        }
    }
    (so, io)
}

fn to_bf16(v: &[f32]) -> (Vec<u16>, Vec<f32>) {
    let bits: Vec<u16> = v.iter().map(|&x| f32_to_bf16(x)).collect();
    let back = bits.iter().map(|&b| bf16_to_f32(b)).collect();
    (bits, back)
}

#[allow(clippy::too_many_arguments)]
fn check_case(seed: u64, nq: usize, n: usize, d: usize, k: usize, metric: Metric, ints: bool, groups: bool,
              window: Option<(f32, f32)>, bf16: bool, simd: Simd, threads: usize) {
    let mut rng = Rng(seed * 2654435761 + 12345);
    let gen = |rng: &mut Rng, m: usize| -> Vec<f32> {
        (0..m).map(|_| if ints { rng.int(-3, 3) as f32 } else { rng.normal() }).collect()
    };
    let q = gen(&mut rng, nq * d);
    let b = gen(&mut rng, n * d);
    let qg: Vec<i64> = (0..nq).map(|_| rng.int(0, 4)).collect();
    let bg: Vec<i64> = (0..n).map(|_| rng.int(0, 4)).collect();
    let (qb, qr) = to_bf16(&q);
    let (bb, br) = to_bf16(&b);
    let mut opt = Options { k, metric, simd, threads, ..Default::default() };
    if let Some((lo, hi)) = window {
        opt.min_score = lo;
        opt.max_score = hi;
    }
    let job = Job {
        queries: if bf16 { Elems::Bf16(&qb) } else { Elems::F32(&q) },
        bank: if bf16 { Elems::Bf16(&bb) } else { Elems::F32(&b) },
        q: nq, n, d,
        query_groups: if groups { Some(&qg) } else { None },
        bank_groups: if groups { Some(&bg) } else { None },
    };
    let (s, i) = search(&job, &opt).unwrap();
    let (rq, rb) = if bf16 { (&qr, &br) } else { (&q, &b) };
    let (ns, ni) = naive(rq, rb, nq, n, d, job.query_groups, job.bank_groups, &opt);
    let ctx = format!("seed={seed} q={nq} n={n} d={d} k={k} {metric:?} ints={ints} groups={groups} window={window:?} bf16={bf16} {simd:?}");
    let exact = ints && metric != Metric::Cosine;
    for x in 0..nq * k {
        if exact {
            assert_eq!(i[x], ni[x], "{ctx}: ids differ at {x}: {:?} vs {:?}", &i[..], &ni[..]);
            assert_eq!(s[x], ns[x], "{ctx}: scores differ at {x}");
        } else {
            let tol = 1e-4 * (1.0 + ns[x].abs()) * if metric == Metric::Cosine { 1.0 } else { (d as f32).sqrt() };
            if ns[x].is_infinite() {
                assert_eq!(s[x], ns[x], "{ctx}: padding at {x}");
                assert_eq!(i[x], -1, "{ctx}: padding id at {x}");
            } else {
                assert!((s[x] - ns[x]).abs() <= tol, "{ctx}: score {} vs {} at {x}", s[x], ns[x]);
                assert!(i[x] >= 0, "{ctx}");
            }
        }
    }
}

fn paths() -> Vec<Simd> {
    Simd::supported()
}

#[test]
fn exact_integer_data_all_paths() {
    let mut seed = 1;
    for simd in paths() {
        for &(nq, n, d, k) in &[(1, 50, 7, 5), (3, 200, 33, 10), (17, 300, 64, 4), (40, 129, 100, 12), (5, 3, 16, 10), (33, 1000, 31, 1)] {
            for metric in [Metric::Ip, Metric::L2] {
                for bf16 in [false, true] {
                    for groups in [false, true] {
                        check_case(seed, nq, n, d, k, metric, true, groups, None, bf16, simd, 2);
                        seed += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn grouped_micro_blocks_exact() {
    // queries beyond L2 (80 x 7000: 2.2 MB fp32, 1.1 MB bf16) make the search pack groups of bank
    // micro-blocks and sweep each query panel across a group; tails of groups and of blocks included
    let mut seed = 3000;
    for simd in paths() {
        for metric in [Metric::Ip, Metric::L2] {
            for bf16 in [false, true] {
                check_case(seed, 80, 250, 7000, 6, metric, true, seed % 2 == 0, None, bf16, simd, 2);
                seed += 1;
            }
        }
    }
}

#[test]
fn packer_piece_tails_exact() {
    // the AVX-512 packer (fp32 copied, bf16 widened) at depths around its 16-element pieces, partial
    // micro-blocks (n not a multiple of the rows) and the row norms L2 needs; 9 and 16 queries are
    // the smallest that pack (the streaming kernels take up to 8)
    let mut seed = 7000;
    for simd in paths() {
        for &d in &[1, 15, 16, 17, 47, 130] {
            for nq in [9, 16, 33] {
                for metric in [Metric::Ip, Metric::L2] {
                    for bf16 in [false, true] {
                        check_case(seed, nq, 61, d, 5, metric, true, false, None, bf16, simd, 2);
                        seed += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn windows_exact() {
    let mut seed = 1000;
    for simd in paths() {
        for bf16 in [false, true] {
            check_case(seed, 9, 400, 20, 8, Metric::Ip, true, true, Some((-5.0, 6.0)), bf16, simd, 2);
            check_case(seed + 1, 20, 400, 20, 8, Metric::L2, true, false, Some((30.0, 60.0)), bf16, simd, 1);
            // a window nothing qualifies for: all padding
            check_case(seed + 2, 4, 100, 12, 3, Metric::Ip, true, false, Some((1e6, 2e6)), bf16, simd, 2);
            seed += 3;
        }
    }
}

#[test]
fn float_data_all_metrics_all_paths() {
    let mut seed = 5000;
    for simd in paths() {
        for &(nq, n, d, k) in &[(1, 100, 5, 3), (16, 500, 70, 10), (50, 333, 129, 7), (2, 4, 3, 9)] {
            for metric in [Metric::Ip, Metric::Cosine, Metric::L2] {
                for bf16 in [false, true] {
                    check_case(seed, nq, n, d, k, metric, false, seed % 2 == 0, None, bf16, simd, 0);
                    seed += 1;
                }
            }
        }
    }
}

#[test]
fn cosine_window() {
    for simd in paths() {
        check_case(77, 8, 300, 40, 5, Metric::Cosine, false, true, Some((-0.1, 0.2)), false, simd, 2);
    }
}

#[test]
fn many_jobs_equal_single() {
    let mut rng = Rng(99);
    let d = 48;
    let sizes = [(5usize, 300usize), (5, 10), (5, 1000)];
    let data: Vec<(Vec<f32>, Vec<f32>)> = sizes
        .iter()
        .map(|&(q, n)| ((0..q * d).map(|_| rng.normal()).collect(), (0..n * d).map(|_| rng.normal()).collect()))
        .collect();
    let jobs: Vec<Job> = sizes
        .iter()
        .zip(&data)
        .map(|(&(q, n), (qv, bv))| Job { queries: Elems::F32(qv), bank: Elems::F32(bv), q, n, d, query_groups: None, bank_groups: None })
        .collect();
    let opt = Options { k: 6, ..Default::default() };
    let mut s = vec![0f32; 15 * 6];
    let mut i = vec![0i64; 15 * 6];
    search_many(&jobs, &opt, &mut s, &mut i).unwrap();
    for (li, job) in jobs.iter().enumerate() {
        let (s1, i1) = search(job, &opt).unwrap();
        assert_eq!(&s[li * 30..(li + 1) * 30], &s1[..]);
        assert_eq!(&i[li * 30..(li + 1) * 30], &i1[..]);
    }
}

#[test]
fn errors() {
    let q = vec![1.0f32; 8];
    let mut b = vec![1.0f32; 40];
    let job = |q: &[f32], b: &[f32]| -> Result<(Vec<f32>, Vec<i64>), SearchError> {
        let j = Job { queries: Elems::F32(q), bank: Elems::F32(b), q: 2, n: 10, d: 4, query_groups: None, bank_groups: None };
        search(&j, &Options { k: 3, ..Default::default() })
    };
    assert!(job(&q, &b).is_ok());
    b[17] = f32::NAN;
    assert_eq!(job(&q, &b).unwrap_err(), SearchError::NonFinite("bank", 0, 4));
    b[17] = f32::INFINITY;
    assert_eq!(job(&q, &b).unwrap_err(), SearchError::NonFinite("bank", 0, 4));
    b[17] = 1.0;
    let mut q2 = q.clone();
    q2[5] = f32::NEG_INFINITY;
    assert_eq!(job(&q2, &b).unwrap_err(), SearchError::NonFinite("queries", 0, 1));
    b[17] = 3e38;
    b[18] = 3e38;
    assert_eq!(job(&q, &b).unwrap_err(), SearchError::Overflow("bank", 0, 0, 4));
    let j = Job { queries: Elems::F32(&q), bank: Elems::F32(&b[..0]), q: 2, n: 0, d: 4, query_groups: None, bank_groups: None };
    assert!(matches!(search(&j, &Options::default()), Err(SearchError::Invalid("bank", _))));
    let j = Job { queries: Elems::F32(&q), bank: Elems::F32(&b), q: 2, n: 10, d: 4, query_groups: None, bank_groups: None };
    assert!(matches!(search(&j, &Options { k: 0, ..Default::default() }), Err(SearchError::Invalid("k", _))));
    assert!(matches!(search(&j, &Options { min_score: 2.0, max_score: 1.0, ..Default::default() }), Err(SearchError::Invalid("min_score", _))));
}

#[test]
fn topk_heap() {
    let mut h = TopK::new(3);
    for (s, i) in [(1.0, 0), (5.0, 1), (3.0, 2), (5.0, 3), (0.5, 4), (4.0, 5)] {
        h.push(s, i);
    }
    assert_eq!(h.sorted(), vec![(5.0, 1), (5.0, 3), (4.0, 5)]);
}

fn one(q: &[f32], b: &[f32], d: usize, k: usize, metric: Metric, simd: Simd) -> Result<(Vec<f32>, Vec<i64>), SearchError> {
    let j = Job { queries: Elems::F32(q), bank: Elems::F32(b), q: q.len() / d, n: b.len() / d, d, query_groups: None, bank_groups: None };
    search(&j, &Options { k, metric, simd, threads: 2, ..Default::default() })
}

#[test]
fn huge_k_is_an_error_or_padding_never_an_abort() {
    let q = vec![1.0f32; 8];
    let b = vec![1.0f32; 40];
    for k in [1usize << 40, 1 << 62, usize::MAX] {
        let e = one(&q, &b, 4, k, Metric::Ip, Simd::best()).unwrap_err();
        assert!(matches!(e, SearchError::Invalid("k", _)), "{e}");
    }
    // k > N within reason: N results, then padding
    let (s, i) = one(&q, &b, 4, 100_000, Metric::Ip, Simd::best()).unwrap();
    assert_eq!(s.len(), 200_000);
    assert_eq!(&i[..10], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert!(i[10..100_000].iter().all(|&x| x == -1) && s[10..100_000].iter().all(|&x| x == f32::NEG_INFINITY));
    // no queries: empty output for any k the address space allows
    assert!(one(&[], &b, 4, 1 << 20, Metric::Ip, Simd::best()).unwrap().0.is_empty());
    // a heap never allocates k slots up front
    let mut h = TopK::new(usize::MAX);
    h.push(1.0, 0);
    assert_eq!(h.sorted(), vec![(1.0, 0)]);
    assert!(matches!(alloc_output(4, usize::MAX / 2, 10), Err(SearchError::Invalid("k", _))));
}

#[test]
fn threads_out_of_range_is_an_error() {
    let q = vec![1.0f32; 8];
    let b = vec![1.0f32; 40];
    let j = Job { queries: Elems::F32(&q), bank: Elems::F32(&b), q: 2, n: 10, d: 4, query_groups: None, bank_groups: None };
    let e = search(&j, &Options { threads: 1 << 40, ..Default::default() }).unwrap_err();
    assert!(matches!(e, SearchError::Invalid("threads", _)), "{e}");
}

/// f64 reference of one pair, rounded to f32 (scores, not goodness).
fn ref_score(x: &[f32], y: &[f32], metric: Metric) -> f32 {
    let dot: f64 = x.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum();
    let xx: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    let yy: f64 = y.iter().map(|&a| (a as f64).powi(2)).sum();
    (match metric {
        Metric::Ip => dot,
        Metric::Cosine => if xx > 0.0 && yy > 0.0 { dot / (xx.sqrt() * yy.sqrt()) } else { 0.0 },
        Metric::L2 => x.iter().zip(y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum(),
    }) as f32
}

#[test]
fn tiny_and_huge_vectors_match_float64() {
    let d = 5;
    let mut rng = Rng(7);
    for simd in paths() {
        for &nq in &[1usize, 3, 20] {
            for &(qs, bs) in &[(1e-40f32, 1.0f32), (1.0, 1e-40), (1e-30, 1e-30), (1e-20, 1e-22), (1e18, 1.0), (1.0, 1e18),
                               (1e30, 1e30), (1e-25, 1e25), (1.0, 1.0)] {
                let q: Vec<f32> = (0..nq * d).map(|_| rng.normal() * qs).collect();
                // bank: scaled rows, a zero row, and a plain row
                let mut b: Vec<f32> = (0..30 * d).map(|_| rng.normal() * bs).collect();
                b[5 * d..6 * d].fill(0.0);
                for c in 0..d {
                    b[6 * d + c] = rng.normal();
                }
                for metric in [Metric::Cosine, Metric::L2, Metric::Ip] {
                    let n = b.len() / d;
                    let r = one(&q, &b, d, n, metric, simd);
                    // reference: every pair in f64
                    let mut want_err = false;
                    for i in 0..nq {
                        for rr in 0..n {
                            if !ref_score(&q[i * d..(i + 1) * d], &b[rr * d..(rr + 1) * d], metric).is_finite() {
                                want_err = true;
                            }
                        }
                    }
                    let ctx = format!("{simd:?} {metric:?} q*{qs:e} b*{bs:e} nq={nq}");
                    if want_err {
                        assert!(matches!(r, Err(SearchError::Overflow(..))), "{ctx}: {r:?}");
                        continue;
                    }
                    let (s, ids) = r.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                    for i in 0..nq {
                        let mut seen: Vec<i64> = ids[i * n..(i + 1) * n].to_vec();
                        seen.sort();
                        assert_eq!(seen, (0..n as i64).collect::<Vec<_>>(), "{ctx}: every row once");
                        let sc = &s[i * n..(i + 1) * n];
                        let sorted = if metric == Metric::L2 { sc.windows(2).all(|w| w[0] <= w[1]) } else { sc.windows(2).all(|w| w[0] >= w[1]) };
                        assert!(sorted, "{ctx}: best first: {sc:?}");
                        for slot in 0..n {
                            let id = ids[i * n + slot];
                            assert!(id >= 0, "{ctx}");
                            let want = ref_score(&q[i * d..(i + 1) * d], &b[id as usize * d..(id as usize + 1) * d], metric);
                            let got = s[i * n + slot];
                            let tol = match metric {
                                Metric::Cosine => 1e-5,
                                _ => 1e-5 * want.abs().max(f32::MIN_POSITIVE) + 2e-45,
                            };
                            let tol = if metric == Metric::Ip { tol + 1e-6 * qs * bs * d as f32 } else { tol };
                            assert!((got - want).abs() <= tol, "{ctx}: query {i} row {id}: {got:e} vs {want:e}");
                            if metric == Metric::Cosine {
                                assert!(got.abs() <= 1.0 + 1e-6, "{ctx}");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn l2_overflow_is_an_error_on_either_side() {
    let normal = [1.0f32, 0.0, 0.0, 1.0];
    let huge = [2e19f32, 0.0];
    for simd in paths() {
        // query side
        let e = one(&huge, &normal, 2, 2, Metric::L2, simd).unwrap_err();
        assert!(matches!(e, SearchError::Overflow("queries", 0, 0, _)), "{simd:?}: {e}");
        // bank side
        let e = one(&normal[..2], &[2e19, 0.0, 0.0, 1.0], 2, 2, Metric::L2, simd).unwrap_err();
        assert_eq!(e, SearchError::Overflow("bank", 0, 0, 0), "{simd:?}");
        // both huge and close: the distance fits, computed correctly
        let (s, i) = one(&huge, &[2e19, 1e10, 2e19, 0.0], 2, 2, Metric::L2, simd).unwrap();
        assert_eq!(i, vec![1, 0]);
        assert_eq!(s[0], 0.0);
        assert!((s[1] - 1e20).abs() <= 1e20 * 1e-6, "{s:?}");
        // cosine of huge vectors is exact, no overflow
        let (s, i) = one(&huge, &[2e19, 1e10, 3e38, 3e38], 2, 2, Metric::Cosine, simd).unwrap();
        assert_eq!(i, vec![0, 1]);
        assert!((s[0] - 1.0).abs() < 1e-6 && (s[1] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6, "{s:?}");
        // ip: a partial sum overflows fp32 but the score fits -> exact; a true overflow -> error
        let (s, _) = one(&[1.0, 1.0, -1.0], &[3e38, 3e38, 3e38], 3, 1, Metric::Ip, simd).unwrap();
        assert!((s[0] - 3e38).abs() <= 3e38 * 1e-6, "{simd:?} {s:?}");
        assert!(matches!(one(&[1.0, 1.0], &[3e38, 3e38], 2, 1, Metric::Ip, simd), Err(SearchError::Overflow("bank", 0, 0, 0))));
    }
}

#[test]
fn non_finite_inputs_never_qualify_without_check_finite() {
    let q = [1.0f32, 0.0, f32::NAN, 0.0, 1e-30, 1e-30];
    let b = [1.0f32, 0.0, f32::INFINITY, 0.0, 1e-30, 0.0, 0.0, 0.0];
    for simd in paths() {
        for metric in [Metric::Ip, Metric::Cosine, Metric::L2] {
            let j = Job { queries: Elems::F32(&q), bank: Elems::F32(&b), q: 3, n: 4, d: 2, query_groups: None, bank_groups: None };
            let (_, i) = search(&j, &Options { k: 4, metric, simd, check_finite: false, ..Default::default() }).unwrap();
            assert!(i[4..8].iter().all(|&x| x == -1), "{simd:?} {metric:?}: {i:?}");
            for qi in [0, 2] {
                let mut got: Vec<i64> = i[qi * 4..qi * 4 + 3].to_vec();
                got.sort();
                assert_eq!(got, vec![0, 2, 3], "{simd:?} {metric:?}: {i:?}");
                assert_eq!(i[qi * 4 + 3], -1);
            }
            let e = search(&j, &Options { k: 4, metric, simd, ..Default::default() }).unwrap_err();
            assert_eq!(e, SearchError::NonFinite("queries", 0, 1));
        }
    }
}

#[test]
fn peak_probe_measures_a_positive_rate_on_every_path() {
    for simd in crl_core::Simd::supported() {
        for bf16 in [false, true] {
            let f = crl_core::peak_flops(simd, bf16, 1, 0.005).unwrap();
            assert!(f.is_finite() && f > 1e6, "{simd:?} bf16={bf16}: {f}");
        }
    }
}

#[test]
fn bf16_gemm_policies_agree_with_the_naive_search() {
    use crl_core::Bf16Gemm;
    if !Simd::Avx512Bf16.is_supported() {
        return;
    }
    let (nq, n, d, k) = (130, 300, 72, 6); // >= WIDEN_MIN_Q queries, several panels: Auto may widen
    let mut rng = Rng(99);
    let q: Vec<f32> = (0..nq * d).map(|_| rng.int(-3, 3) as f32).collect();
    let b: Vec<f32> = (0..n * d).map(|_| rng.int(-3, 3) as f32).collect();
    let (qb, qr) = to_bf16(&q);
    let (bb, br) = to_bf16(&b);
    let job = Job { queries: Elems::Bf16(&qb), bank: Elems::Bf16(&bb), q: nq, n, d, query_groups: None, bank_groups: None };
    for policy in [Bf16Gemm::Auto, Bf16Gemm::DotProduct, Bf16Gemm::Widen] {
        let opt = Options { k, simd: Simd::Avx512Bf16, threads: 2, bf16_gemm: policy, ..Default::default() };
        let (s, i) = search(&job, &opt).unwrap();
        let (ns, ni) = naive(&qr, &br, nq, n, d, None, None, &opt);
        assert_eq!(i, ni, "{policy:?}");
        assert_eq!(s, ns, "{policy:?}");
    }
    assert_eq!(Bf16Gemm::parse("widen"), Some(Bf16Gemm::Widen));
    assert_eq!(Bf16Gemm::parse("nope"), None);
}
