"""kernels/pool.py: the shared thread pool. Each pool kernel's parallel variant is bitwise its serial one (rows
split over threads, each row computed as the serial loop computes it); oneDNN's float32 GEMM is within
gamma_K = K u / (1 - K u), u = 2^-24, of sum |a_k| |b_k| of the float64 product (Higham, Accuracy and Stability,
3.1: any summation order), gamma_{K+1} with |out| added when accumulating; and the dispatch."""

import os
import subprocess
import sys

import numpy as np
import pytest

from hpc_llm.kernels import (
    adamw,
    bias_gelu,
    cross_entropy,
    dispatch,
    dropout_residual,
    gemm,
    layernorm,
    pool,
    rounding,
    rows,
    softmax,
)

pytest.importorskip("numba")
needs_sgemm = pytest.mark.skipif(
    gemm.onednn_sgemm() is None,
    reason="oneDNN not installed (onednn-cpu-gomp; HPC_LLM_DNNL_LIB unset)",
)


@pytest.fixture
def pool_on(monkeypatch):
    """run(fn, *args) -> (pool on, pool off) results of fn under HPC_LLM_KERNELS=numba on copies of the arrays."""
    if not pool._omp_layer(2):
        pytest.skip("numba's omp threading layer unavailable")
    monkeypatch.setenv("HPC_LLM_KERNELS", "numba")

    def run(fn, *args):
        res = []
        for threads in (2, 0):
            monkeypatch.setattr(pool, "_state", {"threads": threads})
            res.append(fn(*[a.copy() if isinstance(a, np.ndarray) else a for a in args]))
        return res

    return run


def test_parallel_kernels_bitwise_serial(pool_on):
    """Every pool kernel, on row counts that split unevenly over the threads."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 96)) * 3 + 1).astype(np.float32)
    w, b = rng.standard_normal(96).astype(np.float32), rng.standard_normal(96).astype(np.float32)
    (out, cache), (ref, ref_cache) = pool_on(layernorm.layernorm_forward, x, w, b)
    assert all(np.array_equal(p, q) for p, q in zip((out, *cache), (ref, *ref_cache)))
    got, ref = pool_on(layernorm.layernorm_backward_input, x, cache, w)
    assert np.array_equal(got, ref)
    got, ref = pool_on(layernorm.layernorm_backward_input, x, cache, w, x * 0.5)
    assert np.array_equal(got, ref)
    t = np.tanh(x)
    got, ref = pool_on(bias_gelu.gelu_backward, w * x, x, t)
    assert np.array_equal(got, ref)
    keep = rng.random(x.shape) >= 0.2
    got, ref = pool_on(dropout_residual.dropout_residual_, x, w * x, keep, 1 / 0.8)
    assert np.array_equal(got, ref)
    att = (rng.standard_normal((2, 3, 13, 21)) * 4).astype(np.float32)
    got, ref = pool_on(softmax.causal_softmax_, att)
    assert np.array_equal(got, ref)
    keep_att = rng.random(att.shape) >= 0.3
    got, ref = pool_on(softmax.softmax_backward_, att * 0.3, ref, keep_att, 1 / 0.7)
    assert np.array_equal(got, ref)
    probs, local = rng.random((37, 70)).astype(np.float32), rng.integers(-5, 70, 37)
    mine = (local >= 0) & (local < 64)
    got, ref = pool_on(cross_entropy.cross_entropy_backward_, probs, local, mine, 0.37)
    assert np.array_equal(got, ref)
    got, ref = pool_on(cross_entropy.normalize_rows_, probs, probs.sum(axis=1))
    assert np.array_equal(got, ref)
    p, g, m = (rng.standard_normal(3000).astype(np.float32) for _ in range(3))
    segments = [(0, 1000, 0, True), (1000, 1700, 1000, False), (2000, 3000, 1700, True)]
    coef = dict(keep=0.999, g1=0.07, g2=0.0005, eps=3e-10, step=3e-3)

    def adam(p, g, m, v):
        adamw.adamw_update(p, g, m, v, segments, coef, 0.9, 0.999)
        return p, m, v

    got, ref = pool_on(adam, p, g, m, rng.random(3000).astype(np.float32))
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    assert layernorm._layernorm_forward.parallel is not None, "the parallel variants ran"


def test_pool_passes_bitwise_numpy(pool_on, monkeypatch):
    """The pool kernels that replace NumPy's own passes (GELU's around its tanh, with a bias, the residual add,
    with a bias, the bias add, sums over rows, the embedding's scatter-add): with the pool on, bitwise NumPy's
    results with it off, on sizes past "auto"'s cut-over that split unevenly."""
    monkeypatch.setenv("HPC_LLM_KERNELS", "auto")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((37, 1001)) * 3).astype(np.float32)
    (out, t), (ref, ref_t) = pool_on(bias_gelu.gelu_forward, x)
    assert np.array_equal(out, ref) and np.array_equal(t, ref_t)
    got, ref = pool_on(bias_gelu.gelu_tanh, x)
    assert np.array_equal(got, t) and np.array_equal(ref, t), "recompute: bitwise forward's"
    a, b = rng.standard_normal(x.shape).astype(np.float32), x[0].copy()
    # the linear layer's bias folded into GELU's first pass: x left holding x + b, as the twin leaves it
    got, ref = pool_on(lambda f: (*bias_gelu.gelu_forward(f, b), f), x)
    assert all(np.array_equal(p, q) for p, q in zip(got, ref)) and np.array_equal(got[2], x + b)
    got, ref = pool_on(dropout_residual.dropout_residual_, x, a)
    assert np.array_equal(got, ref) and np.array_equal(ref, x + a)
    # ... and the projections' into the residual add: x += (a + b)
    got, ref = pool_on(lambda y: dropout_residual.dropout_residual_(y, a.copy(), None, 1.0, b), x)
    assert np.array_equal(got, ref) and np.array_equal(ref, x + (a + b))
    got, ref = pool_on(rows.add_rows_, x, b)
    assert np.array_equal(got, ref) and np.array_equal(ref, x + b)
    for y, acc in ((None, False), (a, False), (a, True)):
        got, ref = pool_on(lambda o: rows.column_sums_into(x, o, acc, y) or o, b)
        assert np.array_equal(got, ref)
    assert np.array_equal(ref, b + np.einsum("ni,ni->i", x, a))
    for acc in (False, True):  # LayerNorm's dw and db in one pass: bitwise the two sums
        got, ref = pool_on(
            lambda dw, db: layernorm.layernorm_backward_weight(x, a, dw, db, acc) or (dw, db),
            b,
            a[1],
        )
        assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    assert rows._column_dot_sums.parallel is not None
    idx = rng.integers(0, 40, x.shape[0])
    table = rng.standard_normal((40, x.shape[1])).astype(np.float32)
    got, ref = pool_on(lambda tab: rows.scatter_add_rows_(tab, idx, x) or tab, table)
    want = table.copy()
    np.add.at(want, idx, x)
    assert np.array_equal(got, ref) and np.array_equal(ref, want)
    qkv = rng.standard_normal((3, 50, 3 * 4 * 24)).astype(np.float32)
    got, ref = pool_on(rows.to_heads, qkv, 4, 3, 0.3)
    assert np.array_equal(got, ref) and got.flags.c_contiguous and got.shape == (3, 3, 4, 50, 24)
    assert np.array_equal(
        pool_on(rows.from_heads, got, 0.7)[0], pool_on(rows.from_heads, got, 0.7)[1]
    )
    assert np.array_equal(pool_on(rows.from_heads, got)[0], qkv[:, :, :] * ref_scale(qkv, 0.3))
    assert rows._scatter_add_rows.parallel is not None, "the parallel variants ran"
    assert bias_gelu._bias_gelu_inner.parallel is not None
    assert dropout_residual._residual_add_bias.parallel is not None


def test_bf16_rounding_passes_bitwise_serial(pool_on):
    """The bf16 rounding passes (kernels/rounding.py) on the pool: bitwise their serial runs and ml_dtypes'
    rounding, on sizes that split unevenly (NaN and infinities kept)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((37, 3, 2, 5, 24)) * 3).astype(np.float32)
    x.reshape(-1)[:3] = (np.nan, np.inf, -np.inf)
    want = x.astype(bf16)
    for fn in (rounding.to_low, lambda y, low: rounding.round_low_(y, low).astype(low)):
        got, ref = pool_on(fn, x, bf16)
        assert np.array_equal(got.view(np.uint16), ref.view(np.uint16))
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    got, ref = pool_on(rounding.from_low, want, np.float32)
    wide = want.astype(np.float32).view(np.uint32)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32)) and np.array_equal(
        got.view(np.uint32), wide
    )

    def rounded(y):
        out, bits = np.empty_like(y), np.empty(y.shape, np.uint16)
        rounding.round_into(y, out, bf16, bits)
        return out, bits

    got, ref = pool_on(rounded, x)
    assert all(np.array_equal(g.view(np.uint32), r.view(np.uint32)) for g, r in zip(got, ref))
    assert np.array_equal(got[1], want.view(np.uint16))
    for merge, scale in ((False, 0.3), (True, None)):
        for wide in (False, True):
            got, ref = pool_on(rounding.heads_rounded, x, bf16, wide, scale, merge)
            assert np.array_equal(got.view(np.uint16), ref.view(np.uint16))
    assert rounding._heads_split.parallel is not None, "the parallel variants ran"


def ref_scale(qkv, s):
    """The factor to_heads applies to each column of a (B, T, 3C) array: s on q's columns, 1 elsewhere."""
    f = np.ones(qkv.shape[-1], np.float32)
    f[: qkv.shape[-1] // 3] = s
    return f


def test_causal_softmax_pool_within_bound(pool_on):
    """The pool's softmax (its passes around NumPy's exp): bitwise on 1 and 2 threads, within the compiled
    kernel's bound of float64 (tests/kernels/test_kernels.py), masked entries exactly 0."""
    rng = np.random.default_rng(6)
    att = (rng.standard_normal((2, 3, 13, 21)) * 4).astype(np.float32)
    got, ref = pool_on(softmax._causal_softmax_pool, att)
    assert np.array_equal(got, ref)
    p64 = softmax.causal_softmax_numpy_(att.astype(np.float64))
    assert np.all(np.abs(got - p64) <= (21 + 8 + 16) * 2.0**-24)
    assert np.all(got[p64 == 0] == 0)


def test_bf16_kernels_on_the_pool_round_the_pools_values(monkeypatch):
    """With the pool on (auto), the bf16 softmax and its backward, GELU and LayerNorm run the pool's passes,
    rounding as they write: bitwise the pool's float32 results then rounding."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    if not pool._omp_layer(2):
        pytest.skip("numba's omp threading layer unavailable")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    monkeypatch.setenv("HPC_LLM_KERNELS", "auto")
    monkeypatch.setattr(pool, "_state", {"threads": 2})
    rng = np.random.default_rng(8)
    att = (rng.standard_normal((2, 3, 13, 21)) * 4).astype(np.float32)
    datt = rng.standard_normal(att.shape).astype(np.float32)
    keep = rng.uniform(size=att.shape) >= 0.2
    p = softmax.causal_softmax_(att.copy())
    got = softmax.causal_softmax_bf16(att.copy(), bf16)
    assert np.array_equal(got.view(np.uint16), p.astype(bf16).view(np.uint16))
    for mask in ((), (keep, 1.25)):
        want = softmax.softmax_backward_(datt.copy(), p, *mask).astype(bf16)
        got = softmax.softmax_backward_bf16(datt.copy(), p, bf16, *mask)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    x = (rng.standard_normal((130, 256)) * 3).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    out, t = bias_gelu.gelu_forward(x.copy(), b)
    f, g, tk = bias_gelu.bias_gelu_forward_bf16(x.copy(), b, bf16)
    for got, want in ((f, x + b), (g, out), (tk, t)):
        assert np.array_equal(got.view(np.uint16), want.astype(bf16).view(np.uint16))
    y, (xhat, _) = layernorm.layernorm_forward(x, b, x[0])
    y16, (xhat16, _) = layernorm.layernorm_forward_bf16(x, b, x[0], bf16, True)
    for got, want in ((y16, y), (xhat16, xhat)):
        assert np.array_equal(got.view(np.uint16), want.astype(bf16).view(np.uint16))
    # its backward reading the kept xhat (B; W's sums): bitwise on the widened copy
    rstd = rng.uniform(0.5, 2, (130, 1)).astype(np.float32)
    for xh in (xhat16.astype(np.float32), xhat16):
        dx = layernorm.layernorm_backward_input(x, (xh, rstd), b)
        dw = np.ones(256, np.float32)
        layernorm.layernorm_backward_weight(x, xh, dw, None, True)
        if xh.dtype == np.float32:
            want_dx, want_dw = dx, dw
    assert np.array_equal(dx, want_dx) and np.array_equal(dw, want_dw)
    # the softmax backward reading the held bf16 probabilities (compiled at this small size too)
    monkeypatch.setenv("HPC_LLM_KERNELS", "numba")
    p16 = p.astype(bf16)
    for mask in ((), (keep, 1.25)):
        want = softmax.softmax_backward_(datt.copy(), p16.astype(np.float32), *mask).astype(bf16)
        got = softmax.softmax_backward_bf16(datt.copy(), p16, bf16, *mask)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def assert_within_gamma(got, a, b, c0=None):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact, mag, K = a64 @ b64, np.abs(a64) @ np.abs(b64), a.shape[-1]
    if c0 is not None:
        exact, mag, K = exact + c0, mag + np.abs(c0), K + 1
    ratio = np.max(np.abs(got - exact) / (K * 2.0**-24 / (1 - K * 2.0**-24) * mag))
    assert ratio <= 1, f"error {ratio:.3g} x gamma_K |a||b|"


def values(rng, shape, transposed: bool):
    """Float32 (..., R, C); transposed: a transposed view of a contiguous (..., C, R)."""
    x = rng.standard_normal(shape[:-2] + (shape[-1], shape[-2]) if transposed else shape)
    x = x.astype(np.float32)
    return np.swapaxes(x, -1, -2) if transposed else x


@needs_sgemm
@pytest.mark.parametrize("layout", ["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_sgemm_within_gamma_k(layout, accumulate):
    """Odd sizes, each transposition (oneDNN's flag, no copy), overwrite and accumulate."""
    rng = np.random.default_rng(1)
    a, b = values(rng, (67, 131), layout[0] == "t"), values(rng, (131, 45), layout[1] == "t")
    c0 = rng.standard_normal((67, 45)).astype(np.float32)
    out = c0.copy()
    assert gemm.sgemm_matmul(a, b, out, accumulate) is out
    assert_within_gamma(out, a, b, c0.astype(np.float64) if accumulate else None)


@needs_sgemm
def test_sgemm_batched_into_a_strided_view():
    """Attention's shapes: a batch by a slice of keys transposed, accumulated into a block of a larger array's
    rows; and one matrix broadcast against a batch."""
    rng = np.random.default_rng(2)
    q, k = values(rng, (2, 3, 33, 16), False), values(rng, (2, 3, 40, 16), False)[:, :, :29]
    dq = rng.standard_normal((2, 3, 50, 29)).astype(np.float32)
    before = dq.copy()
    gemm.sgemm_matmul(q, k.transpose(0, 1, 3, 2), dq[:, :, 7:40], True)
    assert_within_gamma(dq[:, :, 7:40], q, k.transpose(0, 1, 3, 2), before[:, :, 7:40])
    assert np.array_equal(dq[:, :, :7], before[:, :, :7])
    assert np.array_equal(dq[:, :, 40:], before[:, :, 40:])
    w = values(rng, (16, 21), True)
    assert_within_gamma(gemm.sgemm_matmul(q, w), q, w)


@needs_sgemm
@pytest.mark.timeout(120)
def test_pool_keeps_the_process_thread_count():
    """Starting numba's omp layer (its threads: NUMBA_NUM_THREADS, by default every core of the node) leaves
    OpenMP's default team at the process's own OMP_NUM_THREADS: oneDNN's products in a rank given one thread run on
    one, not on the node's cores (it set the team to 2 here, so the "1-thread" products ran on both cores)."""
    code = (
        "import ctypes, numpy as np\n"
        "from hpc_llm.kernels import gemm, pool\n"
        "threads = pool.pool_threads()\n"
        "a = np.ones((256, 256), np.float32)\n"
        "gemm.matmul(a, a)\n"
        "print(threads, ctypes.CDLL('libgomp.so.1').omp_get_max_threads())\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HPC_LLM_POOL="on", NUMBA_NUM_THREADS="2")
    env.pop("HPC_LLM_KERNELS", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    threads, team = out.stdout.split()
    if threads == "0":
        pytest.skip("numba's omp threading layer unavailable")
    assert (threads, team) == ("1", "1")


def test_pool_choice_and_matmul_dispatch(monkeypatch):
    """A bad HPC_LLM_POOL is one line, raised when a model is built (before any compute); "on" and "auto" turn
    the pool on (one thread too) where oneDNN and numba's omp layer are there, "off" and HPC_LLM_KERNELS=numpy
    keep it off; which kernels "auto" runs with it on; with it on, float32 products of POOL_MIN_MACS or more go to
    oneDNN, smaller ones stay on BLAS, bitwise."""
    from hpc_llm.config import ModelConfig
    from hpc_llm.errors import UserError
    from hpc_llm.model.gpt import GPT

    monkeypatch.setenv("HPC_LLM_POOL", "threads")
    with pytest.raises(
        UserError, match="HPC_LLM_POOL: expected one of auto, on, off, got 'threads'"
    ):
        GPT(ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=16), seed=0)
    available = gemm.onednn_sgemm() is not None and pool._omp_layer(1)
    for env, value in (
        ("HPC_LLM_POOL", "auto"),  # on one thread too (this process's)
        ("HPC_LLM_POOL", "on"),
        ("HPC_LLM_POOL", "off"),
        ("HPC_LLM_KERNELS", "numpy"),
    ):
        monkeypatch.setenv("HPC_LLM_POOL", "on")
        monkeypatch.setenv(env, value)
        monkeypatch.setattr(pool, "_state", {})
        assert (pool.pool_threads() > 0) == (available and value in ("auto", "on"))
        monkeypatch.delenv("HPC_LLM_KERNELS", raising=False)
    # under "auto": a kernel measured faster in parallel runs only with the pool on; softmax's never
    monkeypatch.setenv("HPC_LLM_KERNELS", "auto")
    large = np.ones(dispatch.AUTO_MIN_ELEMENTS, np.float32)
    for threads in (0, 2):
        monkeypatch.setattr(pool, "_state", {"threads": threads})
        assert dispatch.compiled(layernorm._layernorm_forward, large) == (threads > 0)
        assert not dispatch.compiled(softmax._causal_softmax, large)
    calls = []
    monkeypatch.setattr(gemm, "sgemm_matmul", lambda *args: calls.append(1))
    rng = np.random.default_rng(3)
    big = values(rng, (128, 128), False), values(rng, (128, 64), False)
    gemm.matmul(*big)
    assert calls == [1]
    small = big[0][:, :32], big[1][:32]
    assert np.array_equal(gemm.matmul(*small), small[0] @ small[1]) and calls == [1]
