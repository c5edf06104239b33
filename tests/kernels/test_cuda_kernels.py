"""The CUDA kernels against their NumPy twins, on a GPU (marked `gpu`: skipped where CuPy or a GPU is missing, as
tests/model/test_gpu.py). Bitwise where the arithmetic is the same op for op (AdamW, compiled with --fmad=false),
within float32 rounding where the kernel sums in another order (norm, LayerNorm, softmax) or uses CUDA's tanh."""

import numpy as np
import pytest
from helpers import probe_gpu

from hpc_llm.config import TrainConfig
from hpc_llm.kernels.cuda import device
from hpc_llm.model import layers
from hpc_llm.optim import AdamW, global_grad_norm

cupy, NO_GPU = probe_gpu()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))]
RNG = np.random.default_rng(0)


def _launch(name, fn, n, *args, shared=0, blocks=None):
    k = device.module(name).get_function(fn)
    k((blocks or min(-(-n // 256), 4096),), (256,), args, shared_mem=shared)


@pytest.mark.timeout(60)
def test_adamw_and_norm_kernels_equal_the_numpy_optimizer():
    t = TrainConfig(weight_decay=0.1)
    p, g = (RNG.standard_normal(300_000).astype(np.float32) for _ in range(2))
    args = ([(1000, 170_000), (200_000, 290_000)], t)
    cpu = AdamW(p.copy(), g, *args, owned=[(0, 120_000), (150_000, 300_000)])
    gpu = AdamW(cupy.asarray(p), cupy.asarray(g), *args, owned=cpu.owned)
    for step in range(3):
        for o in (cpu, gpu):
            o.step(1e-2 * (step + 1), grad_scale=0.7)
    for a in ("p", "m", "v"):
        assert np.array_equal(getattr(cpu, a), cupy.asnumpy(getattr(gpu, a))), a
    comm = type("C", (), {"allreduce_scalar": staticmethod(lambda v: v)})
    want = global_grad_norm(g, cpu.owned, comm)
    assert abs(global_grad_norm(gpu.g, cpu.owned, comm) - want) <= 1e-12 * want


@pytest.mark.timeout(60)
def test_bias_gelu_forward_and_backward():
    rows, width = 96, 512
    h, bias = RNG.standard_normal((rows, width)).astype(np.float32), RNG.standard_normal(width)
    bias = bias.astype(np.float32)
    x = h + bias
    want, t = layers.gelu_forward(x)
    dh, db = cupy.asarray(h), cupy.asarray(bias)
    xo, out, to = (cupy.empty_like(dh) for _ in range(3))
    n = h.size
    _launch(
        "bias_gelu",
        "bias_gelu_forward",
        n,
        dh,
        db,
        xo,
        out,
        0,
        to,
        np.int64(n),
        np.int32(width),
        np.int32(0),
    )
    np.testing.assert_allclose(cupy.asnumpy(out), want, rtol=4e-6, atol=4e-6)
    dout = RNG.standard_normal((rows, width)).astype(np.float32)
    want_dx = layers.gelu_backward(dout.copy(), x, t.copy())
    dd = cupy.asarray(dout)
    _launch("bias_gelu", "bias_gelu_backward", n, dd, xo, to, np.int64(n), np.int32(0))
    np.testing.assert_allclose(cupy.asnumpy(dd), want_dx, rtol=4e-6, atol=4e-6)


@pytest.mark.timeout(60)
def test_layernorm_and_softmax():
    rows, C = 64, 384
    x, w, b = (
        RNG.standard_normal((rows, C)).astype(np.float32),
        *(RNG.standard_normal((2, C)).astype(np.float32)),
    )
    want, (xhat, rstd) = layers.layernorm_forward(x, w, b)
    dx, dw, db = cupy.asarray(x), cupy.asarray(w), cupy.asarray(b)
    out, xh, rs = cupy.empty_like(dx), cupy.empty_like(dx), cupy.empty(rows, np.float32)
    args = (dx, dw, db, out, xh, rs, np.int32(C), np.int32(0))
    _launch("layernorm", "layernorm_forward", 0, *args, shared=256 * 4, blocks=rows)
    np.testing.assert_allclose(cupy.asnumpy(out), want, rtol=1e-5, atol=1e-5)
    Tq = Tk = 128
    att = RNG.standard_normal((2, Tq, Tk)).astype(np.float32)
    want = layers.causal_softmax_(att.copy()[None])[0]
    da = cupy.asarray(att)
    args = (da, np.int32(Tq), np.int32(Tk), np.int32(0), np.int32(0))
    _launch("softmax", "masked_softmax_forward", 0, *args, shared=256 * 4, blocks=2 * Tq)
    np.testing.assert_allclose(cupy.asnumpy(da), want, rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_rounding_and_dropout_scale_bitwise(precision):
    from hpc_llm.model.precision import Precision

    prec = Precision(precision)
    x = (RNG.standard_normal(100_000) * 100).astype(np.float32)
    got = prec.round_(cupy.asarray(x))
    assert np.array_equal(cupy.asnumpy(got), prec.round_(x.copy()))
    keep = RNG.random(x.size) >= 0.1
    mask = layers.DropoutMask(keep, 1.0 / 0.9)
    dmask = layers.DropoutMask(cupy.asarray(keep), 1.0 / 0.9)
    assert np.array_equal(cupy.asnumpy(dmask.scaled(cupy.asarray(x))), mask.scaled(x))


@pytest.mark.timeout(60)
def test_bias_dropout_residual_equals_its_twin_bitwise():
    from hpc_llm.kernels.dropout_residual import dropout_residual_numpy

    x, a = (RNG.standard_normal((64, 384)).astype(np.float32) for _ in range(2))
    bias, keep = RNG.standard_normal(384).astype(np.float32), RNG.random((64, 384)) >= 0.1
    want = dropout_residual_numpy(x.copy(), a.copy(), keep, 1 / 0.9, bias)
    args = [cupy.asarray(v) for v in (x, a, keep)]
    got = device.dropout_residual_(cupy, *args, 1 / 0.9, None, cupy.asarray(bias))
    assert np.array_equal(cupy.asnumpy(got), want)
    assert np.array_equal(cupy.asnumpy(args[1]), a)  # the branch is only read


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_narrow_and_widen_equal_the_rounded_float32_bitwise(fmt):
    """Precision.keep on CuPy: 2 bytes an element (bf16 as uint16 bit patterns: CuPy has no bfloat16); use widens
    them to exactly the float32-rounded values of the CPU path."""
    from hpc_llm.model.precision import Precision

    prec = Precision(fmt)
    x = RNG.standard_normal(100_000).astype(np.float32) * 100
    x[:7] = [np.nan, np.inf, -np.inf, 1e-40, -0.0, 1 + 2**-8, 1 + 3 * 2**-8]
    kept = prec.keep(cupy.asarray(x))
    assert kept.nbytes == 2 * x.size
    back = cupy.asnumpy(prec.use(kept, np.float32))
    want = prec.operand(x.copy()).view(np.uint32)
    assert np.array_equal(back.view(np.uint32), want)
    kept2, back2 = prec.keep_use(cupy.asarray(x), np.float32)  # narrow_round: both in one pass
    assert np.array_equal(cupy.asnumpy(kept2), cupy.asnumpy(kept))
    assert np.array_equal(cupy.asnumpy(back2).view(np.uint32), want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_16_bit_weight_gemm_and_refresh_equal_their_twins(fmt):
    """GPT.refresh_compute's kernel stores the bits the twin stores (bitwise), and cublasGemmEx on the 2-byte
    operands (kernels/cuda/gemm16) equals the exact product of the values within gamma_K |a| |b| (exact products
    summed in float32 in some order), plus one rounding where it adds to a float32 gradient: a weight, its
    transpose, and a transposed kept input."""
    from hpc_llm.kernels.cuda import gemm16, twins
    from hpc_llm.model.precision import Precision

    prec = Precision(fmt)
    master = RNG.standard_normal(70_000).astype(np.float32)
    runs = [(5, 1000), (60_000, 60_123)]
    table = device.WideRuns(cupy, runs)
    bits = cupy.empty(master.size, dtype=device.storage_dtype(cupy, prec))
    wide = cupy.empty(table.total, dtype=np.float32)
    device.refresh_compute(cupy, cupy.asarray(master), bits, wide, table, prec)
    want_bits, want_wide = np.empty(master.size, prec.low), np.empty(table.total, np.float32)
    twins.refresh_compute(master, want_bits, want_wide, runs, prec.low)
    assert np.array_equal(cupy.asnumpy(bits).view(np.uint16), want_bits.view(np.uint16))
    assert np.array_equal(cupy.asnumpy(wide), want_wide)
    M, K, N = 70, 300, 90
    x_host = prec.operand(RNG.standard_normal((M, K)).astype(np.float32))
    w_bits = prec.keep(cupy.asarray(RNG.standard_normal((K, N)).astype(np.float32)))
    x_bits = prec.keep(cupy.asarray(x_host))
    w_host = prec.use(w_bits, np.float32).get()
    start = RNG.standard_normal((K, N)).astype(np.float32)

    def bound(a, b, got, want):
        k, u = a.shape[1], 2.0**-24
        err = k * u / (1 - k * u) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
        return np.all(np.abs(got - want) <= err + 2**-24 * np.abs(want))

    # forward (x @ w), input gradient (x' @ w^T: a transposed weight), weight gradient added (x^T @ dy into dw)
    dy = x_host[:, :N]
    for a, b, a_dev, b_dev, acc in (
        (x_host, w_host, cupy.asarray(x_host), w_bits, False),
        (
            x_host[:, :N],
            w_host.T,
            cupy.asarray(np.ascontiguousarray(x_host[:, :N])),
            w_bits.T,
            False,
        ),
        (x_host.T, dy, x_bits.T, cupy.asarray(np.ascontiguousarray(dy)), True),
    ):
        out = cupy.asarray(start) if acc else None
        got = cupy.asnumpy(gemm16.matmul16(a_dev, b_dev, prec, out, acc))
        want = a.astype(np.float64) @ b.astype(np.float64) + (start if acc else 0)
        assert bound(a, b, got, want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_wire_message_kernels_equal_write16_and_read16_bitwise(fmt):
    """A pipeline message's words made on the device (wire_narrow, with fp16's scale) and widened there
    (wire_widen) are bitwise compression.write16's and read16's."""
    from hpc_llm.backend import low_dtype
    from hpc_llm.kernels.cuda import wire
    from hpc_llm.parallel.compression import read16, scale_of, write16

    x = (RNG.standard_normal(5000) * np.exp(RNG.uniform(-12, 3, 5000))).astype(np.float32)
    x[:4] = [np.nan, np.inf, -0.0, 1e-40]
    s = scale_of(fmt, x[4:])
    want = np.empty(x.size + 2, dtype=np.uint16)
    write16(want, 0, x, low_dtype(fmt), s)
    words = wire.narrow_message(cupy, cupy.asarray(x), fmt, s)
    assert np.array_equal(cupy.asnumpy(words), want)
    out = cupy.empty(x.size, dtype=np.float32)
    wire.widen_message(cupy, cupy.asarray(want), out, fmt)
    assert np.array_equal(
        cupy.asnumpy(out).view(np.uint32), read16(want, 0, x.size, low_dtype(fmt)).view(np.uint32)
    )
