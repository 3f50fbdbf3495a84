"""Native core of crl: exact top-k search (Rust, pyo3).

Exact (brute-force, not approximate) top-k search of queries against a bank, the hot loop of
hard-negative mining. Element types: ``float32``, or bfloat16 passed as its raw 16-bit pattern in an
``int16`` or ``uint16`` array (what ``tensor.view(torch.int16).numpy()`` gives for a bf16 tensor).
Queries and bank must have the same element type. Arrays must be C-contiguous and are used in place,
never copied (a non-contiguous array raises ``ValueError`` instead of being silently copied); do not
modify them from another thread during a call. The one exception: a C-contiguous array whose data is
not aligned for its dtype (e.g. ``np.frombuffer(buf, np.float32, offset=1)``) is copied once into an
aligned buffer, with the same results as an aligned copy.

Scores are float32 and ordered best first:

* ``metric="ip"``: inner product, descending.
* ``metric="cosine"``: cosine similarity, descending (a zero vector has cosine 0 with everything).
* ``metric="l2"``: **squared** Euclidean distance, *ascending* (computed as
  ``|q|^2 - 2 q.b + |b|^2``, clamped at 0, like FAISS ``IndexFlatL2``).

Where fewer than ``k`` bank entries qualify (``k > N``, group exclusion, score window), the remaining
slots hold id ``-1`` and the worst score: ``-inf`` for ``ip``/``cosine``, ``+inf`` for ``l2``.
Ties are broken by the smaller bank id. ``k > N`` is allowed (the output is always ``[Q, k]``), but
a ``k > N`` whose padded output (12 bytes a slot, at least one row) would exceed the machine's
memory or address space raises ``ValueError`` naming ``k`` (an absurd ``k`` such as ``2**40``); an
output of real results (``k <= N``) that cannot be allocated raises ``MemoryError``. Never an abort.

Tiny and huge vectors: ``cosine`` and ``l2`` run in fp32 for vectors whose squared norm is 0 or in
``[1e-30, 1e30]``; a pair with a query or bank row outside that range (finite, but so small or so
large that fp32 norms or products would underflow or overflow) is scored in float64 from the
original values (cosine as ``q.b / (|q| |b|)``, l2 as the sum of squared differences), so its score
is the float64 score rounded to float32 (slower, but only for those pairs). Likewise any finite pair
whose fp32 score is not finite (e.g. an ``ip`` partial sum overflowing) is recomputed in float64. A
score whose true value does not fit in float32 (``ip`` or ``l2`` of huge vectors; never ``cosine``)
raises ``ValueError`` starting with ``queries`` or ``bank``, whichever has the larger norm, with
``check_finite`` (without it, such a score never qualifies).

fp32 results equal a brute-force search up to summation-order rounding. bf16 inputs are multiplied
exactly and accumulated in fp32 (``vdpbf16ps`` on the ``avx512bf16`` path up to 8 queries, and
beyond where the CPU's fp32 FMAs are not faster; widening to fp32 otherwise), so they equal a brute
force over the same bf16 values up to summation-order rounding (``vdpbf16ps`` treats bf16
subnormals as zero, as the instruction does).

Filters run inside the search loop, before the top-k: with ``query_groups`` [Q] and ``bank_groups``
[N] (int64, given together), bank rows whose group equals the query's group are skipped (exclude the
query's own sample or class). ``min_score``/``max_score`` keep only entries with
``min_score <= score <= max_score`` (in the metric's units, so squared distance for ``l2``), e.g. a
semi-hard negative window.

The GIL is released during the search. Work runs on a dedicated rayon thread pool per thread count
(created on first use and cached; ``threads=None`` means all cores), split across banks, bank chunks
and query blocks. The SIMD path is chosen at run time: ``simd=`` argument, else the ``CRL_SIMD``
environment variable, else the best the CPU supports (see :func:`simd_paths`). Few queries (<= 8)
stream each bank row once against all queries; more queries run a register-blocked GEMM
micro-kernel over cache-sized bank blocks with the top-k check fused after each tile.

Errors: wrong types or dtypes (of arrays and of ``k``, ``metric``, ``min_score``, ``threads``, ...)
raise ``TypeError``; bad shapes (including group arrays that are not 1-D in :func:`search`),
non-contiguous arrays, ``k < 1`` or too large a ``k`` (see above), an empty bank, group arrays of
the wrong length, ``min_score > max_score``, ``threads`` outside ``[1, max(1024, cores)]``, an
unknown or unsupported SIMD path, NaN/Inf in queries or bank (when ``check_finite``) and scores
overflowing float32 raise ``ValueError``. Every message starts with the name of the offending
argument. No input makes the extension panic or abort the interpreter.
"""

from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

Metric = Literal["ip", "cosine", "l2"]
SimdPath = Literal["auto", "avx512bf16", "avx512", "avx2", "scalar"]

def search(
    queries: npt.NDArray[np.float32] | npt.NDArray[np.int16] | npt.NDArray[np.uint16],
    bank: npt.NDArray[np.float32] | npt.NDArray[np.int16] | npt.NDArray[np.uint16],
    k: int,
    *,
    metric: Metric = "ip",
    query_groups: npt.NDArray[np.int64] | None = None,
    bank_groups: npt.NDArray[np.int64] | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    threads: int | None = None,
    simd: SimdPath | None = None,
    check_finite: bool = True,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact top-k of ``queries`` [Q, d] against ``bank`` [N, d].

    Args:
        queries: [Q, d] float32, or bf16 bits as int16/uint16; C-contiguous. Q may be 0.
        bank: [N, d], same dtype as ``queries``; C-contiguous; N >= 1.
        k: results per query, >= 1. ``k > N`` is allowed: the extra slots are padding (a ``k > N``
            whose padded output would not fit in memory raises ``ValueError``).
        metric: ``"ip"``, ``"cosine"`` or ``"l2"`` (squared distance, ascending).
        query_groups: [Q] int64 (1-D); with ``bank_groups``, bank rows of the query's own group are
            excluded.
        bank_groups: [N] int64 (1-D).
        min_score: keep only entries scoring >= this (metric units). None: no lower bound.
        max_score: keep only entries scoring <= this. None: no upper bound.
        threads: worker threads, ``1 <= threads <= max(1024, cores)``; None: all cores.
        simd: force a SIMD path (``"avx512bf16"``, ``"avx512"``, ``"avx2"``, ``"scalar"``, ``"auto"``);
            None: ``CRL_SIMD`` or the best available. For float32 input ``"avx512bf16"`` runs the
            AVX-512 fp32 kernels.
        check_finite: raise ValueError on NaN/Inf in queries (checked up front) or bank (detected
            inside the search at no extra pass: a non-finite bank value makes its scores non-finite),
            and on scores overflowing float32. With False, non-finite queries, bank rows and
            overflowing scores never qualify.

    Returns:
        ``(scores, ids)``: float32 [Q, k] and int64 [Q, k], best first; padding id -1 with score
        -inf (+inf for ``l2``).
    """

def search_many(
    queries: list[npt.NDArray[np.float32]] | list[npt.NDArray[np.int16]] | list[npt.NDArray[np.uint16]] | npt.NDArray[np.float32] | npt.NDArray[np.int16] | npt.NDArray[np.uint16],
    banks: list[npt.NDArray[np.float32]] | list[npt.NDArray[np.int16]] | list[npt.NDArray[np.uint16]] | npt.NDArray[np.float32] | npt.NDArray[np.int16] | npt.NDArray[np.uint16],
    k: int,
    *,
    metric: Metric = "ip",
    query_groups: npt.NDArray[np.int64] | list[npt.NDArray[np.int64]] | None = None,
    bank_groups: npt.NDArray[np.int64] | list[npt.NDArray[np.int64]] | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    threads: int | None = None,
    simd: SimdPath | None = None,
    check_finite: bool = True,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Search several banks (e.g. one per layer), each with its own queries, in one parallel call.

    Equal to ``search(queries[l], banks[l], k, ...)`` for every ``l``, but all banks run in one
    parallel region (across banks, bank chunks and query blocks) with the GIL released once.

    Args:
        queries: a 3-D array [L, Q, d] or a list of L 2-D arrays [Q, d_l] (same Q for every bank).
        banks: a 3-D array [L, N, d] or a list of L 2-D arrays [N_l, d_l] (N and d may differ per
            bank in the list form; each bank's d must match its queries').
        k: results per query, >= 1 (``k`` larger than a bank pads; see :func:`search`).
        query_groups: None, a 1-D int64 array [Q] shared by all banks, a 2-D array [L, Q], or a
            list of L 1-D arrays.
        bank_groups: None, a 1-D int64 array [N] shared by all banks, a 2-D array [L, N], or a
            list of L 1-D arrays [N_l].
        metric, min_score, max_score, threads, simd, check_finite: as in :func:`search`.

    Returns:
        ``(scores, ids)``: float32 [L, Q, k] and int64 [L, Q, k].
    """

def simd_paths() -> list[str]:
    """The SIMD paths this CPU supports, best first, e.g.
    ``["avx512bf16", "avx512", "avx2", "scalar"]`` (``"scalar"`` is always there)."""

def simd_path() -> str:
    """The path a call without ``simd=`` uses: ``CRL_SIMD`` if set (ValueError if unsupported),
    else the best supported one."""

def default_threads() -> int:
    """The number of threads a call without ``threads=`` uses (all cores)."""


def peak_gflops(*, bf16: bool = True, simd: SimdPath | None = None, threads: int | None = None, seconds: float = 0.2) -> float:
    """Measured arithmetic peak in GFLOP/s of the SIMD path's multiply-add (``vdpbf16ps`` for bf16 on
    the AVX512-BF16 path, fp32 FMA otherwise) on ``threads`` threads: a register-only loop about
    ``seconds`` long (in (0, 60]). The ceiling ``crl bench mining`` holds its GEMM path to."""
