"""Each compiled kernel (numba) against its NumPy twin: bitwise where the arithmetic is the same operation for
operation, else each within a stated bound of a float64 reference, which the twin meets too.

The bounds, float32 (u = 2^-24): a row reduction of C terms, summed in any order, is within (C - 1) u sum|terms| of
the exact sum (Higham, Accuracy and Stability, 4.2); LayerNorm's and softmax's outputs are built from such sums and a
few further roundings, so each output entry is within (C + 8) u of the exact value scaled to its row (|xhat| + 1
for LayerNorm, max p = 1 for softmax). tanh and exp are each within 4 ulp (= 8 u relative) of the exact value in
both libraries (the C library's and NumPy's vectorised ones), and GELU's remaining operations add 4 u.
"""

import numpy as np
import pytest

from hpc_llm.kernels import (
    adamw,
    bias_gelu,
    cross_entropy,
    dispatch,
    dropout_residual,
    layernorm,
    pool,
    rounding,
    softmax,
)

pytest.importorskip(
    "numba"
)  # the test extras install it (setup.cfg): without it both sides would be the twin

U32 = 2.0**-24


@pytest.fixture
def kernels(monkeypatch):
    """run(mode, fn, *args): fn under HPC_LLM_KERNELS=mode, on copies of the arrays (kernels work in place)."""

    def run(mode, fn, *args):
        monkeypatch.setenv("HPC_LLM_KERNELS", mode)
        return fn(*[a.copy() if isinstance(a, np.ndarray) else a for a in args])

    return run


def both(kernels, fn, *args):
    return kernels("numba", fn, *args), kernels("numpy", fn, *args)


def assert_within(got, exact, bound, what):
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= bound), (
        f"{what}: worst {np.max(err / np.maximum(bound, 1e-300)):.3g} x its bound"
    )


def test_bad_choice_is_one_line(monkeypatch):
    monkeypatch.setenv("HPC_LLM_KERNELS", "fortran")
    with pytest.raises(
        Exception, match="HPC_LLM_KERNELS: expected one of auto, numba, numpy, got 'fortran'"
    ):
        dispatch.kernels_choice()


def test_auto_runs_measured_kernels_on_large_arrays_only(monkeypatch):
    from hpc_llm.kernels import pool

    monkeypatch.setenv("HPC_LLM_KERNELS", "auto")
    monkeypatch.setattr(pool, "_state", {"threads": 0})  # the shared pool off
    small, large = np.ones(8, np.float32), np.ones(dispatch.AUTO_MIN_ELEMENTS, np.float32)
    assert not dispatch.compiled(layernorm._layernorm_backward_input, small)
    assert (
        dispatch.compiled(layernorm._layernorm_backward_input, large) == dispatch.numba_available()
    )
    # slower than its twin on one thread without the pool: numba only; its parallel variant with the pool on
    assert not dispatch.compiled(layernorm._layernorm_forward, large)
    monkeypatch.setattr(pool, "_state", {"threads": 1})
    assert dispatch.compiled(layernorm._layernorm_forward, large) == dispatch.numba_available()
    monkeypatch.setenv("HPC_LLM_KERNELS", "numba")
    assert dispatch.compiled(layernorm._layernorm_forward, small) == dispatch.numba_available()


def test_layernorm(kernels):
    rng = np.random.default_rng(0)
    N, C = 37, 96
    x = (rng.standard_normal((N, C)) * 3 + 1).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))
    out64, (xhat64, rstd64) = kernels("numpy", layernorm.layernorm_forward, x64, w64, b64)
    dout = rng.standard_normal((N, C)).astype(np.float32)
    dx64 = kernels(
        "numpy", layernorm.layernorm_backward_input, dout.astype(np.float64), (xhat64, rstd64), w64
    )
    g = (C + 8) * U32
    for mode in ("numba", "numpy"):
        out, (xhat, rstd) = kernels(mode, layernorm.layernorm_forward, x, w, b)
        assert_within(xhat, xhat64, g * (np.abs(xhat64) + 1), f"{mode} xhat")
        assert_within(rstd, rstd64, g * rstd64, f"{mode} rstd")
        assert_within(
            out, out64, g * (np.abs(w64) * (np.abs(xhat64) + 1) + np.abs(b64)), f"{mode} out"
        )
        # backward from the float64 cache rounded to float32: the sums over the row, as above
        dx = kernels(
            mode, layernorm.layernorm_backward_input, dout, (xhat64.astype(np.float32), rstd), w
        )
        scale = rstd64 * (np.abs(dout * w).sum(axis=1, keepdims=True) / C + np.abs(dout * w))
        assert_within(dx, dx64, 2 * g * scale * (np.abs(xhat64) + 1), f"{mode} dx")


def test_gelu(kernels):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((50, 64)) * 3).astype(np.float32)
    (out, t), (out_ref, t_ref) = both(kernels, bias_gelu.gelu_forward, x)
    # the tanh of the same float32 argument: each library within 4 ulp of the exact value
    assert np.all(np.abs(t - t_ref) <= 16 * U32 * np.abs(t_ref) + 1e-45)
    assert np.all(
        np.abs(out - out_ref) <= 16 * U32 * np.abs(t_ref * x) / 2 + 8 * U32 * np.abs(out_ref)
    )
    assert np.array_equal(
        kernels("numba", bias_gelu.gelu_tanh, x), t
    )  # recompute: bitwise forward's
    dout = rng.standard_normal(x.shape).astype(np.float32)
    # the same operations in the same order: bitwise
    got, ref = both(kernels, bias_gelu.gelu_backward, dout, x, t_ref)
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("Tq, Tk", [(5, 9), (16, 16)])
def test_causal_softmax_and_backward(kernels, Tq, Tk):
    rng = np.random.default_rng(2)
    att = (rng.standard_normal((2, 3, Tq, Tk)) * 4).astype(np.float32)
    p64 = kernels("numpy", softmax.causal_softmax_, att.astype(np.float64))
    bound = (Tk + 8 + 16) * U32  # the row sum, and exp's own 4 ulp
    for mode in ("numba", "numpy"):
        p = kernels(mode, softmax.causal_softmax_, att)
        assert_within(p, p64, bound * np.ones_like(p64), mode)
        assert np.all(p[p64 == 0] == 0), "masked entries exactly 0"
    d = rng.standard_normal(att.shape).astype(np.float32)
    keep = rng.random(att.shape) >= 0.3
    p = p64.astype(np.float32)
    for mask in (None, keep):
        args = () if mask is None else (mask, 1 / 0.7)
        d64 = kernels(
            "numpy", softmax.softmax_backward_, d.astype(np.float64), p.astype(np.float64), *args
        )
        scale = np.abs(d).max(axis=-1, keepdims=True) * (1 if mask is None else 1 / 0.7)
        for mode in ("numba", "numpy"):
            got = kernels(mode, softmax.softmax_backward_, d, p, *args)
            assert_within(got, d64, (Tk + 8) * U32 * scale * (p + U32), f"{mode} backward")


def test_cross_entropy_kernels(kernels):
    rng = np.random.default_rng(3)
    N, V = 20, 70
    logits = (rng.standard_normal((N, V)) * 3).astype(np.float32)
    logits[:, 64:] = -np.inf  # padding columns
    row_max, local = logits.max(axis=1), rng.integers(-5, V, N)
    mine = (local >= 0) & (local < 64)
    (t, s), (t_ref, s_ref) = both(kernels, cross_entropy.exp_shifted_, logits, row_max, local, mine)
    assert np.array_equal(t, t_ref)  # one subtraction each
    assert np.all(np.abs(s - s_ref) <= 2 * (V + 16) * U32 * s_ref)
    probs = rng.random((N, V)).astype(np.float32)
    got, ref = both(kernels, cross_entropy.cross_entropy_backward_, probs, local, mine, 0.37)
    assert np.array_equal(got, ref)
    got, ref = both(kernels, cross_entropy.normalize_rows_, probs, s_ref)
    assert np.array_equal(got, ref)


def test_dropout_residual(kernels):
    rng = np.random.default_rng(4)
    x, a = (
        rng.standard_normal((2, 9, 16)).astype(np.float32),
        rng.standard_normal((2, 9, 16)).astype(np.float32),
    )
    keep = rng.random(x.shape) >= 0.2
    got, ref = both(kernels, dropout_residual.dropout_residual_, x, a, keep, 1 / 0.8)
    assert np.array_equal(got, ref)


def test_adamw(kernels):
    rng = np.random.default_rng(5)
    n = 3000
    p, g, m = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    v = rng.random(n).astype(np.float32)
    # owned ranges back to back in the moments, decayed and not
    segments = [(0, 1000, 0, True), (1000, 1700, 1000, False), (2000, 3000, 1700, True)]
    coef = dict(keep=0.999, g1=0.1 * 0.7, g2=0.001 * 0.49, eps=1e-8 * 0.03, step=1e-3 * 3.1)
    tmp = np.empty(1000, np.float32)
    out = {}
    for mode in ("numba", "numpy"):
        arrays = [a.copy() for a in (p, g, m, v)]
        kernels(
            mode, lambda: adamw.adamw_update(*arrays, segments, coef, 0.9, 0.999, tmp, tmp.copy())
        )
        out[mode] = arrays
    for got, ref in zip(out["numba"], out["numpy"]):
        assert np.array_equal(got, ref)
    assert np.array_equal(out["numba"][0][1700:2000], p[1700:2000])  # not owned: untouched


def test_bf16_rounding_every_class(kernels):
    """Every tie and near-tie below bfloat16's last bit, NaNs of both signs and payloads, infinities, subnormals."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    bits = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi, hi | 0x0001])
    x = bits.view(np.float32)
    with np.errstate(invalid="ignore"):
        rounded, ref = both(kernels, rounding.round_low_, x, bf16)
        assert np.array_equal(rounded.view(np.uint32), ref.view(np.uint32))
        kept, kept_ref = both(kernels, rounding.to_low, x, bf16)
        assert np.array_equal(kept.view(np.uint16), kept_ref.view(np.uint16))
    back, back_ref = both(kernels, rounding.from_low, kept_ref, np.float32)
    assert np.array_equal(back.view(np.uint32), back_ref.view(np.uint32))


def test_bf16_row_sums(kernels):
    """The rows of a bf16 array summed in float32 (the bias gradients of bf16 output gradients): bitwise NumPy's
    sum of the widened values, signed zeros included."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 130)) * rng.uniform(0, 1e4, (300, 1))
    x = x.astype(np.float32).astype(ml_dtypes.bfloat16)
    x[:, 0] = -0.0
    want = x.astype(np.float32).sum(axis=0)
    for mode in ("numba", "numpy"):
        got = kernels(mode, rounding.sum_rows_low, x, np.full(130, np.nan, np.float32))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), mode


@pytest.mark.parametrize("mode", ["numba", "auto"])
def test_bf16_gelu_rounded_in_the_pass(kernels, mode):
    """GELU writing its kept input and tanh term and its output as bf16 (and its backward reading them as they are,
    its gradient rounded or not): bitwise the float32 kernels of the same mode followed by rounding, NaN and
    infinities included ("auto": the twin's tanh, the rest compiled)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((130, 256)) * 3).astype(np.float32)
    x[0, :3] = np.nan, np.inf, -np.inf
    b, dout = rng.standard_normal(256).astype(np.float32), rng.standard_normal(x.shape)
    dout = dout.astype(np.float32)
    with np.errstate(invalid="ignore"):
        out, t = kernels(mode, bias_gelu.gelu_forward, x, b)
        f, g, tk = kernels(mode, bias_gelu.bias_gelu_forward_bf16, x, b, bf16)
        for got, want in ((f, x + b), (g, out), (tk, t)):
            assert np.array_equal(got.view(np.uint16), want.astype(bf16).view(np.uint16))
        ref = kernels(mode, bias_gelu.gelu_backward, dout, *(a.astype(np.float32) for a in (f, tk)))
        wide = kernels(mode, bias_gelu.gelu_backward_bf16, dout, f, tk, False)
        assert np.array_equal(wide.view(np.uint32), ref.view(np.uint32))
        narrow = kernels(mode, bias_gelu.gelu_backward_bf16, dout, f, tk, True)
        assert np.array_equal(narrow.view(np.uint16), ref.astype(bf16).view(np.uint16))
        f2, g2, none = kernels(mode, bias_gelu.bias_gelu_forward_bf16, x, None, bf16, False)
        want = kernels(mode, bias_gelu.gelu_forward, x)[0].astype(bf16)
    assert none is None and np.array_equal(g2.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_layernorm_rounded_in_the_pass(kernels, bias):
    """LayerNorm writing its kept xhat (and its output, narrow) as bf16: bitwise the compiled float32 forward then
    rounding; rstd and the float32 output (not narrow) bitwise its own."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 70, 96)) * 3 + 1).astype(np.float32)
    w, b = (rng.standard_normal(96).astype(np.float32) for _ in range(2))
    b = b if bias else None
    out, (xhat, rstd) = kernels("numba", layernorm.layernorm_forward, x, w, b)
    for narrow in (True, False):
        got = kernels("numba", layernorm.layernorm_forward_bf16, x, w, b, bf16, narrow)
        o, (xh, rs) = got
        assert np.array_equal(xh.view(np.uint16), xhat.astype(bf16).view(np.uint16))
        assert np.array_equal(rs, rstd) and rs.shape == rstd.shape
        want = out.astype(bf16) if narrow else out
        assert o.dtype == want.dtype and np.array_equal(o.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_layernorm_twin_rounded_in_its_last_pass(kernels, monkeypatch, bias):
    """Where the twin runs ("auto" on one thread: the pool off), LayerNorm's kept xhat and narrow output written as
    bf16 by its last passes compiled: bitwise the twin's float32 values then rounding, rstd the twin's."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    monkeypatch.setattr(pool, "_state", {"threads": 0})
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((4, 90, 96)) * 3 + 1).astype(np.float32)  # past auto's cut-over
    w, b = (rng.standard_normal(96).astype(np.float32) for _ in range(2))
    b = b if bias else None
    out, (xhat, rstd) = kernels("numpy", layernorm.layernorm_forward, x, w, b)
    for narrow in (True, False):
        o, (xh, rs) = kernels("auto", layernorm.layernorm_forward_bf16, x, w, b, bf16, narrow)
        assert np.array_equal(xh.view(np.uint16), xhat.astype(bf16).view(np.uint16))
        assert np.array_equal(rs, rstd) and rs.shape == rstd.shape
        want = out.astype(bf16) if narrow else out
        assert o.dtype == want.dtype and np.array_equal(o.view(np.uint8), want.view(np.uint8))
    assert layernorm._finish_bf16.jitted is not None, "the compiled pass ran"
    assert kernels("numpy", layernorm.layernorm_forward_bf16, x, w, b, bf16, True) is None


@pytest.mark.parametrize("mode", ["numba", "numpy", "auto"])
def test_bf16_layernorm_backward_reads_kept_xhat(kernels, monkeypatch, mode):
    """LayerNorm's backward given the kept bf16 xhat (B, and W's sums into and onto dw): bitwise the float32
    backward on the widened xhat ("auto" on one thread: the compiled sums against NumPy's einsum)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    monkeypatch.setattr(pool, "_state", {"threads": 0})
    rng = np.random.default_rng(9)
    dout = rng.standard_normal((4, 90, 96)).astype(np.float32)  # past auto's cut-over
    xhat = rng.standard_normal(dout.shape).astype(bf16)
    w, rstd = (
        rng.standard_normal(96).astype(np.float32),
        rng.uniform(0.5, 2, (4, 90, 1)).astype(np.float32),
    )

    def backward(x):
        dx = kernels(mode, layernorm.layernorm_backward_input, dout, (x, rstd), w)
        dw, db, dw0 = np.ones(96, np.float32), np.ones(96, np.float32), np.empty(96, np.float32)
        layernorm.layernorm_backward_weight(
            dout, x, dw, db, True
        )  # the mode set by kernels() above
        layernorm.layernorm_backward_weight(dout, x, dw0, None, False)
        return dx, dw, db, dw0

    for got, want in zip(backward(xhat), backward(xhat.astype(np.float32))):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("mode", ["numba", "numpy"])
@pytest.mark.parametrize("kept", ["float32", "bfloat16"])
def test_layernorm_backward_adds_into_the_residual(kernels, mode, kept):
    """LayerNorm's B given the residual's gradient adds its input gradient to it (in the kernel's pass where it
    runs): bitwise B's gradient then the addition, float32 and the kept bf16 xhat."""
    dtype = (
        np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if kept == "bfloat16" else np.float32
    )
    rng = np.random.default_rng(10)
    dout, res = (rng.standard_normal((4, 70, 96)).astype(np.float32) for _ in range(2))
    xhat = rng.standard_normal(dout.shape).astype(dtype)
    w, rstd = rng.standard_normal(96).astype(np.float32), rng.uniform(0.5, 2, (4, 70, 1))
    cache = (xhat, rstd.astype(np.float32))
    dx = kernels(mode, layernorm.layernorm_backward_input, dout, cache, w)
    target = res.copy()
    got = layernorm.layernorm_backward_input(dout, cache, w, target)  # the mode set above
    if mode == "numba":
        assert got is target, "the sum made in the kernel's pass"
    else:
        assert np.array_equal(got, dx) and np.array_equal(target, res), (
            "returned, for the caller to add"
        )
        got = target + got
    assert np.array_equal(got, res + dx)


@pytest.mark.parametrize("wide", [False, True])
def test_bf16_heads_rounded_in_the_pass(kernels, wide):
    """Attention's head layout, q's scale and the bf16 rounding in one pass (and the layout back): bitwise the
    transposed copy, the scaling, then rounding, NaN and infinities included."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = np.random.default_rng(6).standard_normal((3, 70, 3, 4, 40)).astype(np.float32)
    x[0, 0, :, 0, :2] = np.nan, -np.inf
    s = 1 / np.sqrt(40)
    want = np.ascontiguousarray(x.transpose(2, 0, 3, 1, 4))
    want[0] *= s
    back = np.ascontiguousarray(want.transpose(1, 3, 0, 2, 4))
    got = kernels("numba", rounding.heads_rounded, x, bf16, wide, s)
    merged = kernels("numba", rounding.heads_rounded, want, bf16, wide, None, True)
    for g, w in ((got, want), (merged, back)):
        w = kernels("numba", rounding.round_low_, w, bf16) if wide else w.astype(bf16)
        assert g.dtype == w.dtype and np.array_equal(g.view(np.uint8), w.view(np.uint8))


def test_bf16_softmax_rounded_in_the_pass(kernels):
    """The causal softmax and its backward (with and without the dropout mask) written as bf16 by the twin's last
    pass: bitwise the twin's float32 result then rounding."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(7)
    att = (rng.standard_normal((2, 3, 9, 16)) * 4).astype(np.float32)
    datt = rng.standard_normal(att.shape).astype(np.float32)
    keep = rng.uniform(size=att.shape) >= 0.2
    p = kernels("numpy", softmax.causal_softmax_, att)
    got = kernels("auto", softmax.causal_softmax_bf16, att, bf16)
    assert np.array_equal(got.view(np.uint16), p.astype(bf16).view(np.uint16))
    p16 = p.astype(bf16)  # the held probabilities: the backward reads them as they are
    for mask in ((), (keep, 1.25)):
        want = kernels("numpy", softmax.softmax_backward_, datt, p, *mask).astype(bf16)
        got = kernels("auto", softmax.softmax_backward_bf16, datt, p, bf16, *mask)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
        for mode in ("auto", "numba"):
            want = kernels(
                mode, softmax.softmax_backward_bf16, datt, p16.astype(np.float32), bf16, *mask
            )
            got = kernels(mode, softmax.softmax_backward_bf16, datt, p16, bf16, *mask)
            assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_bf16_round_into_with_bits(monkeypatch):
    """The compute copy's refresh (rounded float32 and its bf16 bits in one pass): bitwise round_low_ and the bits
    of every class (ties, NaNs, infinities, subnormals)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    x = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi]).view(np.float32)
    with np.errstate(invalid="ignore"):
        want = x.astype(bf16)
        for mode in ("numba", "numpy"):
            monkeypatch.setenv("HPC_LLM_KERNELS", mode)
            out, bits = np.empty_like(x), np.empty(x.size, np.uint16)
            rounding.round_into(x, out, bf16, bits)
            assert np.array_equal(bits, want.view(np.uint16)), mode
            assert np.array_equal(out.view(np.uint32), want.astype(np.float32).view(np.uint32)), (
                mode
            )


def test_bf16_kernels_leave_fp16_alone(monkeypatch):
    """fp16's kept values (2 bytes too) never reach the bf16 kernels: GELU's backward from float16 kept values is
    the float32 kernel's on the widened values, and the bf16 passes decline float16."""
    from hpc_llm.model.layers import gelu_backward_kept
    from hpc_llm.model.precision import Precision

    monkeypatch.setenv("HPC_LLM_KERNELS", "numba")
    rng = np.random.default_rng(8)
    f, t, dg = (rng.standard_normal((130, 256)).astype(np.float32) for _ in range(3))
    f16, t16 = f.astype(np.float16), np.tanh(t).astype(np.float16)
    want = bias_gelu.gelu_backward(dg.copy(), f16.astype(np.float32), t16.astype(np.float32))
    got = gelu_backward_kept(dg.copy(), f16, t16, Precision("fp16"))
    assert np.array_equal(got, want)
    fp16 = np.dtype(np.float16)
    assert bias_gelu.bias_gelu_forward_bf16(f.copy(), None, fp16) is None
    assert layernorm.layernorm_forward_bf16(f, f[0], None, fp16, True) is None
    assert softmax.causal_softmax_bf16(f.reshape(2, 65, 256)[:, :, :65].copy(), fp16) is None
