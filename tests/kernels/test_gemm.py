"""kernels/gemm.py: oneDNN's bf16 GEMM and matmul primitive against float64 products of the same bf16 operands, and
when each is used.

The bound: the products of bf16 values are exact in float32 (8 + 8 significant bits), so the only error is the
float32 summation's; K terms summed in any order (oneDNN's blocking, the instruction's pairs) are within
gamma_K = K u / (1 - K u), u = 2^-24, of sum |a_k| |b_k| (Higham, Accuracy and Stability, 3.1); accumulating into
out adds one more term and one more rounding: gamma_{K+1} of |a| |b| + |out|. Inputs here are standard normal, far
from the subnormals oneDNN flushes to zero.
"""

import numpy as np
import pytest

from hpc_llm.kernels import gemm, pool
from hpc_llm.model.precision import FP32, Precision

pytest.importorskip("ml_dtypes")  # bf16 (the test extras install it)
BF16 = Precision("bf16")
needs_onednn = pytest.mark.skipif(
    gemm.onednn_gemm() is None,
    reason="oneDNN's bf16 GEMM unavailable: onednn-cpu-gomp not installed (HPC_LLM_DNNL_LIB unset) or the CPU "
    "reports neither avx512_bf16 nor amx_bf16",
)


@pytest.fixture(params=["primitive", "gemm"])
def path(request, monkeypatch):
    """Every oneDNN product on the matmul primitive (checked: it took each), then on the GEMM API, whatever
    _primitive_first's rule would choose."""
    on_primitive = request.param == "primitive"
    if on_primitive:
        prims = gemm.onednn_primitives()
        if prims is None:
            pytest.skip("oneDNN's matmul primitive unavailable")
        real = prims.run
        monkeypatch.setattr(prims, "run", lambda *args: real(*args) or pytest.fail("refused"))
    monkeypatch.setattr(gemm, "_primitive_first", lambda a, b, bf16: on_primitive)
    return request.param


def gamma(k: int) -> float:
    u = 2.0**-24
    return k * u / (1 - k * u)


def bf16_values(rng, shape, layout: str):
    """Float32 values already bf16, shape (..., R, C); layout "t": a transposed view of a contiguous (..., C, R)."""
    swap = shape[:-2] + (shape[-1], shape[-2])
    x = rng.standard_normal(swap if layout == "t" else shape).astype(np.float32)
    x = BF16.operand(x)
    return np.swapaxes(x, -1, -2) if layout == "t" else x


def assert_within_gamma(got, a, b, c0=None):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact, mag = a64 @ b64, np.abs(a64) @ np.abs(b64)
    K = a.shape[-1]
    if c0 is not None:
        exact, mag, K = exact + c0, mag + np.abs(c0), K + 1
    ratio = np.max(np.abs(got - exact) / (gamma(K) * mag))
    assert ratio <= 1, f"error {ratio:.3g} x gamma_K |a||b|"


@needs_onednn
@pytest.mark.parametrize("layout", ["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_bf16_matmul_within_gamma_k(layout, accumulate, path):
    """Odd sizes, each transposition (passed to oneDNN as its flag or strides, no copy), overwrite and accumulate."""
    rng = np.random.default_rng(0)
    M, K, N = 67, 131, 45
    a, b = bf16_values(rng, (M, K), layout[0]), bf16_values(rng, (K, N), layout[1])
    c0 = rng.standard_normal((M, N)).astype(np.float32)
    out = c0.copy()
    got = gemm.bf16_matmul(a, b, out, accumulate)
    assert got is out
    assert_within_gamma(out, a, b, c0.astype(np.float64) if accumulate else None)


@needs_onednn
@pytest.mark.parametrize("accumulate", [False, True])
def test_bf16_matmul_batched_into_a_strided_view(accumulate, path):
    """Attention's shapes: (B, H, q, hd) by a slice of keys transposed, into a block of rows of a larger array."""
    rng = np.random.default_rng(1)
    q = bf16_values(rng, (2, 3, 33, 16), "n")
    k = bf16_values(rng, (2, 3, 40, 16), "n")[:, :, :29]
    dq = rng.standard_normal((2, 3, 50, 29)).astype(np.float32)
    c0 = dq[:, :, 7:40].astype(np.float64)
    before = dq.copy()
    gemm.bf16_matmul(q, k.transpose(0, 1, 3, 2), dq[:, :, 7:40], accumulate)
    assert_within_gamma(dq[:, :, 7:40], q, k.transpose(0, 1, 3, 2), c0 if accumulate else None)
    assert np.array_equal(dq[:, :, :7], before[:, :, :7]) and np.array_equal(
        dq[:, :, 40:], before[:, :, 40:]
    )
    # leading axes broadcast: one matrix by a batch
    w = bf16_values(rng, (16, 21), "n")
    assert_within_gamma(gemm.bf16_matmul(q, w), q, w)


@pytest.mark.skipif(gemm.onednn_sgemm() is None, reason="oneDNN unavailable")
@pytest.mark.parametrize("layout", ["nn", "nt", "tn", "tt"])
def test_float32_products_within_gamma_k(layout, path):
    """sgemm_matmul on either path: odd sizes, each transposition, a batch of transposed views accumulated into a
    strided block, one matrix broadcast against a batch."""
    rng = np.random.default_rng(6)

    def f32(shape, t):
        x = rng.standard_normal(shape[:-2] + (shape[-1], shape[-2]) if t else shape)
        return np.swapaxes(x.astype(np.float32), -1, -2) if t else x.astype(np.float32)

    a, b = f32((67, 131), layout[0] == "t"), f32((131, 45), layout[1] == "t")
    assert_within_gamma(gemm.sgemm_matmul(a, b), a, b)
    a, b = f32((2, 3, 33, 16), layout[0] == "t"), f32((2, 3, 16, 29), layout[1] == "t")
    dq = rng.standard_normal((2, 3, 50, 29)).astype(np.float32)
    before = dq.copy()
    assert gemm.sgemm_matmul(a, b, dq[:, :, 7:40], True).base is dq
    assert_within_gamma(dq[:, :, 7:40], a, b, before[:, :, 7:40].astype(np.float64))
    assert np.array_equal(dq[:, :, :7], before[:, :, :7]) and np.array_equal(
        dq[:, :, 40:], before[:, :, 40:]
    )
    w = f32((16, 21), layout[1] == "t")
    assert_within_gamma(gemm.sgemm_matmul(a, w), a, w)


@needs_onednn
def test_primitive_rule_refusals_and_cache(monkeypatch):
    """The measured rule (module docstring): batched products on the primitive, single ones in bf16 unless a is a
    transposed view, in float32 only then and large enough. A layout the primitive refuses (a negative stride)
    leaves out untouched and the product runs on the GEMM API; a created primitive is reused for the same layout;
    without the primitive everything runs on the GEMM API."""
    prims = gemm.onednn_primitives()
    if prims is None:
        pytest.skip("oneDNN's matmul primitive unavailable")
    x, t, batch = np.ones((8, 8)), np.ones((8, 8)).T, np.ones((2, 8, 8))
    assert gemm._primitive_first(x, t, True) and not gemm._primitive_first(t, x, True)
    assert not gemm._primitive_first(x, t, False) and not gemm._primitive_first(t, x, False)
    side = 1 << 10  # M N = 2^20, past PRIMITIVE_F32_MIN_MN
    wide = np.ones((side, side), np.float32)
    assert gemm._primitive_first(wide.T, wide, False) and not gemm._primitive_first(
        wide, wide, False
    )
    assert gemm._primitive_first(batch, t, True) and gemm._primitive_first(batch, x, False)
    rng = np.random.default_rng(7)
    a, b = bf16_values(rng, (96, 80), "n"), bf16_values(rng, (80, 72), "n")
    bits = [x.astype(BF16.low).view(np.uint16) for x in (a, b)]
    out = np.full((96, 72), 3.0, np.float32)
    assert not prims.run(bits[0][::-1], bits[1], out) and np.all(out == 3)
    assert_within_gamma(gemm.bf16_matmul(a[::-1], b), a[::-1], b)
    size = len(prims.cache)
    assert prims.run(*bits, out, True) and len(prims.cache) == size + 1
    assert_within_gamma(out, a, b, np.full((96, 72), 3.0))
    again = out.copy()
    assert prims.run(*bits, again, True) and len(prims.cache) == size + 1
    monkeypatch.setattr(gemm, "_state", {**gemm._state, "primitives": None})
    monkeypatch.setattr(prims, "run", lambda *args: pytest.fail("the primitive ran"))
    assert_within_gamma(gemm.bf16_matmul(a, b), a, b)
    assert_within_gamma(gemm.sgemm_matmul(b.T, a.T), b.T, a.T)


@needs_onednn
def test_matmul_takes_onednn_only_where_it_pays(monkeypatch):
    """bf16 products past the cut-overs go to oneDNN; fp32 ones, small ones and few rows stay on BLAS, bitwise."""
    calls = []
    real = gemm.bf16_matmul
    monkeypatch.setattr(gemm, "bf16_matmul", lambda *args: calls.append(1) or real(*args))
    rng = np.random.default_rng(2)
    big = bf16_values(rng, (128, 256), "n"), bf16_values(rng, (256, 128), "n")
    gemm.matmul(*big, prec=BF16)
    assert calls == [1]
    for a, b, prec in [
        (*big, FP32),
        (big[0][:64, :64], big[1][:64, :64], BF16),
        (big[0][:2], big[1], BF16),
    ]:
        assert np.array_equal(gemm.matmul(a, b, prec=prec), a @ b)
    assert calls == [1]


def test_dispatch_without_the_library_or_the_instructions(monkeypatch, tmp_path):
    """No oneDNN when the CPU lacks avx512_bf16/amx_bf16 or no library loads, nor under HPC_LLM_KERNELS=numpy, nor
    for fp32: the float32 BLAS product then runs, bitwise today's."""
    rng = np.random.default_rng(3)
    a = BF16.operand(rng.standard_normal((128, 256)).astype(np.float32))
    b = BF16.operand(rng.standard_normal((256, 128)).astype(np.float32))
    assert not gemm.cpu_has_bf16("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512bw\n")
    assert gemm.cpu_has_bf16("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")

    def fake_gemm(*args):
        raise AssertionError("oneDNN called")

    monkeypatch.setattr(gemm, "_state", {"gemm": fake_gemm})
    assert gemm.uses_onednn(a, b, BF16)
    monkeypatch.setenv("HPC_LLM_KERNELS", "numpy")
    assert not gemm.uses_onednn(a, b, BF16)
    monkeypatch.delenv("HPC_LLM_KERNELS")
    assert not gemm.uses_onednn(a, b, FP32)

    monkeypatch.setattr(gemm, "_state", {})
    monkeypatch.setattr(gemm, "cpu_has_bf16", lambda: False)
    assert gemm.onednn_gemm() is None and not gemm.uses_onednn(a, b, BF16)
    assert np.array_equal(gemm.matmul(a, b, prec=BF16), a @ b)

    monkeypatch.setattr(gemm, "_state", {})
    monkeypatch.setattr(gemm, "cpu_has_bf16", lambda: True)
    monkeypatch.setenv("HPC_LLM_DNNL_LIB", str(tmp_path / "libdnnl.so.3"))
    monkeypatch.setattr(gemm.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(gemm.ctypes.util, "find_library", lambda name: None)
    # the shared pool decides again, as a process without the library would: off (no oneDNN sgemm to run on)
    monkeypatch.setattr(pool, "_state", {})
    assert gemm.onednn_gemm() is None and not gemm.uses_onednn(a, b, BF16)
    assert pool.pool_threads() == 0
    out = np.ones((128, 128), np.float32)
    gemm.matmul(a, b, out, True, BF16)
    assert np.array_equal(out, 1 + a @ b)


@needs_onednn
@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
def test_bf16_operands_pass_through_bitwise(layout, monkeypatch):
    """bfloat16 arrays (kept activations: Precision.gemm_use / gemm_operand) give bitwise the product of the same
    values held in float32, on oneDNN (any row stride, batched into a strided view) and on BLAS (small: widened)."""
    monkeypatch.setattr(gemm, "MIN_MACS", 1 << 16)
    monkeypatch.setattr(gemm, "MIN_MACS_HELD", 1 << 16)
    rng = np.random.default_rng(4)
    a, b = bf16_values(rng, (2, 96, 80), layout[0]), bf16_values(rng, (80, 72), layout[1])
    low = BF16.low
    a16, b16 = (x.astype(low, order="K") for x in (a, b))
    assert gemm.uses_onednn(a16[0], b16, BF16)
    for x, y in [(a16[0], b16), (a[0], b16), (a16[0][::2], b16), (a16[0], b16[:, 1:70])]:
        want = gemm.matmul(x.astype(np.float32), y.astype(np.float32), prec=BF16)
        assert np.array_equal(gemm.matmul(x, y, prec=BF16), want)
    out = np.zeros((2, 100, 72), np.float32)
    gemm.matmul(a16, b16, out[:, 3:99], False, BF16)
    assert np.array_equal(out[:, 3:99], gemm.matmul(a, b, prec=BF16))
    small = a16[0][:8], b16
    assert not gemm.uses_onednn(*small, BF16)
    assert np.array_equal(gemm.matmul(*small, prec=BF16), a[0][:8] @ b)


@needs_onednn
def test_shared_bits_are_read_for_views_of_their_values(monkeypatch):
    """A float32 array whose bits are shared (share_bf16_bits: the weights' compute copy) is multiplied from those
    bits, through any view (a slice, a transposed reshape), with no conversion; a stale entry is never read."""
    monkeypatch.setattr(gemm, "MIN_MACS", 1 << 16)
    rng = np.random.default_rng(5)
    values = BF16.operand(rng.standard_normal(4 * 96 * 80).astype(np.float32))
    bits = values.astype(BF16.low).view(np.uint16)
    gemm.share_bf16_bits(values, bits)
    w = values[96 * 80 : 2 * 96 * 80].reshape(80, 96)
    x = BF16.operand(rng.standard_normal((128, 96)).astype(np.float32))
    want = gemm.matmul(x[:, :80], w.copy(), prec=BF16), gemm.matmul(x, w.T.copy(), prec=BF16)
    monkeypatch.setattr(gemm, "_bits", lambda x: pytest.fail("a shared operand converted"))
    assert np.array_equal(gemm.matmul(x[:, :80].astype(BF16.low), w, prec=BF16), want[0])
    assert np.array_equal(gemm.matmul(x.astype(BF16.low), w.T, prec=BF16), want[1])
    key = id(values)
    del values, w
    assert key not in gemm._shared_bits
