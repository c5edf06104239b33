"""The fused attention (kernels/attention.py, cuda/attention.cu): its Philox hash against Random123's known answers,
its twin against the unfused attention (SA.attention_forward/backward) within a derived bound in float64 and
float32, with and without dropout (the unfused ops fed the twin's masks), its masks the same whatever the heads' and
rows' split, and on a GPU (marked `gpu`) the kernels against the twin.

The bound (each output element, two computations of the same function in precision u, summing in other orders):
with A_ij = |q_i|.|k_j| (q scaled), a score is off by at most gamma_hd A_ij, so a probability's relative error is at
most a_i gamma_n with a_i = 1 + 2 max_j A_ij (the row's maximum and the sum of T terms shifted with it; n = hd + T +
T / TILE + 8 covers the dot products, the sums over T and the online rescalings), and every sum of products after
it (P V, P^T dO, dS K, dS^T q) is off by gamma_n relative to the sum of the products' magnitudes. So
|twin - unfused| <= 2 a gamma_n |M| per element, |M| the matching product of magnitudes (_magnitudes)."""

import numpy as np
import pytest
from helpers import probe_gpu

from hpc_llm.kernels import attention as flash
from hpc_llm.kernels.cuda import fused_attention
from hpc_llm.kernels.cuda.launches import xp as counted
from hpc_llm.model import attention as SA
from hpc_llm.model import layers
from hpc_llm.model.precision import FP32, Precision

cupy, NO_GPU = probe_gpu()
B, T, H, HD = 2, 70, 2, 16  # T: three tiles, the last partial


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32_10."""
    m = 0xFFFFFFFF
    cases = [
        ((0, 0, 0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((m, m, m, m, m, m), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for args, want in cases:
        assert [int(w) for w in flash.philox4x32(*args)] == list(want)


def _drop(p, rows=range(B), head0=0):
    if p == 0:
        return None
    rng = layers.DropoutRNG(7, 3, 1, rows).site(2)
    return flash.attention_dropout(rng.for_heads(head0, head0 + H, 2 * H) if head0 else rng, p)


class HashMasks:
    """A dropout rng for the unfused attention that draws the twin's masks: kept as 1.0, dropped as 0.0."""

    def __init__(self, drop):
        self.drop = drop

    def random(self, shape, dtype):
        q1 = shape[3]
        return flash.keep_tile(np, self.drop, H, q1 - shape[2], q1, 0, q1).astype(dtype)


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * H * HD)).astype(dtype)
    return qkv, rng.standard_normal((B, T, H * HD)).astype(dtype)


def _unfused(qkv, dy, p, drop):
    rng = HashMasks(drop) if p else None
    y, cache = SA.attention_forward(qkv.copy(), H, p, rng)
    return y, SA.attention_backward(dy.copy(), cache, H)


def _magnitudes(qkv, dy, drop):
    """(a per query row, |M| of y, dq, dk, dv): float64, from the exact function."""
    x = qkv.astype(np.float64)
    C = H * HD
    q, k, v = (
        x[:, :, i * C : (i + 1) * C].reshape(B, T, H, HD).transpose(0, 2, 1, 3) for i in range(3)
    )
    q = q / np.sqrt(HD)
    s = q @ k.transpose(0, 1, 3, 2) + layers.causal_mask(np, T, T, np.float64)
    P = np.exp(s - s.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    Z = np.ones_like(P) if drop is None else flash.keep_tile(np, drop, H, 0, T, 0, T) * drop.scale
    dO = dy.astype(np.float64).reshape(B, T, H, HD).transpose(0, 2, 1, 3)
    y = (P * Z) @ v
    A = np.abs(q) @ np.abs(k).transpose(0, 1, 3, 2) * (P > 0)
    a = 1 + 2 * A.max(-1, keepdims=True)
    dP = dO @ v.transpose(0, 1, 3, 2)
    D = (dO * y).sum(-1, keepdims=True)
    G = P * (Z * np.abs(dP) + np.abs(D) + Z * (np.abs(dO) @ np.abs(v).transpose(0, 1, 3, 2)))
    G += P * (np.abs(dO) * np.abs(y)).sum(-1, keepdims=True)
    mags = (
        (P * Z) @ np.abs(v),
        G @ np.abs(k) / np.sqrt(HD),
        G.transpose(0, 1, 3, 2) @ np.abs(q),
        (P * Z).transpose(0, 1, 3, 2) @ np.abs(dO),
    )
    return a, mags


def _split(t):
    """(B, H, T, hd) -> (B, T, H hd)."""
    return t.transpose(0, 2, 1, 3).reshape(B, T, H * HD)


def assert_within_bound(got, want, qkv, dy, drop, u):
    """got and want: (y, dqkv) of two computations; each element within the module's bound."""
    n = HD + T + T // flash.TILE + 8
    gamma = n * u / (1 - n * u)
    a, (my, mq, mk, mv) = _magnitudes(qkv, dy, drop)
    amax = a.max()
    bounds = [_split(2 * a * gamma * my)]
    bounds.append(
        np.concatenate(
            [_split(2 * a * gamma * mq), *(_split(2 * amax * gamma * m) for m in (mk, mv))], -1
        )
    )
    for g, w, bound, name in zip(got, want, bounds, ("y", "dqkv")):
        err = np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        assert (err <= bound).all(), (name, float((err / bound).max()))
        assert err.max() > 0 or u < 2**-40  # the two sum in different orders


@pytest.mark.timeout(60)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_twin_equals_the_unfused_attention_within_the_bound(dtype, p):
    qkv, dy = _inputs(dtype)
    drop = _drop(p)
    y, lse = flash.flash_forward(qkv, H, FP32, drop)
    dqkv = flash.flash_backward(dy, qkv, y, lse, H, FP32, drop)
    u = np.finfo(dtype).eps / 2
    assert_within_bound((y, dqkv), _unfused(qkv, dy, p, drop), qkv, dy, drop, u)


@pytest.mark.timeout(60)
def test_the_device_path_takes_the_fused_kernels_and_the_hash_masks():
    """attention_forward/backward on the device stand-in run the twin (bitwise), with a DropoutRNG's hash."""
    qkv, dy = _inputs(np.float32, 1)
    rng = layers.DropoutRNG(7, 3, 1, range(B)).site(2)
    y, cache = SA.attention_forward(counted.asarray(qkv), H, 0.2, rng, Precision("bf16"))
    assert isinstance(cache[2], fused_attention.FlashCache)
    dqkv = SA.attention_backward(counted.asarray(dy), cache, H, Precision("bf16"))
    drop = flash.attention_dropout(rng, 0.2)
    want_y, lse = flash.flash_forward(qkv, H, Precision("bf16"), drop)
    bf16 = Precision("bf16")
    kept, kept_y = (bf16.use(bf16.keep(x), np.float32) for x in (qkv, want_y))
    want = flash.flash_backward(dy, kept, kept_y, lse, H, bf16, drop)
    assert np.array_equal(np.asarray(y), want_y) and np.array_equal(np.asarray(dqkv), want)


@pytest.mark.timeout(60)
def test_masks_do_not_depend_on_the_split_of_heads_and_rows():
    """A tensor-parallel rank (heads h0..) and a data-parallel rank (rows r0..) draw the single process's masks;
    the fused attention of each part equals the whole's part bitwise. (Sequence parallelism gathers the whole
    sequence before attention: the masks' positions are global.)"""
    rng = np.random.default_rng(2)
    C2 = 2 * H * HD
    qkv = rng.standard_normal((2 * B, T, 3 * C2)).astype(np.float32)
    whole = flash.attention_dropout(layers.DropoutRNG(7, 3, 1, range(2 * B)).site(2), 0.2)
    y, _ = flash.flash_forward(qkv, 2 * H, FP32, whole)
    for h0 in (0, H):
        for r0 in (0, B):
            cols = [c * C2 + h0 * HD + j for c in range(3) for j in range(H * HD)]
            part = qkv[r0 : r0 + B][:, :, cols]
            drop = _drop(0.2, range(r0, r0 + B), h0)
            got, _ = flash.flash_forward(part, H, FP32, drop)
            assert np.array_equal(got, y[r0 : r0 + B, :, h0 * HD : (h0 + H) * HD]), (h0, r0)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU is not None, reason=str(NO_GPU))
@pytest.mark.timeout(120)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_kernels_equal_the_twin_on_a_gpu(precision, p):
    """HD 16: bf16 and fp16 multiply their tiles on tensor cores, fp32 in scalar loops."""
    qkv, dy = _inputs(np.float32, 3)
    prec, drop = Precision(precision), _drop(p)
    y, cache = fused_attention.flash_attention_forward(cupy, cupy.asarray(qkv), H, prec, drop)
    dqkv = fused_attention.flash_attention_backward(cupy, cupy.asarray(dy), cache, H, prec)
    want_y, lse = flash.flash_forward(qkv, H, prec, drop)
    kept, kept_y = (prec.use(prec.keep(x), np.float32) for x in (qkv, want_y))
    want = flash.flash_backward(dy, kept, kept_y, lse, H, prec, drop)
    # a 16-bit rounding may land either side
    u = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}[precision]
    got = (cupy.asnumpy(y), cupy.asnumpy(dqkv))
    assert_within_bound(got, (want_y, want), qkv, dy, drop, u)
