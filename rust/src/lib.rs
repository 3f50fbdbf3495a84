//! Python bindings of the crl search core (`crl._native`). All the work is in `crl-core`; this file
//! only checks arguments, borrows numpy buffers without copying, and releases the GIL.

use numpy::ndarray::{Array2, Array3};
use numpy::prelude::*;
use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArray};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crl_core::{Elems, Job, Metric, Options, SearchError, Simd};

/// A borrowed, C-contiguous numpy matrix (or stack of matrices).
enum Mat<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    I16(PyReadonlyArrayDyn<'py, i16>),
    U16(PyReadonlyArrayDyn<'py, u16>),
}

impl<'py> Mat<'py> {
    fn shape(&self) -> Vec<usize> {
        match self {
            Mat::F32(a) => a.shape().to_vec(),
            Mat::I16(a) => a.shape().to_vec(),
            Mat::U16(a) => a.shape().to_vec(),
        }
    }
    fn dtype_name(&self) -> &'static str {
        match self {
            Mat::F32(_) => "float32",
            Mat::I16(_) => "int16 (bfloat16 bits)",
            Mat::U16(_) => "uint16 (bfloat16 bits)",
        }
    }
    fn is_bf16(&self) -> bool {
        !matches!(self, Mat::F32(_))
    }
    /// The whole buffer (checked contiguous at construction).
    fn elems(&self) -> Elems<'_> {
        match self {
            Mat::F32(a) => Elems::F32(a.as_slice().expect("contiguous")),
            Mat::I16(a) => {
                let s = a.as_slice().expect("contiguous");
                // SAFETY: i16 and u16 have the same size and alignment; any bit pattern is valid.
                Elems::Bf16(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) })
            }
            Mat::U16(a) => Elems::Bf16(a.as_slice().expect("contiguous")),
        }
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// Borrow `obj` as a C-contiguous float32 / int16 / uint16 array of dimension `ndims` (one of).
fn as_mat<'py>(obj: &Bound<'py, PyAny>, name: &str, ndims: &[usize]) -> PyResult<Mat<'py>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!("{name}: expected a numpy.ndarray, got {}", type_name(obj)))
    })?;
    let dt = arr.dtype();
    let m = if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        check_layout(arr, name, ndims)?;
        Mat::F32(a.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?)
    } else if let Ok(a) = obj.cast::<PyArrayDyn<i16>>() {
        check_layout(arr, name, ndims)?;
        Mat::I16(a.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?)
    } else if let Ok(a) = obj.cast::<PyArrayDyn<u16>>() {
        check_layout(arr, name, ndims)?;
        Mat::U16(a.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?)
    } else {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected dtype float32, or int16/uint16 holding bfloat16 bits (tensor.view(torch.int16)); got {}",
            dt.str().map(|s| s.to_string()).unwrap_or_else(|_| "?".into())
        )));
    };
    Ok(m)
}

fn check_layout(arr: &Bound<'_, PyUntypedArray>, name: &str, ndims: &[usize]) -> PyResult<()> {
    if !ndims.contains(&arr.ndim()) {
        let want: Vec<String> = ndims.iter().map(|d| format!("{d}-D")).collect();
        return Err(PyValueError::new_err(format!(
            "{name}: expected a {} array, got {}-D with shape {:?}",
            want.join(" or "),
            arr.ndim(),
            arr.shape()
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name}: expected a C-contiguous array (arrays are used without copying); got strides {:?} for shape {:?} \
             - pass numpy.ascontiguousarray({name})",
            arr.strides(),
            arr.shape()
        )));
    }
    Ok(())
}

/// Borrow a 1-D C-contiguous int64 array.
fn as_groups<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArrayDyn<'py, i64>> {
    let arr = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!("{name}: expected a numpy.ndarray of int64, got {}", type_name(obj)))
    })?;
    let a = obj.cast::<PyArrayDyn<i64>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name}: expected dtype int64, got {}",
            arr.dtype().str().map(|s| s.to_string()).unwrap_or_else(|_| "?".into())
        ))
    })?;
    if !arr.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{name}: expected a C-contiguous array")));
    }
    a.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn resolve_simd(simd: Option<&str>) -> PyResult<Simd> {
    let (src, val) = match simd {
        Some(s) => ("simd", s.to_string()),
        None => match std::env::var("CRL_SIMD") {
            Ok(s) if !s.is_empty() && s != "auto" => ("CRL_SIMD", s),
            _ => return Ok(Simd::best()),
        },
    };
    if val == "auto" {
        return Ok(Simd::best());
    }
    let p = Simd::parse(&val).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{src}: expected one of 'auto', 'avx512bf16', 'avx512', 'avx2', 'scalar'; got {val:?}"
        ))
    })?;
    if !p.is_supported() {
        let sup: Vec<&str> = Simd::supported().iter().map(|s| s.name()).collect();
        return Err(PyValueError::new_err(format!(
            "{src}: path {val:?} is not supported by this CPU (supported: {})",
            sup.join(", ")
        )));
    }
    Ok(p)
}

#[allow(clippy::too_many_arguments)]
fn make_options(
    k: i64,
    metric: &str,
    min_score: Option<f64>,
    max_score: Option<f64>,
    threads: Option<i64>,
    simd: Option<&str>,
    check_finite: bool,
) -> PyResult<Options> {
    if k < 1 {
        return Err(PyValueError::new_err(format!("k: expected k >= 1, got {k}")));
    }
    let metric = Metric::parse(metric).ok_or_else(|| {
        PyValueError::new_err(format!("metric: expected 'ip', 'cosine' or 'l2', got {metric:?}"))
    })?;
    let lo = min_score.unwrap_or(f64::NEG_INFINITY);
    let hi = max_score.unwrap_or(f64::INFINITY);
    if lo.is_nan() {
        return Err(PyValueError::new_err("min_score: expected a number, got NaN"));
    }
    if hi.is_nan() {
        return Err(PyValueError::new_err("max_score: expected a number, got NaN"));
    }
    if lo > hi {
        return Err(PyValueError::new_err(format!(
            "min_score/max_score: expected min_score <= max_score, got {lo} > {hi}"
        )));
    }
    let threads = match threads {
        None => 0,
        Some(t) if t >= 1 => t as usize,
        Some(t) => return Err(PyValueError::new_err(format!("threads: expected threads >= 1 or None, got {t}"))),
    };
    Ok(Options {
        k: k as usize,
        metric,
        min_score: lo as f32,
        max_score: hi as f32,
        simd: resolve_simd(simd)?,
        threads,
        check_finite,
    })
}

fn map_err(e: SearchError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Split the argument of search_many into per-bank matrices.
fn as_stack<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Vec<Mat<'py>>> {
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let mut v = Vec::new();
        for (i, item) in obj.try_iter()?.enumerate() {
            v.push(as_mat(&item?, &format!("{name}[{i}]"), &[2])?);
        }
        if v.is_empty() {
            return Err(PyValueError::new_err(format!("{name}: expected at least one array")));
        }
        Ok(v)
    } else {
        Ok(vec![as_mat(obj, name, &[3])?])
    }
}

/// (data, rows, cols) of layer `l` of a stack given as a list of 2-D arrays or one 3-D array.
fn layer<'a>(stack: &'a [Mat<'a>], l: usize) -> (Elems<'a>, usize, usize) {
    if stack.len() == 1 && stack[0].shape().len() == 3 {
        let sh = stack[0].shape();
        let per = sh[1] * sh[2];
        let e = match stack[0].elems() {
            Elems::F32(s) => Elems::F32(&s[l * per..(l + 1) * per]),
            Elems::Bf16(s) => Elems::Bf16(&s[l * per..(l + 1) * per]),
        };
        (e, sh[1], sh[2])
    } else {
        let sh = stack[l].shape();
        (stack[l].elems(), sh[0], sh[1])
    }
}

fn n_layers(stack: &[Mat]) -> usize {
    if stack.len() == 1 && stack[0].shape().len() == 3 {
        stack[0].shape()[0]
    } else {
        stack.len()
    }
}

/// Groups for search_many: None, one 1-D array shared by all banks, a 2-D array [L, .], or a list.
enum Groups<'py> {
    None,
    Shared(PyReadonlyArrayDyn<'py, i64>),
    Stack(PyReadonlyArrayDyn<'py, i64>),
    List(Vec<PyReadonlyArrayDyn<'py, i64>>),
}

impl<'py> Groups<'py> {
    fn parse(obj: Option<&Bound<'py, PyAny>>, name: &str, layers: usize) -> PyResult<Groups<'py>> {
        let Some(obj) = obj else { return Ok(Groups::None) };
        if obj.is_none() {
            return Ok(Groups::None);
        }
        if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
            let mut v = Vec::new();
            for (i, item) in obj.try_iter()?.enumerate() {
                let a = as_groups(&item?, &format!("{name}[{i}]"))?;
                if a.ndim() != 1 {
                    return Err(PyValueError::new_err(format!("{name}[{i}]: expected a 1-D array")));
                }
                v.push(a);
            }
            if v.len() != layers {
                return Err(PyValueError::new_err(format!(
                    "{name}: expected one array per bank ({layers}), got {}",
                    v.len()
                )));
            }
            return Ok(Groups::List(v));
        }
        let a = as_groups(obj, name)?;
        match a.ndim() {
            1 => Ok(Groups::Shared(a)),
            2 => {
                if a.shape()[0] != layers {
                    return Err(PyValueError::new_err(format!(
                        "{name}: expected shape [{layers}, ...] (one row per bank), got {:?}",
                        a.shape()
                    )));
                }
                Ok(Groups::Stack(a))
            }
            _ => Err(PyValueError::new_err(format!("{name}: expected a 1-D or 2-D array"))),
        }
    }
    fn get(&self, l: usize) -> Option<&[i64]> {
        match self {
            Groups::None => None,
            Groups::Shared(a) => Some(a.as_slice().expect("contiguous")),
            Groups::Stack(a) => {
                let w = a.shape()[1];
                Some(&a.as_slice().expect("contiguous")[l * w..(l + 1) * w])
            }
            Groups::List(v) => Some(v[l].as_slice().expect("contiguous")),
        }
    }
    fn is_none(&self) -> bool {
        matches!(self, Groups::None)
    }
}

fn check_job(j: &Job, l: Option<usize>, qdt: &Mat, bdt: &Mat, opt: &Options) -> PyResult<()> {
    let at = |name: &str| match l {
        Some(l) => format!("{name}[{l}]"),
        None => name.to_string(),
    };
    if qdt.is_bf16() != bdt.is_bf16() {
        return Err(PyTypeError::new_err(format!(
            "{}: dtype {} does not match the queries' dtype {}",
            at("bank"),
            bdt.dtype_name(),
            qdt.dtype_name()
        )));
    }
    if j.d == 0 {
        return Err(PyValueError::new_err(format!("{}: expected d >= 1 columns, got 0", at("queries"))));
    }
    if j.n == 0 {
        return Err(PyValueError::new_err(format!("{}: the bank is empty (expected at least one row)", at("bank"))));
    }
    if let Some(qg) = j.query_groups {
        if qg.len() != j.q {
            return Err(PyValueError::new_err(format!(
                "{}: expected length {} (one group per query), got {}",
                at("query_groups"),
                j.q,
                qg.len()
            )));
        }
    }
    if let Some(bg) = j.bank_groups {
        if bg.len() != j.n {
            return Err(PyValueError::new_err(format!(
                "{}: expected length {} (one group per bank row), got {}",
                at("bank_groups"),
                j.n,
                bg.len()
            )));
        }
    }
    let _ = opt;
    Ok(())
}

/// Exact top-k search of `queries` [Q, d] against `bank` [N, d].
#[pyfunction]
#[pyo3(signature = (queries, bank, k, *, metric="ip", query_groups=None, bank_groups=None,
                    min_score=None, max_score=None, threads=None, simd=None, check_finite=true))]
#[allow(clippy::too_many_arguments)]
fn search<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    bank: &Bound<'py, PyAny>,
    k: i64,
    metric: &str,
    query_groups: Option<&Bound<'py, PyAny>>,
    bank_groups: Option<&Bound<'py, PyAny>>,
    min_score: Option<f64>,
    max_score: Option<f64>,
    threads: Option<i64>,
    simd: Option<&str>,
    check_finite: bool,
) -> PyResult<(Bound<'py, PyArray2F32>, Bound<'py, PyArray2I64>)> {
    let opt = make_options(k, metric, min_score, max_score, threads, simd, check_finite)?;
    let qm = as_mat(queries, "queries", &[2])?;
    let bm = as_mat(bank, "bank", &[2])?;
    let (qs, bs) = (qm.shape(), bm.shape());
    if bs[1] != qs[1] {
        return Err(PyValueError::new_err(format!(
            "bank: expected {} columns (the queries' d), got shape {:?}",
            qs[1], bs
        )));
    }
    let qg = match query_groups {
        Some(o) if !o.is_none() => Some(as_groups(o, "query_groups")?),
        _ => None,
    };
    let bg = match bank_groups {
        Some(o) if !o.is_none() => Some(as_groups(o, "bank_groups")?),
        _ => None,
    };
    if qg.is_some() != bg.is_some() {
        return Err(PyValueError::new_err(
            "query_groups/bank_groups: expected both or neither (a query excludes bank rows of its own group)",
        ));
    }
    let job = Job {
        queries: qm.elems(),
        bank: bm.elems(),
        q: qs[0],
        n: bs[0],
        d: qs[1],
        query_groups: qg.as_ref().map(|a| a.as_slice().expect("contiguous")),
        bank_groups: bg.as_ref().map(|a| a.as_slice().expect("contiguous")),
    };
    check_job(&job, None, &qm, &bm, &opt)?;
    let (q, kk) = (job.q, opt.k);
    let (s, i) = py.detach(|| crl_core::search(&job, &opt)).map_err(map_err)?;
    let s = Array2::from_shape_vec((q, kk), s).expect("shape").into_pyarray(py);
    let i = Array2::from_shape_vec((q, kk), i).expect("shape").into_pyarray(py);
    Ok((s, i))
}

type PyArray2F32 = numpy::PyArray2<f32>;
type PyArray2I64 = numpy::PyArray2<i64>;
type PyArray3F32 = numpy::PyArray3<f32>;
type PyArray3I64 = numpy::PyArray3<i64>;

/// Several banks, each with its own queries, in one call (parallel across banks and query blocks).
#[pyfunction]
#[pyo3(signature = (queries, banks, k, *, metric="ip", query_groups=None, bank_groups=None,
                    min_score=None, max_score=None, threads=None, simd=None, check_finite=true))]
#[allow(clippy::too_many_arguments)]
fn search_many<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    banks: &Bound<'py, PyAny>,
    k: i64,
    metric: &str,
    query_groups: Option<&Bound<'py, PyAny>>,
    bank_groups: Option<&Bound<'py, PyAny>>,
    min_score: Option<f64>,
    max_score: Option<f64>,
    threads: Option<i64>,
    simd: Option<&str>,
    check_finite: bool,
) -> PyResult<(Bound<'py, PyArray3F32>, Bound<'py, PyArray3I64>)> {
    let opt = make_options(k, metric, min_score, max_score, threads, simd, check_finite)?;
    let qstack = as_stack(queries, "queries")?;
    let bstack = as_stack(banks, "banks")?;
    let nl = n_layers(&qstack);
    if n_layers(&bstack) != nl {
        return Err(PyValueError::new_err(format!(
            "banks: expected {nl} banks (one per query set), got {}",
            n_layers(&bstack)
        )));
    }
    if nl == 0 {
        return Err(PyValueError::new_err("queries: expected at least one bank"));
    }
    let qg = Groups::parse(query_groups, "query_groups", nl)?;
    let bg = Groups::parse(bank_groups, "bank_groups", nl)?;
    if qg.is_none() != bg.is_none() {
        return Err(PyValueError::new_err(
            "query_groups/bank_groups: expected both or neither (a query excludes bank rows of its own group)",
        ));
    }
    let mut jobs = Vec::with_capacity(nl);
    let mut q0 = None;
    for l in 0..nl {
        let (qe, nq, d) = layer(&qstack, l);
        let (be, n, bd) = layer(&bstack, l);
        if bd != d {
            return Err(PyValueError::new_err(format!(
                "banks[{l}]: expected {d} columns (the d of queries[{l}]), got {bd}"
            )));
        }
        match q0 {
            None => q0 = Some(nq),
            Some(q) if q != nq => {
                return Err(PyValueError::new_err(format!(
                    "queries[{l}]: every bank needs the same number of queries ({q}), got {nq}"
                )))
            }
            _ => {}
        }
        let job = Job { queries: qe, bank: be, q: nq, n, d, query_groups: qg.get(l), bank_groups: bg.get(l) };
        let qm = if qstack.len() == 1 { &qstack[0] } else { &qstack[l] };
        let bm = if bstack.len() == 1 { &bstack[0] } else { &bstack[l] };
        check_job(&job, Some(l), qm, bm, &opt)?;
        jobs.push(job);
    }
    let q = q0.unwrap_or(0);
    let kk = opt.k;
    let (s, i) = py
        .detach(|| {
            let mut s = vec![0f32; nl * q * kk];
            let mut i = vec![0i64; nl * q * kk];
            crl_core::search_many(&jobs, &opt, &mut s, &mut i).map(|_| (s, i))
        })
        .map_err(map_err)?;
    let s = Array3::from_shape_vec((nl, q, kk), s).expect("shape").into_pyarray(py);
    let i = Array3::from_shape_vec((nl, q, kk), i).expect("shape").into_pyarray(py);
    Ok((s, i))
}

/// The SIMD paths this CPU supports, best first.
#[pyfunction]
fn simd_paths() -> Vec<&'static str> {
    Simd::supported().iter().map(|s| s.name()).collect()
}

/// The path a call without `simd=` uses (CRL_SIMD if set, else the best supported).
#[pyfunction]
fn simd_path() -> PyResult<&'static str> {
    Ok(resolve_simd(None)?.name())
}

/// The number of threads a call without `threads=` uses (all cores).
#[pyfunction]
fn default_threads() -> usize {
    crl_core::default_threads()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(search, m)?)?;
    m.add_function(wrap_pyfunction!(search_many, m)?)?;
    m.add_function(wrap_pyfunction!(simd_paths, m)?)?;
    m.add_function(wrap_pyfunction!(simd_path, m)?)?;
    m.add_function(wrap_pyfunction!(default_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
