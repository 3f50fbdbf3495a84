//! Python bindings of the crl search core (`crl._native`). All the work is in `crl-core`; this file
//! only checks arguments, borrows numpy buffers without copying (C-contiguous arrays whose data is
//! not aligned for their dtype are copied once into an aligned buffer), and releases the GIL.
//! No input may make it panic: every failure is a Python exception naming the argument.

use numpy::ndarray::{Array2, Array3};
use numpy::prelude::*;
use numpy::{Element, PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArray};
use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crl_core::{Bf16Gemm, Elems, Job, Metric, Options, SearchError, Simd};

/// The elements of a C-contiguous numpy array: borrowed in place, or an aligned copy where the
/// array's data is not aligned for its dtype (e.g. `np.frombuffer(buf, np.float32, offset=1)`).
enum Data<'py, T: Element> {
    Borrowed(PyReadonlyArrayDyn<'py, T>),
    Copied(Vec<T>),
}

impl<'py, T: Element + Copy> Data<'py, T> {
    fn new(a: &Bound<'py, PyArrayDyn<T>>, name: &str) -> PyResult<Self> {
        let r = a.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
        if r.as_slice().is_ok() {
            return Ok(Data::Borrowed(r));
        }
        // C-contiguous (checked by the caller) but not aligned: copy the bytes
        let n = r.len();
        let mut v: Vec<T> = Vec::new();
        v.try_reserve_exact(n).map_err(|_| {
            PyMemoryError::new_err(format!("{name}: could not allocate an aligned copy of the unaligned array"))
        })?;
        // SAFETY: the array is C-contiguous with n elements of T starting at data() (any
        // alignment); v has room for n elements; T is plain data (f32, i16, u16, i64).
        unsafe {
            std::ptr::copy_nonoverlapping(r.data() as *const u8, v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>());
            v.set_len(n);
        }
        Ok(Data::Copied(v))
    }
    fn slice(&self) -> &[T] {
        match self {
            // as_slice succeeded at construction; an empty slice would fail the length checks
            Data::Borrowed(a) => a.as_slice().unwrap_or(&[]),
            Data::Copied(v) => v,
        }
    }
}

enum MatData<'py> {
    F32(Data<'py, f32>),
    I16(Data<'py, i16>),
    U16(Data<'py, u16>),
}

/// A C-contiguous numpy matrix (or stack of matrices), borrowed or aligned-copied.
struct Mat<'py> {
    shape: Vec<usize>,
    data: MatData<'py>,
}

impl<'py> Mat<'py> {
    fn shape(&self) -> Vec<usize> {
        self.shape.clone()
    }
    fn dtype_name(&self) -> &'static str {
        match self.data {
            MatData::F32(_) => "float32",
            MatData::I16(_) => "int16 (bfloat16 bits)",
            MatData::U16(_) => "uint16 (bfloat16 bits)",
        }
    }
    fn is_bf16(&self) -> bool {
        !matches!(self.data, MatData::F32(_))
    }
    /// The whole buffer.
    fn elems(&self) -> Elems<'_> {
        match &self.data {
            MatData::F32(a) => Elems::F32(a.slice()),
            MatData::I16(a) => {
                let s = a.slice();
                // SAFETY: i16 and u16 have the same size and alignment; any bit pattern is valid.
                Elems::Bf16(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) })
            }
            MatData::U16(a) => Elems::Bf16(a.slice()),
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
    let shape = arr.shape().to_vec();
    let data = if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        check_layout(arr, name, ndims)?;
        MatData::F32(Data::new(a, name)?)
    } else if let Ok(a) = obj.cast::<PyArrayDyn<i16>>() {
        check_layout(arr, name, ndims)?;
        MatData::I16(Data::new(a, name)?)
    } else if let Ok(a) = obj.cast::<PyArrayDyn<u16>>() {
        check_layout(arr, name, ndims)?;
        MatData::U16(Data::new(a, name)?)
    } else {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected dtype float32, or int16/uint16 holding bfloat16 bits (tensor.view(torch.int16)); got {}",
            dt.str().map(|s| s.to_string()).unwrap_or_else(|_| "?".into())
        )));
    };
    Ok(Mat { shape, data })
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

/// A C-contiguous int64 array of groups (borrowed, or copied where unaligned).
struct GroupArr<'py> {
    shape: Vec<usize>,
    data: Data<'py, i64>,
}

impl GroupArr<'_> {
    fn ndim(&self) -> usize {
        self.shape.len()
    }
    fn slice(&self) -> &[i64] {
        self.data.slice()
    }
}

/// Borrow a C-contiguous int64 array (any ndim; callers check it).
fn as_groups<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<GroupArr<'py>> {
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
        return Err(PyValueError::new_err(format!(
            "{name}: expected a C-contiguous array; got strides {:?} for shape {:?} - pass numpy.ascontiguousarray({name})",
            arr.strides(),
            arr.shape()
        )));
    }
    Ok(GroupArr { shape: arr.shape().to_vec(), data: Data::new(a, name)? })
}

/// A 1-D group array of `search` (`what`: the expected shape, e.g. "[Q] (one group per query)").
fn as_groups_1d<'py>(obj: &Bound<'py, PyAny>, name: &str, what: &str) -> PyResult<GroupArr<'py>> {
    let a = as_groups(obj, name)?;
    if a.ndim() != 1 {
        return Err(PyValueError::new_err(format!(
            "{name}: expected a 1-D array of shape {what}, got {}-D with shape {:?}",
            a.ndim(),
            a.shape
        )));
    }
    Ok(a)
}

/// An integer argument as i64: a Python int (or anything with __index__) in range.
/// Out-of-range values give `Err(Ok(sign))` (sign: -1 or 1) so the caller can explain.
fn int_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Result<i64, i32>> {
    match obj.extract::<i64>() {
        Ok(v) => Ok(Ok(v)),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
            let neg = obj.lt(0).unwrap_or(false);
            Ok(Err(if neg { -1 } else { 1 }))
        }
        Err(_) => Err(PyTypeError::new_err(format!("{name}: expected an int, got {}", type_name(obj)))),
    }
}

/// `k`: >= 1 and within int64; too large a value for the output is rejected by crl_core::output_len.
fn parse_k(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    match int_arg(obj, "k")? {
        Ok(k) if k >= 1 => Ok(k as usize),
        Ok(k) => Err(PyValueError::new_err(format!("k: expected k >= 1, got {k}"))),
        Err(s) if s < 0 => Err(PyValueError::new_err(format!("k: expected k >= 1, got {obj}"))),
        Err(_) => Err(PyValueError::new_err(format!(
            "k: k = {obj} is too large (beyond int64); at most N results exist per query (the bank size), \
             slots past that are padding (id -1)"
        ))),
    }
}

// Argument extractors (`from_py_with`): their errors name the argument in the message itself
// (pyo3 only adds the name as an exception note).

fn arg_k(o: &Bound<'_, PyAny>) -> PyResult<usize> {
    parse_k(o)
}

fn arg_threads(o: &Bound<'_, PyAny>) -> PyResult<Option<usize>> {
    if o.is_none() {
        return Ok(None);
    }
    let max_t = crl_core::max_threads();
    match int_arg(o, "threads")? {
        Ok(t) if t >= 1 && (t as u64) <= max_t as u64 => Ok(Some(t as usize)),
        _ => Err(PyValueError::new_err(format!("threads: expected 1 <= threads <= {max_t} or None, got {o}"))),
    }
}

fn str_arg(o: &Bound<'_, PyAny>, name: &str) -> PyResult<String> {
    o.extract::<String>()
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected a str, got {}", type_name(o))))
}

fn arg_metric(o: &Bound<'_, PyAny>) -> PyResult<String> {
    str_arg(o, "metric")
}

fn arg_simd(o: &Bound<'_, PyAny>) -> PyResult<Option<String>> {
    if o.is_none() {
        Ok(None)
    } else {
        str_arg(o, "simd").map(Some)
    }
}

fn opt_float(o: &Bound<'_, PyAny>, name: &str) -> PyResult<Option<f64>> {
    if o.is_none() {
        return Ok(None);
    }
    o.extract::<f64>()
        .map(Some)
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected a number or None, got {}", type_name(o))))
}

fn arg_min_score(o: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
    opt_float(o, "min_score")
}

fn arg_max_score(o: &Bound<'_, PyAny>) -> PyResult<Option<f64>> {
    opt_float(o, "max_score")
}

fn arg_check_finite(o: &Bound<'_, PyAny>) -> PyResult<bool> {
    o.extract::<bool>()
        .map_err(|_| PyTypeError::new_err(format!("check_finite: expected a bool, got {}", type_name(o))))
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
    k: usize,
    metric: &str,
    min_score: Option<f64>,
    max_score: Option<f64>,
    threads: Option<usize>,
    simd: Option<&str>,
    check_finite: bool,
) -> PyResult<Options> {
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
    let threads = threads.unwrap_or(0);
    Ok(Options {
        k,
        metric,
        min_score: lo as f32,
        max_score: hi as f32,
        simd: resolve_simd(simd)?,
        threads,
        check_finite,
        bf16_gemm: bf16_gemm_policy()?,
    })
}

/// `CRL_BF16_GEMM` (auto, dot or widen): how bf16 is multiplied with many queries on the
/// AVX512-BF16 path (crl_core::Bf16Gemm); unset = auto.
fn bf16_gemm_policy() -> PyResult<Bf16Gemm> {
    match std::env::var("CRL_BF16_GEMM") {
        Ok(v) => Bf16Gemm::parse(&v)
            .ok_or_else(|| PyValueError::new_err(format!("CRL_BF16_GEMM: expected auto, dot or widen, got {v:?}"))),
        Err(_) => Ok(Bf16Gemm::Auto),
    }
}

fn map_err(e: SearchError) -> PyErr {
    match e {
        SearchError::OutOfMemory(_) => PyMemoryError::new_err(e.to_string()),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// numpy arrays of the results (shapes known to match the buffers; an error instead of a panic).
fn shape_err(e: numpy::ndarray::ShapeError) -> PyErr {
    PyValueError::new_err(format!("out: {e}"))
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
        // (an out-of-range layer gives an empty slice, which the length checks reject)
        let e = match stack[0].elems() {
            Elems::F32(s) => Elems::F32(s.get(l * per..(l + 1) * per).unwrap_or(&[])),
            Elems::Bf16(s) => Elems::Bf16(s.get(l * per..(l + 1) * per).unwrap_or(&[])),
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
    Shared(GroupArr<'py>),
    Stack(GroupArr<'py>),
    List(Vec<GroupArr<'py>>),
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
                v.push(as_groups_1d(&item?, &format!("{name}[{i}]"), "[Q] or [N] (one group per query or bank row)")?);
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
                if a.shape[0] != layers {
                    return Err(PyValueError::new_err(format!(
                        "{name}: expected shape [{layers}, ...] (one row per bank), got {:?}",
                        a.shape
                    )));
                }
                Ok(Groups::Stack(a))
            }
            n => Err(PyValueError::new_err(format!(
                "{name}: expected a 1-D array (shared by all banks), a 2-D array [{layers}, ...] or a list of \
                 {layers} 1-D arrays; got {n}-D with shape {:?}",
                a.shape
            ))),
        }
    }
    fn get(&self, l: usize) -> Option<&[i64]> {
        match self {
            Groups::None => None,
            Groups::Shared(a) => Some(a.slice()),
            Groups::Stack(a) => {
                let w = a.shape[1];
                Some(a.slice().get(l * w..(l + 1) * w).unwrap_or(&[]))
            }
            Groups::List(v) => Some(v.get(l).map(|a| a.slice()).unwrap_or(&[])),
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

/// Exact top-k search of `queries` [Q, d] against `bank` [N, d] (semantics: python/crl/_native.pyi).
/// `k > N` pads with id -1; a `k > N` whose padded output cannot exist raises ValueError (k).
/// Unaligned C-contiguous arrays are copied; tiny/huge vectors are scored in float64.
#[pyfunction]
#[pyo3(signature = (queries, bank, k, *, metric=String::from("ip"), query_groups=None, bank_groups=None,
                    min_score=None, max_score=None, threads=None, simd=None, check_finite=true),
       text_signature = "(queries, bank, k, *, metric=\"ip\", query_groups=None, bank_groups=None, min_score=None, max_score=None, threads=None, simd=None, check_finite=True)")]
#[allow(clippy::too_many_arguments)]
fn search<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    bank: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = arg_k)] k: usize,
    #[pyo3(from_py_with = arg_metric)] metric: String,
    query_groups: Option<&Bound<'py, PyAny>>,
    bank_groups: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = arg_min_score)] min_score: Option<f64>,
    #[pyo3(from_py_with = arg_max_score)] max_score: Option<f64>,
    #[pyo3(from_py_with = arg_threads)] threads: Option<usize>,
    #[pyo3(from_py_with = arg_simd)] simd: Option<String>,
    #[pyo3(from_py_with = arg_check_finite)] check_finite: bool,
) -> PyResult<(Bound<'py, PyArray2F32>, Bound<'py, PyArray2I64>)> {
    let opt = make_options(k, &metric, min_score, max_score, threads, simd.as_deref(), check_finite)?;
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
        Some(o) if !o.is_none() => Some(as_groups_1d(o, "query_groups", &format!("[{}] (one group per query)", qs[0]))?),
        _ => None,
    };
    let bg = match bank_groups {
        Some(o) if !o.is_none() => Some(as_groups_1d(o, "bank_groups", &format!("[{}] (one group per bank row)", bs[0]))?),
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
        query_groups: qg.as_ref().map(|a| a.slice()),
        bank_groups: bg.as_ref().map(|a| a.slice()),
    };
    check_job(&job, None, &qm, &bm, &opt)?;
    let (q, kk) = (job.q, opt.k);
    let (s, i) = py.detach(|| crl_core::search(&job, &opt)).map_err(map_err)?;
    let s = Array2::from_shape_vec((q, kk), s).map_err(shape_err)?.into_pyarray(py);
    let i = Array2::from_shape_vec((q, kk), i).map_err(shape_err)?.into_pyarray(py);
    Ok((s, i))
}

type PyArray2F32 = numpy::PyArray2<f32>;
type PyArray2I64 = numpy::PyArray2<i64>;
type PyArray3F32 = numpy::PyArray3<f32>;
type PyArray3I64 = numpy::PyArray3<i64>;

/// Several banks, each with its own queries, in one call (parallel across banks and query blocks).
#[pyfunction]
#[pyo3(signature = (queries, banks, k, *, metric=String::from("ip"), query_groups=None, bank_groups=None,
                    min_score=None, max_score=None, threads=None, simd=None, check_finite=true),
       text_signature = "(queries, banks, k, *, metric=\"ip\", query_groups=None, bank_groups=None, min_score=None, max_score=None, threads=None, simd=None, check_finite=True)")]
#[allow(clippy::too_many_arguments)]
fn search_many<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    banks: &Bound<'py, PyAny>,
    #[pyo3(from_py_with = arg_k)] k: usize,
    #[pyo3(from_py_with = arg_metric)] metric: String,
    query_groups: Option<&Bound<'py, PyAny>>,
    bank_groups: Option<&Bound<'py, PyAny>>,
    #[pyo3(from_py_with = arg_min_score)] min_score: Option<f64>,
    #[pyo3(from_py_with = arg_max_score)] max_score: Option<f64>,
    #[pyo3(from_py_with = arg_threads)] threads: Option<usize>,
    #[pyo3(from_py_with = arg_simd)] simd: Option<String>,
    #[pyo3(from_py_with = arg_check_finite)] check_finite: bool,
) -> PyResult<(Bound<'py, PyArray3F32>, Bound<'py, PyArray3I64>)> {
    let opt = make_options(k, &metric, min_score, max_score, threads, simd.as_deref(), check_finite)?;
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
    let max_n = jobs.iter().map(|j| j.n).max().unwrap_or(0);
    let rows = nl.checked_mul(q).ok_or_else(|| PyValueError::new_err("queries: too many queries"))?;
    crl_core::validate(&jobs, &opt).map_err(map_err)?;
    let (s, i) = py
        .detach(|| {
            let (mut s, mut i) = crl_core::alloc_output(rows, kk, max_n)?;
            crl_core::search_many(&jobs, &opt, &mut s, &mut i).map(|_| (s, i))
        })
        .map_err(map_err)?;
    let s = Array3::from_shape_vec((nl, q, kk), s).map_err(shape_err)?.into_pyarray(py);
    let i = Array3::from_shape_vec((nl, q, kk), i).map_err(shape_err)?.into_pyarray(py);
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

/// Measured arithmetic peak in GFLOP/s of `simd`'s multiply-add (`vdpbf16ps` for bf16 on the
/// AVX512-BF16 path, fp32 FMA otherwise) on `threads` threads: a register-only loop, about
/// `seconds` long. The ceiling the mining benchmark holds its GEMM path to.
#[pyfunction]
#[pyo3(signature = (*, bf16 = true, simd = None, threads = None, seconds = 0.2))]
fn peak_gflops(py: Python<'_>, bf16: bool, simd: Option<&str>, threads: Option<usize>, seconds: f64) -> PyResult<f64> {
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 60.0) {
        return Err(PyValueError::new_err(format!("seconds: expected a number in (0, 60], got {seconds}")));
    }
    let s = resolve_simd(simd)?;
    let t = threads.unwrap_or(0);
    py.detach(|| crl_core::peak_flops(s, bf16, t, seconds))
        .map(|f| f / 1e9)
        .map_err(|e| PyValueError::new_err(e.to_string()))
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
    m.add_function(wrap_pyfunction!(peak_gflops, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
