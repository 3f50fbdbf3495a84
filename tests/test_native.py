"""crl._native against a numpy brute force, on every SIMD path this CPU has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

native = pytest.importorskip("crl._native", reason="the native extension is not built (pip install -e .)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ALL_PATHS = ["avx512bf16", "avx512", "avx2", "scalar"]
SUPPORTED = native.simd_paths()


def path_param(p: str):
    return pytest.param(
        p, marks=pytest.mark.skipif(p not in SUPPORTED, reason=f"this CPU lacks the {p} path (has {SUPPORTED})")
    )


PATHS = [path_param(p) for p in ALL_PATHS]


# --------------------------------------------------------------------------------------------
# reference


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (independent of the Rust code)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return r.astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def brute_scores(q: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    q64, b64 = q.astype(np.float64), b.astype(np.float64)
    dot = q64 @ b64.T
    if metric == "ip":
        return dot
    qn = np.sqrt((q64 * q64).sum(1))
    bn = np.sqrt((b64 * b64).sum(1))
    if metric == "cosine":
        den = qn[:, None] * bn[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, dot / np.where(den > 0, den, 1), 0.0)
    return ((q64[:, None, :] - b64[None, :, :]) ** 2).sum(-1)


def tolerance(q: np.ndarray, b: np.ndarray, metric: str, s: np.ndarray) -> np.ndarray:
    q64, b64 = q.astype(np.float64), b.astype(np.float64)
    qn = np.sqrt((q64 * q64).sum(1))[:, None]
    bn = np.sqrt((b64 * b64).sum(1))[None, :]
    if metric == "ip":
        return 1e-5 * (np.abs(s) + qn * bn) + 1e-30
    if metric == "cosine":
        return 1e-5 * (1 + np.abs(s))
    return 1e-5 * (s + qn**2 + bn**2) + 1e-30


def check(q, b, k, metric, scores, ids, qg=None, bg=None, lo=-np.inf, hi=np.inf):
    """Scores within tolerance of the brute force, ids identical up to (near-)ties."""
    S = brute_scores(q, b, metric)
    T = tolerance(q, b, metric, S)
    Q, N = S.shape
    assert scores.shape == (Q, k) and ids.shape == (Q, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    worst = np.inf if metric == "l2" else -np.inf
    sign = 1.0 if metric == "l2" else -1.0  # sort key: ascending of sign * score
    S32 = S.astype(np.float32)
    for i in range(Q):
        gok = np.ones(N, bool) if qg is None else (bg != qg[i])
        ok = gok & (S32[i] >= lo) & (S32[i] <= hi)
        # entries within tolerance of a window edge may go either way
        ambiguous = bool((gok & ((np.abs(S[i] - lo) <= 2 * T[i]) | (np.abs(S[i] - hi) <= 2 * T[i]))).any())
        cand = np.flatnonzero(ok)
        order = cand[np.lexsort((cand, sign * S[i, cand]))]
        exp_ids = order[:k]
        got = ids[i]
        valid = got >= 0
        nv = int(valid.sum())
        # padding is a suffix: id -1 with the worst score
        assert valid[:nv].all(), (i, got)
        assert np.all(scores[i, nv:] == worst), (i, scores[i])
        g = got[:nv]
        assert len(set(g.tolist())) == nv, ("duplicate ids", g)
        # each returned entry qualifies (group strictly, window within tolerance) with its own score
        assert np.all(gok[g]), (i, g)
        assert np.all(S[i, g] >= lo - 2 * T[i, g]) and np.all(S[i, g] <= hi + 2 * T[i, g])
        assert np.all(np.abs(scores[i, :nv] - S[i, g]) <= T[i, g]), (i, scores[i, :nv], S[i, g])
        # best first, by the returned scores
        assert np.all(np.diff(sign * scores[i, :nv].astype(np.float64)) >= 0), scores[i]
        if ambiguous:
            continue
        assert nv == min(k, len(cand)), (i, nv, len(cand), got, exp_ids)
        # scores equal the expected top-k scores position by position
        assert np.all(np.abs(scores[i, :nv] - S[i, exp_ids]) <= 2 * T[i, exp_ids]), (i, scores[i], S[i, exp_ids])
        # ids identical wherever the expected score is separated from its neighbours (else a tie)
        full, tt = S[i, order], T[i, order]
        for p in range(nv):
            if p > 0 and abs(full[p] - full[p - 1]) <= 2 * (tt[p] + tt[p - 1]):
                continue
            if p + 1 < len(full) and abs(full[p] - full[p + 1]) <= 2 * (tt[p] + tt[p + 1]):
                continue
            assert got[p] == exp_ids[p], (i, p, got, exp_ids)


# --------------------------------------------------------------------------------------------
# property tests against the brute force

case = st.fixed_dictionaries(
    {
        "Q": st.sampled_from([1, 1, 2, 3, 5, 8, 9, 16, 17, 33, 40]),
        "N": st.integers(1, 300),
        "d": st.sampled_from([1, 3, 7, 15, 16, 17, 31, 32, 33, 47, 64, 70]),
        "k": st.integers(1, 20),
        "metric": st.sampled_from(["ip", "cosine", "l2"]),
        "groups": st.booleans(),
        "window": st.booleans(),
        "ints": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
        "threads": st.sampled_from([None, 1, 2]),
    }
)


def make_data(c):
    rng = np.random.default_rng(c["seed"])
    if c["ints"]:  # small integers: exact ties, exact sums
        q = rng.integers(-2, 3, (c["Q"], c["d"])).astype(np.float32)
        b = rng.integers(-2, 3, (c["N"], c["d"])).astype(np.float32)
    else:
        q = rng.standard_normal((c["Q"], c["d"]), dtype=np.float32)
        b = rng.standard_normal((c["N"], c["d"]), dtype=np.float32)
    qg = bg = None
    if c["groups"]:
        qg = rng.integers(0, 4, c["Q"]).astype(np.int64)
        bg = rng.integers(0, 4, c["N"]).astype(np.int64)
    return rng, q, b, qg, bg


def pick_window(rng, S, metric):
    """A window whose edges sit in gaps of the score distribution (no boundary ambiguity)."""
    v = np.unique(S.astype(np.float32).ravel())
    if len(v) < 3:
        return None, None
    i, j = sorted(rng.integers(0, len(v) - 1, 2))
    lo = float((v[i] + v[i + 1]) / 2) if rng.random() < 0.7 else None
    hi = float((v[j] + v[j + 1]) / 2) if rng.random() < 0.7 else None
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    return lo, hi


def run_case(c, simd, bf16, bits_dtype=np.int16):
    rng, q, b, qg, bg = make_data(c)
    if bf16:
        qb, bb = bf16_bits(q), bf16_bits(b)
        q, b = bf16_to_f32(qb), bf16_to_f32(bb)  # the reference sees the same rounded values
        qa, ba = qb.view(bits_dtype), bb.view(bits_dtype)
    else:
        qa, ba = q, b
    lo = hi = None
    if c["window"]:
        lo, hi = pick_window(rng, brute_scores(q, b, c["metric"]), c["metric"])
    s, i = native.search(
        qa, ba, c["k"], metric=c["metric"], query_groups=qg, bank_groups=bg,
        min_score=lo, max_score=hi, threads=c["threads"], simd=simd,
    )
    check(q, b, c["k"], c["metric"], s, i, qg, bg,
          -np.inf if lo is None else lo, np.inf if hi is None else hi)


SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("simd", PATHS)
@SETTINGS
@given(c=case)
def test_float32_matches_bruteforce(simd, c):
    run_case(c, simd, bf16=False)


@pytest.mark.parametrize("simd", PATHS)
@SETTINGS
@given(c=case, bits=st.sampled_from([np.int16, np.uint16]))
def test_bfloat16_matches_bruteforce_on_rounded_values(simd, c, bits):
    run_case(c, simd, bf16=True, bits_dtype=bits)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("Q,N,d", [(1, 1000, 300), (7, 500, 257), (64, 700, 130)])
def test_larger_shapes(simd, Q, N, d):
    c = dict(Q=Q, N=N, d=d, k=10, metric="ip", groups=True, window=False, ints=False, seed=Q * N + d, threads=2)
    run_case(c, simd, bf16=False)
    run_case(dict(c, metric="l2"), simd, bf16=True)


def test_padding_when_fewer_than_k_qualify():
    q = np.eye(2, 4, dtype=np.float32)
    b = np.eye(3, 4, dtype=np.float32)
    s, i = native.search(q, b, 5)
    assert i.tolist() == [[0, 1, 2, -1, -1], [1, 0, 2, -1, -1]]
    assert s[0].tolist() == [1, 0, 0, -np.inf, -np.inf]
    s, i = native.search(q, b, 5, metric="l2")
    assert i[0].tolist() == [0, 1, 2, -1, -1] and s[0, 3:].tolist() == [np.inf, np.inf]
    s, i = native.search(q, b, 2, query_groups=np.array([0, 1]), bank_groups=np.array([0, 1, 1]))
    assert i.tolist() == [[1, 2], [0, -1]]
    s, i = native.search(q, b, 2, min_score=0.5)
    assert i.tolist() == [[0, -1], [1, -1]]
    s, i = native.search(q[:0], b, 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)


def test_int16_and_uint16_bits_agree():
    rng = np.random.default_rng(1)
    q = bf16_bits(rng.standard_normal((5, 40), dtype=np.float32))
    b = bf16_bits(rng.standard_normal((90, 40), dtype=np.float32))
    s1, i1 = native.search(q, b, 7)
    s2, i2 = native.search(q.view(np.int16), b.view(np.int16), 7)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_torch_bf16_view():
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 33, generator=g).to(torch.bfloat16)
    b = torch.randn(50, 33, generator=g).to(torch.bfloat16)
    s, i = native.search(q.view(torch.int16).numpy(), b.view(torch.int16).numpy(), 4)
    ref = (q.float() @ b.float().T).topk(4)
    np.testing.assert_allclose(s, ref.values.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(i, ref.indices.numpy())


# --------------------------------------------------------------------------------------------
# several banks


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("bf16", [False, True])
def test_search_many_equals_per_bank(simd, bf16):
    rng = np.random.default_rng(5)
    L, Q, N, d = 3, 6, 120, 24
    qs = rng.standard_normal((L, Q, d), dtype=np.float32)
    bs = rng.standard_normal((L, N, d), dtype=np.float32)
    if bf16:
        qs, bs = bf16_bits(qs).view(np.int16), bf16_bits(bs).view(np.int16)
    qg = rng.integers(0, 3, (L, Q)).astype(np.int64)
    bg = rng.integers(0, 3, (L, N)).astype(np.int64)
    for kw in [{}, {"query_groups": qg, "bank_groups": bg}, {"metric": "cosine", "min_score": -0.2}]:
        s3, i3 = native.search_many(qs, bs, 5, simd=simd, **kw)
        assert s3.shape == (L, Q, 5) and i3.shape == (L, Q, 5)
        kl = {k: (list(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
        sl, il = native.search_many(list(qs), list(bs), 5, simd=simd, **kl)
        np.testing.assert_array_equal(s3, sl)
        np.testing.assert_array_equal(i3, il)
        for layer in range(L):
            kw1 = {k: (v[layer] if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
            s1, i1 = native.search(qs[layer], bs[layer], 5, simd=simd, **kw1)
            np.testing.assert_array_equal(s3[layer], s1)
            np.testing.assert_array_equal(i3[layer], i1)
    # different bank sizes in the list form, groups shared / per bank
    banks = [bs[0][:50], bs[1], bs[2][:7]]
    bgl = [bg[0][:50], bg[1], bg[2][:7]]
    s, i = native.search_many(list(qs), banks, 9, query_groups=qg[0], bank_groups=bgl, simd=simd)
    for layer in range(L):
        s1, i1 = native.search(qs[layer], banks[layer], 9, query_groups=qg[0], bank_groups=bgl[layer], simd=simd)
        np.testing.assert_array_equal(s[layer], s1)
        np.testing.assert_array_equal(i[layer], i1)


# --------------------------------------------------------------------------------------------
# bad input


def _raises(exc, match, f, *a, **kw):
    with pytest.raises(exc) as e:
        f(*a, **kw)
    assert match in str(e.value), str(e.value)
    return str(e.value)


def test_bad_input_errors_name_the_argument():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 8), dtype=np.float32)
    b = rng.standard_normal((20, 8), dtype=np.float32)
    S = native.search
    _raises(TypeError, "queries", S, q.astype(np.float64), b, 3)
    _raises(TypeError, "bank", S, q, b.astype(np.float16), 3)
    _raises(TypeError, "queries", S, q.tolist(), b, 3)
    _raises(TypeError, "bank", S, q, bf16_bits(b), 3)  # dtype mismatch
    _raises(ValueError, "queries", S, q[:, ::2], b[:, :4], 3)  # non-contiguous
    _raises(ValueError, "bank", S, q, np.asfortranarray(b), 3)
    _raises(ValueError, "bank", S, q, b[::2], 3)
    _raises(ValueError, "queries", S, q[0], b, 3)  # 1-D
    _raises(ValueError, "bank", S, q, b[:, :7].copy(), 3)  # d mismatch
    _raises(ValueError, "k", S, q, b, 0)
    _raises(ValueError, "k", S, q, b, -2)
    _raises(ValueError, "bank", S, q, b[:0], 3)  # empty bank
    _raises(ValueError, "query_groups", S, q, b, 3, query_groups=np.zeros(3, np.int64), bank_groups=np.zeros(20, np.int64))
    _raises(ValueError, "bank_groups", S, q, b, 3, query_groups=np.zeros(4, np.int64), bank_groups=np.zeros(21, np.int64))
    _raises(TypeError, "query_groups", S, q, b, 3, query_groups=np.zeros(4, np.int32), bank_groups=np.zeros(20, np.int64))
    _raises(ValueError, "query_groups", S, q, b, 3, query_groups=np.zeros(4, np.int64))
    _raises(ValueError, "min_score", S, q, b, 3, min_score=1.0, max_score=0.0)
    _raises(ValueError, "metric", S, q, b, 3, metric="hamming")
    _raises(ValueError, "threads", S, q, b, 3, threads=0)
    _raises(ValueError, "simd", S, q, b, 3, simd="neon")
    for bad in [np.nan, np.inf, -np.inf]:
        q2 = q.copy()
        q2[2, 3] = bad
        _raises(ValueError, "queries", S, q2, b, 3)
        b2 = b.copy()
        b2[17, 5] = bad
        for simd in SUPPORTED:
            for metric in ["ip", "cosine", "l2"]:
                m = _raises(ValueError, "bank", S, q, b2, 3, simd=simd, metric=metric)
                assert "row 17" in m
                m = _raises(ValueError, "bank", S, q[:1], b2, 3, simd=simd, metric=metric)
        bb = bf16_bits(b2)
        _raises(ValueError, "bank", S, bf16_bits(q), bb, 3)
        # check_finite=False: no error, the bad row never qualifies
        s, i = S(q, b2, 20, check_finite=False)
        assert 17 not in i
    M = native.search_many
    _raises(ValueError, "banks", M, [q, q], [b], 3)
    _raises(ValueError, "banks[1]", M, [q, q], [b, b[:, :4].copy()], 3)
    _raises(ValueError, "queries[1]", M, [q, q[:2]], [b, b], 3)
    _raises(TypeError, "queries[0]", M, [q.astype(np.float64)], [b], 3)
    _raises(ValueError, "queries", M, q, b, 3)  # 2-D where 3-D (or a list) is expected
    _raises(ValueError, "bank_groups", M, [q, q], [b, b], 3, query_groups=np.zeros(4, np.int64),
            bank_groups=[np.zeros(20, np.int64)])


def test_no_copy_and_no_mutation():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((50, 16), dtype=np.float32)
    q = rng.standard_normal((3, 16), dtype=np.float32)
    b.flags.writeable = False  # read-only arrays are fine (used in place)
    bc = b.copy()
    native.search(q, b, 4)
    np.testing.assert_array_equal(b, bc)
    # a transposed view is not silently copied
    _raises(ValueError, "C-contiguous", native.search, q, np.ascontiguousarray(b.T).T, 4)


# --------------------------------------------------------------------------------------------
# SIMD selection, threads, GIL


def test_simd_selection():
    assert "scalar" in SUPPORTED
    assert native.simd_path() in SUPPORTED
    env = dict(os.environ, CRL_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", "import crl._native as n; print(n.simd_path())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["CRL_SIMD"] = "bogus"
    out = subprocess.run([sys.executable, "-c", "import crl._native as n, numpy as np; "
                          "n.search(np.ones((1,2),np.float32), np.ones((3,2),np.float32), 1)"],
                         env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "CRL_SIMD" in out.stderr
    for p in ALL_PATHS:
        if p not in SUPPORTED:
            _raises(ValueError, "simd", native.search, np.ones((1, 2), np.float32), np.ones((3, 2), np.float32), 1, simd=p)


def test_gil_released():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((60000, 256), dtype=np.float32)
    q = rng.standard_normal((64, 256), dtype=np.float32)
    done = threading.Event()
    t0 = time.perf_counter()

    def work():
        for _ in range(3):
            native.search(q, b, 10, threads=1)
        done.set()

    th = threading.Thread(target=work)
    th.start()
    ticks = 0
    while not done.is_set():
        time.sleep(0.001)
        ticks += 1
    th.join()
    elapsed = time.perf_counter() - t0
    # with the GIL held the main thread could only run between calls
    assert ticks >= 10 and ticks >= 0.2 * elapsed / 0.001 / 10, (ticks, elapsed)


# --------------------------------------------------------------------------------------------
# benchmark smoke test


def test_bench_quick(tmp_path):
    pytest.importorskip("crl.benchmarks.mining")
    from crl.benchmarks import mining

    out = tmp_path / "mining.json"
    assert mining.main(["--quick", "--output", str(out), "--repeats", "1"]) == 0
    data = json.loads(out.read_text())
    assert data["results"], data
    backends = {r["backend"] for r in data["results"]}
    assert {"crl-fp32", "crl-bf16", "numpy"} <= backends
    assert {"torch-fp32", "torch-bf16"} <= backends  # what a PyTorch user types first, by default
    for r in data["results"]:
        assert r["seconds"] > 0 and r["gflops"] > 0
        assert 0.0 <= r["recall_at_k"] <= 1.0
        if r["backend"].startswith(("crl-", "numpy", "faiss")):
            assert r["recall_at_k"] == 1.0, r  # exact on the inputs it was given
    assert data["machine"]["threads"] >= 1 and data["machine"]["read_gbps"] > 0


def test_peak_probe():
    assert native.peak_gflops(threads=1, seconds=0.01) > 0.1
    assert native.peak_gflops(bf16=False, simd="scalar", threads=1, seconds=0.01) > 0.01
    with pytest.raises(ValueError, match="seconds"):
        native.peak_gflops(seconds=0)
    with pytest.raises(ValueError, match="simd"):
        native.peak_gflops(simd="sse9")


def test_recall_at_k_against_brute_force():
    """The benchmark's recall@k: exact answers score 1.0 (ties at the k-th score too); a wrong id counts."""
    from crl.benchmarks.mining import exact_kth_scores, recall_at_k, result_ids

    rng = np.random.default_rng(0)
    q, b = rng.standard_normal((5, 16)).astype(np.float32), rng.standard_normal((50, 16)).astype(np.float32)
    b[7] = b[3]  # a tie
    ref = exact_kth_scores([q], [b], 4, chunk=16)
    exact = np.argsort(-(q.astype(np.float64) @ b.astype(np.float64).T), axis=1)[:, :4]
    assert recall_at_k([exact], ref, 4) == 1.0
    wrong = exact.copy()
    wrong[0, 0] = np.argsort(q[0].astype(np.float64) @ b.T.astype(np.float64))[0]  # the worst match
    assert recall_at_k([wrong], ref, 4) == pytest.approx(19 / 20)
    dup = exact.copy()
    dup[1, 1] = dup[1, 0]  # a duplicate id is one result, not two
    assert recall_at_k([dup], ref, 4) == pytest.approx(19 / 20)
    # every backend's output shape is read the same
    scores = np.zeros((5, 4), np.float32)
    assert all(np.array_equal(x, exact) for x in result_ids((scores, exact)))
    assert np.array_equal(result_ids((scores[None], exact[None]))[0], exact)
    assert np.array_equal(result_ids([(scores, exact)])[0], exact)


# --------------------------------------------------------------------------------------------
# reliability (issue 19): huge k, unaligned arrays, tiny/huge vectors, never a panic


def _run_isolated(code: str, timeout: float = 120) -> dict:
    """Run `code` (after BAD_SETUP) in a fresh interpreter: a case that could abort the process
    (e.g. an allocation of k slots) must not take pytest down with it."""
    script = BAD_SETUP + "\n" + textwrap.dedent(
        f"""
        import json
        try:
            r = eval({code!r})
            out = {{"type": None, "msg": ""}}
        except BaseException as e:
            out = {{"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "msg": str(e)}}
        print("RESULT " + json.dumps(out))
        """
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, f"{code}: the interpreter died (rc {p.returncode}): {p.stderr[-2000:]}"
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_huge_k_raises_valueerror_never_aborts():
    for code in ["S(q, b, 2**40)", "S(q, b, 2**62)", "S(q, b, 2**63 - 1)", "S(q, b, 2**64)", "S(q, b, 10**30)",
                 "S(q[:0], b, 2**40)", "S(q, b, 2**40, metric='l2')",
                 "M([q, q], [b, b[:5].copy()], 2**40)", "M(np.stack([q, q]), np.stack([b, b]), 2**62)",
                 "M([q], [b], 2**40, query_groups=g4, bank_groups=g20)"]:
        r = _run_isolated(code)
        assert r["type"] == "ValueError" and r["msg"].startswith("k:"), (code, r)
        assert "too large" in r["msg"] and "padding" in r["msg"], (code, r)


def test_k_larger_than_the_bank_pads():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 8), dtype=np.float32)
    b = rng.standard_normal((20, 8), dtype=np.float32)
    for metric, worst in [("ip", -np.inf), ("cosine", -np.inf), ("l2", np.inf)]:
        s, i = native.search(q, b, 100_000, metric=metric)
        assert s.shape == i.shape == (3, 100_000)
        s20, i20 = native.search(q, b, 20, metric=metric)
        np.testing.assert_array_equal(i[:, :20], i20)
        np.testing.assert_array_equal(s[:, :20], s20)
        assert (i[:, 20:] == -1).all() and (s[:, 20:] == worst).all()
        s, i = native.search_many([q, q], [b, b[:5].copy()], 30, metric=metric)
        assert s.shape == (2, 3, 30) and (i[1, :, 5:] == -1).all() and (i[0, :, :20] >= 0).all()
    s, i = native.search(q[:0], b, 10**6)
    assert s.shape == (0, 10**6)


def unaligned(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `a` whose data is not aligned for its dtype (offset 1 in a bytearray)."""
    buf = bytearray(a.nbytes + 1)
    u = np.frombuffer(buf, a.dtype, offset=1, count=a.size).reshape(a.shape)
    u[...] = a
    assert u.flags.c_contiguous and not u.flags.aligned
    return u


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("bf16", [False, True])
def test_unaligned_arrays_give_the_results_of_aligned_copies(simd, bf16):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((10, 20), dtype=np.float32)
    b = rng.standard_normal((80, 20), dtype=np.float32)
    if bf16:
        q, b = bf16_bits(q).view(np.int16), bf16_bits(b).view(np.int16)
    qg = rng.integers(0, 3, 10).astype(np.int64)
    bg = rng.integers(0, 3, 80).astype(np.int64)
    # the example of the issue: 80 floats at offset 1 of a 321-byte buffer
    raw = np.frombuffer(bytearray(321), np.float32, offset=1, count=80).reshape(4, 20)
    assert not raw.flags.aligned
    native.search(raw, raw, 2, simd=simd) if not bf16 else None
    for metric in ["ip", "cosine", "l2"]:
        want = native.search(q, b, 7, metric=metric, query_groups=qg, bank_groups=bg, simd=simd)
        for qa, ba, qga, bga in [(unaligned(q), b, qg, bg), (q, unaligned(b), qg, bg),
                                 (q, b, unaligned(qg), unaligned(bg)), (unaligned(q), unaligned(b), unaligned(qg), bg)]:
            got = native.search(qa, ba, 7, metric=metric, query_groups=qga, bank_groups=bga, simd=simd)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
        wm = native.search_many([q, q[:, :10].copy()], [b, b[:40, :10].copy()], 5, metric=metric, simd=simd,
                                query_groups=qg, bank_groups=[bg, bg[:40].copy()])
        gm = native.search_many([unaligned(q), unaligned(q[:, :10])], [unaligned(b), b[:40, :10].copy()], 5,
                                metric=metric, simd=simd, query_groups=unaligned(qg),
                                bank_groups=[unaligned(bg), unaligned(bg[:40])])
        np.testing.assert_array_equal(gm[0], wm[0])
        np.testing.assert_array_equal(gm[1], wm[1])
        w3 = native.search_many(np.stack([q, q]), np.stack([b, b]), 5, metric=metric, simd=simd,
                                query_groups=np.stack([qg, qg]), bank_groups=np.stack([bg, bg]))
        g3 = native.search_many(unaligned(np.stack([q, q])), unaligned(np.stack([b, b])), 5, metric=metric,
                                simd=simd, query_groups=unaligned(np.stack([qg, qg])),
                                bank_groups=unaligned(np.stack([bg, bg])))
        np.testing.assert_array_equal(g3[0], w3[0])
        np.testing.assert_array_equal(g3[1], w3[1])


def test_cosine_of_tiny_vectors_example():
    b = np.array([[1, 0], [0, 1]], np.float32)
    for simd in SUPPORTED:
        s, i = native.search(np.array([[1e-40, 0]], np.float32), b, 2, metric="cosine", simd=simd)
        np.testing.assert_array_equal(i, [[0, 1]])
        np.testing.assert_allclose(s, [[1, 0]], atol=1e-6)
        s, i = native.search(b, np.array([[0, 3e-42], [1e-40, 1e-40]], np.float32), 2, metric="cosine", simd=simd)
        np.testing.assert_array_equal(i, [[1, 0], [0, 1]])
        np.testing.assert_allclose(s, [[2**-0.5, 0], [1, 2**-0.5]], atol=1e-6)


@pytest.mark.parametrize("simd", PATHS)
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("Q", [2, 20])
def test_tiny_and_huge_vectors_match_float64(simd, bf16, Q):
    rng = np.random.default_rng(3)
    scales = [1e-42, 1e-38, 1e-30, 1e-20, 1e-12, 1.0, 1e12, 1e18, 1e25, 1e35]
    for qs in scales:
        for bs in [1e-40, 1e-20, 1.0, 1e20, 1e37]:
            q = (rng.standard_normal((Q, 9)) * qs).astype(np.float32)
            b = (rng.standard_normal((30, 9)) * bs).astype(np.float32)
            b[4] = 0  # a zero row
            b[7] = rng.standard_normal(9)  # a plain row among scaled ones
            if bf16:
                qb, bb = bf16_bits(q), bf16_bits(b)
                q, b = bf16_to_f32(qb), bf16_to_f32(bb)
                qa, ba = qb.view(np.int16), bb.view(np.int16)
            else:
                qa, ba = q, b
            for metric in ["cosine", "l2", "ip"]:
                if metric == "ip" and bf16 and simd == "avx512bf16" and min(qs, bs) <= 1e-38:
                    continue  # documented: vdpbf16ps treats bf16 subnormals as zero (cosine/l2 rescore these in f64)
                S = brute_scores(q, b, metric)
                with np.errstate(over="ignore"):
                    overflow = bool(np.isinf(S.astype(np.float32)).any())
                ctx = (qs, bs, metric)
                if overflow:  # the true score does not fit in float32 (never for cosine)
                    assert metric != "cosine"
                    with pytest.raises(ValueError, match=r"^(queries|bank): .*overflows float32") as e:
                        native.search(qa, ba, 30, metric=metric, simd=simd)
                    # the side with the larger norm is named
                    side = "queries" if np.abs(q).max() >= np.abs(b).max() else "bank"
                    assert str(e.value).startswith(side), (ctx, str(e.value))
                    continue
                s, i = native.search(qa, ba, 30, metric=metric, simd=simd)
                assert np.isfinite(s).all() and (i >= 0).all(), ctx
                check(q, b, 30, metric, s, i)
                if metric == "cosine":
                    assert (np.abs(s) <= 1 + 1e-6).all(), ctx


def test_l2_overflow_is_consistent_on_both_sides():
    normal = np.array([[1, 0], [0, 1]], np.float32)
    huge = np.array([[2e19, 0]], np.float32)
    for simd in SUPPORTED:
        _raises(ValueError, "queries: ", native.search, huge, normal, 2, metric="l2", simd=simd)
        _raises(ValueError, "bank: ", native.search, normal[:1], np.array([[2e19, 0], [0, 1]], np.float32), 2,
                metric="l2", simd=simd)
        # huge but close: the distance fits and is exact
        s, i = native.search(huge, np.array([[2e19, 1e10], [2e19, 0]], np.float32), 2, metric="l2", simd=simd)
        np.testing.assert_array_equal(i, [[1, 0]])
        np.testing.assert_allclose(s, [[0, 1e20]], rtol=1e-6)
        # check_finite=False: a score that does not fit never qualifies (like a non-finite one)
        s, i = native.search(normal[:1], np.array([[2e19, 0], [0, 1]], np.float32), 2, metric="l2", simd=simd,
                             check_finite=False)
        np.testing.assert_array_equal(i, [[1, -1]])


def test_2d_query_groups_are_rejected():
    q = np.ones((4, 3), np.float32)
    b = np.ones((6, 3), np.float32)
    m = _raises(ValueError, "query_groups", native.search, q, b, 2, query_groups=np.zeros((2, 2), np.int64),
                bank_groups=np.zeros(6, np.int64))
    assert "[4]" in m and "2-D" in m, m
    m = _raises(ValueError, "bank_groups", native.search, q, b, 2, query_groups=np.zeros(4, np.int64),
                bank_groups=np.zeros((6, 1), np.int64))
    assert "[6]" in m, m
    _raises(ValueError, "query_groups", native.search, q[:1], b, 2, query_groups=np.array(0),
            bank_groups=np.zeros(6, np.int64))
    _raises(ValueError, "query_groups[0]", native.search_many, [q], [b], 2, query_groups=[np.zeros((2, 2), np.int64)],
            bank_groups=[np.zeros(6, np.int64)])
    _raises(ValueError, "query_groups", native.search_many, [q], [b], 2, query_groups=np.zeros((1, 2, 2), np.int64),
            bank_groups=np.zeros(6, np.int64))


BAD_SETUP = textwrap.dedent(
    """
    import numpy as np
    import crl._native as native
    S, M = native.search, native.search_many
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 8), dtype=np.float32)
    b = rng.standard_normal((20, 8), dtype=np.float32)
    g4, g20 = np.zeros(4, np.int64), np.zeros(20, np.int64)

    def with_(a, idx, v):
        a = a.copy()
        a[idx] = v
        return a

    def bits(a):
        return (a.view(np.uint32) >> 16).astype(np.uint16)

    def unal(a):
        buf = bytearray(a.nbytes + 1)
        u = np.frombuffer(buf, a.dtype, offset=1, count=a.size).reshape(a.shape)
        u[...] = a
        return u
    """
)

OK = None
# (call, expected): expected is OK (a result) or (exception type, text the message starts with or contains)
BAD_INPUTS = [
    # wrong dtype / not an array
    ("S(q.astype(np.float64), b, 3)", (TypeError, "queries")),
    ("S(q, b.astype(np.float16), 3)", (TypeError, "bank")),
    ("S(q, b.astype(np.int32), 3)", (TypeError, "bank")),
    ("S(q.astype('>f4'), b, 3)", (TypeError, "queries")),
    ("S(q.tolist(), b, 3)", (TypeError, "queries")),
    ("S(q, None, 3)", (TypeError, "bank")),
    ("S(np.float32(1), b, 3)", (TypeError, "queries")),
    ("S(q, bits(b), 3)", (TypeError, "bank")),
    ("S(q.astype(object), b, 3)", (TypeError, "queries")),
    ("M([q], [b.astype(np.float64)], 3)", (TypeError, "banks[0]")),
    ("M([q, 'x'], [b, b], 3)", (TypeError, "queries[1]")),
    ("M(3, [b], 3)", (TypeError, "queries")),
    # wrong ndim
    ("S(q[0], b, 3)", (ValueError, "queries")),
    ("S(q, b[None], 3)", (ValueError, "bank")),
    ("S(np.array(1.0, np.float32), b, 3)", (ValueError, "queries")),
    ("M(q, b, 3)", (ValueError, "queries")),
    ("M([q[0]], [b], 3)", (ValueError, "queries[0]")),
    ("M(q[None], b, 3)", (ValueError, "banks")),
    ("M([], [], 3)", (ValueError, "queries")),
    ("M([q, q], [b], 3)", (ValueError, "banks")),
    # mismatched d / Q
    ("S(q, b[:, :7].copy(), 3)", (ValueError, "bank")),
    ("S(q[:, :0].copy(), b[:, :0].copy(), 3)", (ValueError, "queries")),
    ("M([q], [b[:, :7].copy()], 3)", (ValueError, "banks[0]")),
    ("M([q, q[:2]], [b, b], 3)", (ValueError, "queries[1]")),
    # k
    ("S(q, b, 0)", (ValueError, "k")),
    ("S(q, b, -1)", (ValueError, "k")),
    ("S(q, b, -2**70)", (ValueError, "k")),
    ("S(q, b, 3.0)", (TypeError, "k")),
    ("S(q, b, '3')", (TypeError, "k")),
    ("S(q, b, None)", (TypeError, "k")),
    ("M([q], [b], 0)", (ValueError, "k")),
    ("S(q, b, 25)", OK),
    ("S(q, b, np.int64(3))", OK),
    # NaN / Inf
    ("S(with_(q, (2, 3), np.nan), b, 3)", (ValueError, "queries")),
    ("S(with_(q, (2, 3), np.inf), b, 3, metric='cosine')", (ValueError, "queries")),
    ("S(with_(q, (2, 3), -np.inf), b, 3, metric='l2')", (ValueError, "queries")),
    ("S(q, with_(b, (17, 5), np.nan), 3)", (ValueError, "bank")),
    ("S(q, with_(b, (17, 5), np.inf), 3, metric='cosine')", (ValueError, "bank")),
    ("S(q, with_(b, (17, 5), -np.inf), 3, metric='l2')", (ValueError, "bank")),
    ("S(q[:1], with_(b, (17, 5), np.nan), 3, metric='cosine')", (ValueError, "bank")),
    ("S(bits(q), bits(with_(b, (17, 5), np.nan)), 3)", (ValueError, "bank")),
    ("M([q], [with_(b, (17, 5), np.inf)], 3)", (ValueError, "bank")),
    ("S(with_(q, (2, 3), np.nan), with_(b, (1, 1), np.inf), 3, check_finite=False)", OK),
    ("S(q, b, 3, min_score=float('nan'))", (ValueError, "min_score")),
    ("S(q, b, 3, min_score=1.0, max_score=0.0)", (ValueError, "min_score")),
    ("S(q * np.float32(1e30), b * np.float32(1e30), 3)", (ValueError, "overflows float32")),
    ("S(q * np.float32(1e30), b, 3, metric='l2')", (ValueError, "queries")),
    ("S(q, b * np.float32(1e30), 3, metric='l2')", (ValueError, "bank")),
    ("S(q * np.float32(1e30), b * np.float32(1e-30), 3, metric='cosine')", OK),
    # empty bank
    ("S(q, b[:0], 3)", (ValueError, "bank")),
    ("M([q], [b[:0]], 3)", (ValueError, "bank")),
    ("S(q[:0], b, 3)", OK),
    # unaligned (copied) and non-contiguous (rejected: never silently copied)
    ("S(unal(q), unal(b), 3)", OK),
    ("M([unal(q)], unal(b[None]), 3)", OK),
    ("S(q[:, ::2], b[:, :4].copy(), 3)", (ValueError, "queries")),
    ("S(q, b[::2], 3)", (ValueError, "bank")),
    ("S(q, np.asfortranarray(b), 3)", (ValueError, "bank")),
    ("M([q], [b[::2]], 3)", (ValueError, "banks[0]")),
    ("M(np.stack([q, q])[:, ::2], np.stack([b, b])[:, ::2], 3)", (ValueError, "queries")),
    # groups
    ("S(q, b, 3, query_groups=np.zeros(3, np.int64), bank_groups=g20)", (ValueError, "query_groups")),
    ("S(q, b, 3, query_groups=g4, bank_groups=np.zeros(21, np.int64))", (ValueError, "bank_groups")),
    ("S(q, b, 3, query_groups=np.zeros(4, np.int32), bank_groups=g20)", (TypeError, "query_groups")),
    ("S(q, b, 3, query_groups=np.zeros(4), bank_groups=g20)", (TypeError, "query_groups")),
    ("S(q, b, 3, query_groups=[0, 0, 0, 0], bank_groups=g20)", (TypeError, "query_groups")),
    ("S(q, b, 3, query_groups=g4, bank_groups=np.zeros(20, np.uint64))", (TypeError, "bank_groups")),
    ("S(q, b, 3, query_groups=np.zeros((2, 2), np.int64), bank_groups=g20)", (ValueError, "query_groups")),
    ("S(q, b, 3, query_groups=np.zeros((4, 1), np.int64), bank_groups=g20)", (ValueError, "query_groups")),
    ("S(q, b, 3, query_groups=g4, bank_groups=np.zeros((20, 1), np.int64))", (ValueError, "bank_groups")),
    ("S(q[:1], b, 3, query_groups=np.array(0), bank_groups=g20)", (ValueError, "query_groups")),
    ("S(q, b, 3, query_groups=np.zeros(8, np.int64)[::2], bank_groups=g20)", (ValueError, "query_groups")),
    ("S(q, b, 3, query_groups=g4)", (ValueError, "query_groups")),
    ("S(q, b, 3, query_groups=unal(g4), bank_groups=unal(g20))", OK),
    ("M([q, q], [b, b], 3, query_groups=g4, bank_groups=[g20])", (ValueError, "bank_groups")),
    ("M([q, q], [b, b], 3, query_groups=np.zeros((3, 4), np.int64), bank_groups=g20)", (ValueError, "query_groups")),
    ("M([q], [b], 3, query_groups=np.zeros((1, 2, 2), np.int64), bank_groups=g20)", (ValueError, "query_groups")),
    ("M([q], [b], 3, query_groups=[np.zeros((4, 1), np.int64)], bank_groups=[g20])", (ValueError, "query_groups[0]")),
    ("M([q], [b], 3, query_groups=[np.zeros(4, np.int32)], bank_groups=[g20])", (TypeError, "query_groups[0]")),
    ("M([q], [b], 3, query_groups=np.zeros((1, 3), np.int64), bank_groups=g20)", (ValueError, "query_groups")),
    # other arguments
    ("S(q, b, 3, metric='hamming')", (ValueError, "metric")),
    ("S(q, b, 3, metric=None)", (TypeError, "metric")),
    ("S(q, b, 3, threads=0)", (ValueError, "threads")),
    ("S(q, b, 3, threads=-1)", (ValueError, "threads")),
    ("S(q, b, 3, threads=2**40)", (ValueError, "threads")),
    ("S(q, b, 3, threads=2**70)", (ValueError, "threads")),
    ("S(q, b, 3, threads=1.5)", (TypeError, "threads")),
    ("S(q, b, 3, simd='neon')", (ValueError, "simd")),
    ("S(q, b, 3, min_score='x')", (TypeError, "min_score")),
    ("S(q, b, 3, max_score=[1])", (TypeError, "max_score")),
    ("S(q, b, 3, simd=3)", (TypeError, "simd")),
    ("S(q, b, 3, check_finite='yes')", (TypeError, "check_finite")),
    ("M([q], [b], 3, metric=1)", (TypeError, "metric")),
    ("S(q, b, 3, metric='cosine', min_score=-1e300, max_score=1e300)", OK),
]
# cases that could abort the interpreter if the guard were missing run in their own process
ISOLATED = {"S(q, b, 3, threads=2**40)", "S(q, b, 3, threads=2**70)"}


@pytest.mark.parametrize("code,expected", BAD_INPUTS, ids=[c for c, _ in BAD_INPUTS])
def test_bad_input_table_never_panics(code, expected):
    if code in ISOLATED:
        r = _run_isolated(code)
        etype, msg, mro = r["type"], r["msg"], r.get("mro", [])
    else:
        ns: dict = {}
        exec(BAD_SETUP, ns)
        try:
            eval(code, ns)
            etype, msg, mro = None, "", []
        except BaseException as e:  # noqa: BLE001 - a PanicException is a BaseException
            etype, msg, mro = type(e).__name__, str(e), [c.__name__ for c in type(e).__mro__]
    assert etype != "PanicException" and (etype is None or "Exception" in mro), (code, etype, msg)
    if expected is OK:
        assert etype is None, (code, etype, msg)
    else:
        exc, name = expected
        assert etype == exc.__name__, (code, etype, msg)
        assert name in msg, (code, msg)
