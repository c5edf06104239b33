"""Mixed precision (train.precision = bf16 | fp16) against float64 twins, within bounds derived from unit roundoff;
fp16's loss scaler; checkpoints that move between precisions and layouts.

Notation: u the format's unit roundoff (bf16 2^-8, fp16 2^-11), u32 = 2^-24, K a dot product's length. An operand
rounded to the format is x(1 + d) with |d| <= u; a product of two rounded operands is off by at most (2u + u^2) of
its magnitude, and an fp32 sum of K terms adds at most K u32 of the sum of magnitudes (Higham, Accuracy and Stability
of Numerical Algorithms, 3.1). So for c = sum_k a_k b_k computed from rounded a, b in fp32, against the exact c:

    |c~ - c| <= (2u + u^2 + K u32) * sum_k |a_k| |b_k|                                     (1)

which the tests check entry by entry for the linear layers' forward and backward. LayerNorm keeps its normalised
input xhat (|xhat| ~ 1) in the format; its backward is linear in xhat's entries with coefficients bounded by
rstd (|dxhat| + mean |dxhat xhat|), so rounding xhat moves dx by at most (3u + C u32) rstd |xhat| mean(|dxhat||xhat|) +
u rstd mean(|dxhat| |xhat|) per entry (first order, u^2 terms dropped and covered by the factor 2 below).
Attention and the whole model compose many such steps: there the tests use first-order normwise bounds, stated where
they are used.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check, crc, run_config, train
from mpi4py import MPI

from hpc_llm.config import ModelConfig
from hpc_llm.model import attention as SA
from hpc_llm.model import layers as L
from hpc_llm.model import tensor_parallel as TP
from hpc_llm.model.gpt import GPT
from hpc_llm.model.modules import LayerNorm
from hpc_llm.model.precision import UNIT_ROUNDOFF, Precision
from hpc_llm.optim import LossScaler
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.grid import make_grid, single_process_grid

U32 = 2.0**-24
LOW = ["bf16", "fp16"]


def rng_arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


@pytest.mark.parametrize("name", LOW + ["fp32"])
def test_linear_forward_and_backward_within_the_rounding_bound(name):
    """ColumnParallelLinear in the format against float64 with the unrounded operands, every entry within (1)."""
    prec, u = Precision(name), UNIT_ROUNDOFF[name]
    B, T, K, N = 3, 5, 48, 24
    x64, w64, b64, dy64 = rng_arrays(0, (B, T, K), (K, N), (N,), (B, T, N))
    # the compute copy: the master weight rounded to the format
    w = prec.operand(w64.astype(np.float32))
    dw, db = np.zeros_like(w), np.zeros(N, np.float32)
    layer = TP.ColumnParallelLinear(
        L.Param(w, dw), L.Param(b64.astype(np.float32), db), Comm(None), prec
    )
    y, cache = layer.forward(x64.astype(np.float32))
    # kept in the format
    assert y.dtype == np.float32 and (name == "fp32" or cache.dtype == prec.low)
    if name != "fp32":
        assert cache.nbytes == x64.size * 2
    dx = layer.backward(dy64.astype(np.float32), cache, accumulate=False)
    x2, dy2 = x64.reshape(-1, K), dy64.reshape(-1, N)
    factor = 2 * u + u * u + (K + 2) * U32  # products, the sum, and the fp32 inputs' own rounding
    checks = {
        "y": (
            y.reshape(-1, N),
            x2 @ w64 + b64,
            factor * (np.abs(x2) @ np.abs(w64)) + 2 * U32 * np.abs(b64),
        ),
        "dx": (dx.reshape(-1, K), dy2 @ w64.T, factor * (np.abs(dy2) @ np.abs(w64).T)),
        "dw": (dw, x2.T @ dy2, (2 * u + u * u + (B * T + 2) * U32) * (np.abs(x2).T @ np.abs(dy2))),
        "db": (db, dy2.sum(0), (u + (B * T + 2) * U32) * np.abs(dy2).sum(0)),
    }
    for what, (got, want, bound) in checks.items():
        ratio = np.max(np.abs(got - want) / bound)
        assert ratio <= 1, f"{name} {what}: error {ratio:.2f} x the bound"
    if name != "fp32":  # the bound is tight enough to see the format: fp32's would fail
        err = np.abs(y.reshape(-1, N) - checks["y"][1])
        assert np.max(err / ((2 * U32 + (K + 2) * U32) * (np.abs(x2) @ np.abs(w64)))) > 1


@pytest.mark.parametrize("name", LOW)
def test_layernorm_backward_with_its_input_kept_in_the_format(name):
    prec, u = Precision(name), UNIT_ROUNDOFF[name]
    x64, w64, dout64 = rng_arrays(1, (4, 6, 32), (32,), (4, 6, 32))
    x64 = x64 * 3 + 1
    w, dw = w64.astype(np.float32), np.zeros(32, np.float32)
    ln = LayerNorm(L.Param(w, dw), L.NO_PARAM, prec)
    out, cache = ln.forward(x64.astype(np.float32))
    assert cache[0].dtype == prec.low
    dx = ln.backward(dout64.astype(np.float32), cache, accumulate=False)
    mean = x64.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + L.LN_EPS)
    xhat = (x64 - mean) * rstd
    dxhat = dout64 * w64
    want = rstd * (
        dxhat - dxhat.mean(-1, keepdims=True) - xhat * (dxhat * xhat).mean(-1, keepdims=True)
    )
    m = (np.abs(dxhat) * np.abs(xhat)).mean(-1, keepdims=True)
    # first order in u (the docstring's), doubled for the u^2 terms; plus fp32's rounding of the same expression
    bound = 2 * (3 * u * rstd * np.abs(xhat) * m + u * rstd * m) + 64 * U32 * rstd * (
        np.abs(dxhat) + np.abs(dxhat).mean(-1, keepdims=True) + np.abs(xhat) * m
    )
    assert np.max(np.abs(dx - want) / bound) <= 1
    assert (
        np.max(
            np.abs(dw - (dout64 * xhat).sum((0, 1)))
            / ((u + 30 * U32) * (np.abs(dout64) * np.abs(xhat)).sum((0, 1)))
        )
        <= 1
    )


@pytest.mark.parametrize("name", LOW)
def test_attention_within_a_first_order_bound(name):
    """Attention's forward and backward in the format against float64. First order: the operands q, k, v, the
    probabilities p, dy and the score gradient are each rounded once (relative u); a score s = q.k moves by at most
    2u sum|q||k| <= 2u S (S: the largest sum|q_d||k_d| of the row), which moves p by at most 2 p max|ds| (softmax's
    Jacobian: dp = p (ds - p.ds)), so y = p v by at most (4 S + 2) u (p |v|) per entry; normwise, every output of
    the backward passes through at most 6 rounded operands, each amplified by at most (1 + 4 S): we check
    ||d~ - d|| <= 6 (1 + 4 S) u ||d||, and that the error is above fp32's (a sanity check that rounding happened)."""
    prec, u = Precision(name), UNIT_ROUNDOFF[name]
    B, T, H, hd = 2, 9, 2, 4
    qkv64, dy64 = rng_arrays(2, (B, T, 3 * H * hd), (B, T, H * hd))
    qkv64 *= 0.7
    y, cache = SA.attention_forward(qkv64.astype(np.float32), H, prec=prec)
    dqkv = SA.attention_backward(dy64.astype(np.float32), cache, H, prec)
    y64, cache64 = SA.attention_forward(qkv64, H)
    dqkv64 = SA.attention_backward(dy64.copy(), cache64, H)
    q, k, v = SA.split_heads(qkv64, H)
    scale = 1 / np.sqrt(hd)
    S = (np.abs(q) * scale) @ np.abs(k).transpose(0, 1, 3, 2)
    S_row = S.max(-1)  # (B, H, T)
    assert len(cache64[1]) == 1  # T < ATTN_BLOCK: one query block, whose probabilities are all of p
    p = cache64[1][0]
    pv = SA.merge_heads(p @ np.abs(v))
    bound_y = (4 * SA.merge_heads(np.repeat(S_row[..., None], hd, -1)) + 2) * u * pv + 1e-6 * u
    assert np.max(np.abs(y - y64) / bound_y) <= 1
    s_max = float(S.max())
    err = np.linalg.norm(dqkv - dqkv64) / np.linalg.norm(dqkv64)
    assert err <= 6 * (1 + 4 * s_max) * u, (err, s_max)
    assert err > 10 * U32


@pytest.mark.parametrize("name", LOW)
def test_model_gradient_against_float64(name):
    """The whole model (2 layers; its weights perturbed so no term is trivially small) in the format vs the same
    model in float64: loss and every parameter's gradient, normwise per tensor. (Without dropout: masks are drawn in
    the compute dtype, so a float64 model draws other masks than a float32 one.)
    First-order bound: a gradient reaches a tensor through at most
    n = 2 + 8 L rounded operands (head: 2; per block on the way: 4 matmuls' input and output gradients), each
    relative u, amplified by at most 4 (softmax and LayerNorm Jacobians at these scales, as in the attention test):
    ||g~ - g|| <= 4 n u ||g||. The loss is a mean of log-softmaxes of logits off by (2u + K u32) relative."""
    u = UNIT_ROUNDOFF[name]
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=30, dtype="float64")
    ref = GPT(cfg, seed=4)
    ref.flat += np.random.default_rng(1).standard_normal(ref.flat.size) * 0.3
    cfg32 = ModelConfig(**{**cfg.__dict__, "dtype": "float32"})
    low = GPT(cfg32, seed=4, precision=name)
    low.flat[:] = ref.flat
    low.refresh_compute()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 30, (3, 8)), rng.integers(0, 30, (3, 8))
    loss64 = ref.forward(x, y, keep_cache=True)
    loss = low.forward(x, y, keep_cache=True)
    ref.backward()
    low.backward()
    assert abs(loss - loss64) <= 4 * (2 * u + 16 * U32) * max(1.0, loss64)
    n = 2 + 8 * cfg.n_layer
    worst = 0.0
    for name_, g64 in ref.grads.items():
        g = low.grads[name_].astype(np.float64)
        if np.linalg.norm(g64) == 0:
            assert np.linalg.norm(g) == 0, name_
            continue
        err = np.linalg.norm(g - g64) / np.linalg.norm(g64)
        worst = max(worst, err)
        assert err <= 4 * n * u, (name_, err, 4 * n * u)
    assert worst > 100 * U32  # the format, not fp32, is what the run used


# each check's products: a linear layer's 3 (forward, dx, dw); attention's 2 forward and 4 backward (one query
# block); the model's 4 linears and an attention a block, and the head's 3
@pytest.mark.parametrize(
    "check, products",
    [
        (test_linear_forward_and_backward_within_the_rounding_bound, 3),
        (test_attention_within_a_first_order_bound, 6),
        (test_model_gradient_against_float64, 2 * (4 * 3 + 6) + 3),
    ],
)
def test_bf16_on_onednn_within_the_same_bounds(monkeypatch, check, products):
    """Every bf16 product on oneDNN's bf16 GEMM (kernels/gemm.py, its size cut-overs set to 0): the arithmetic
    differs from the float32 GEMM's only in the order of the sums, so the bounds above hold as they are."""
    from hpc_llm.kernels import gemm

    if gemm.onednn_gemm() is None:
        pytest.skip("oneDNN's bf16 GEMM unavailable (onednn-cpu-gomp, avx512_bf16 or amx_bf16)")
    monkeypatch.setattr(gemm, "MIN_MACS", 0)
    monkeypatch.setattr(gemm, "MIN_SIDE", 0)
    calls = []
    real = gemm.bf16_matmul
    monkeypatch.setattr(gemm, "bf16_matmul", lambda *args: calls.append(1) or real(*args))
    check("bf16")
    assert len(calls) == products


def test_fp32_on_the_shared_pool_within_the_same_bound(monkeypatch):
    """fp32 products on oneDNN's sgemm (the shared thread pool on, kernels/pool.py; its size cut-over set to 0):
    only the order of the float32 sums differs from OpenBLAS's, so the linear layer's fp32 bound holds as it is."""
    from hpc_llm.kernels import gemm, pool

    if gemm.onednn_sgemm() is None or not pool._omp_layer(2):
        pytest.skip("oneDNN (onednn-cpu-gomp) or numba's omp threading layer unavailable")
    monkeypatch.setattr(pool, "_state", {"threads": 2})
    monkeypatch.setattr(gemm, "POOL_MIN_MACS", 0)
    calls = []
    real = gemm.sgemm_matmul
    monkeypatch.setattr(gemm, "sgemm_matmul", lambda *args: calls.append(1) or real(*args))
    test_linear_forward_and_backward_within_the_rounding_bound("fp32")
    assert len(calls) == 3


@pytest.mark.parametrize("recompute, dropout", [("none", 0.0), ("none", 0.1), ("selective", 0.1)])
def test_bf16_operands_carried_to_onednn_bitwise(monkeypatch, recompute, dropout):
    """bf16 values carried to oneDNN's GEMM as bf16 arrays (kept inputs, output gradients, attention's q k v and
    probabilities: Precision.gemm_use / gemm_operand, gemm.takes_held) and the weights' bits kept beside the compute
    copy give bitwise what converting float32-held operands for each product gives (every product on oneDNN both
    ways: the same sums); the weights' bits are the master weights rounded, again after a refresh."""
    from hpc_llm.kernels import gemm
    from hpc_llm.model.layers import DropoutRNG

    if gemm.onednn_gemm() is None:
        pytest.skip("oneDNN's bf16 GEMM unavailable (onednn-cpu-gomp, avx512_bf16 or amx_bf16)")
    for cut in ("MIN_MACS", "MIN_SIDE", "MIN_MACS_HELD"):
        monkeypatch.setattr(gemm, cut, 0)
    T = 130  # two query blocks
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=T, vocab_size=30, dropout=dropout)
    x, y = np.random.default_rng(0).integers(0, 30, (2, 2, T))

    def step(carried: bool):
        monkeypatch.setattr(gemm, "reads_bf16", lambda prec: carried and prec.name == "bf16")
        model = GPT(cfg, seed=4, precision="bf16", recompute=recompute)
        assert (model.compute_bits is not None) == carried
        loss = model.forward(x, y, rng=DropoutRNG(7, 0, 0, range(2)), keep_cache=True)
        model.backward()
        return model, loss

    (model, loss), (old, old_loss) = step(True), step(False)
    assert loss == old_loss and np.array_equal(model.grad_flat, old.grad_flat)
    for flat in (model.flat, model.flat * 1.37):
        model.flat[:] = flat
        model.refresh_compute()
        want = model.flat.astype(Precision("bf16").low).view(np.uint16)
        assert np.array_equal(model.compute_bits, want)


def test_bf16_without_ml_dtypes_is_one_line(monkeypatch):
    import sys

    from hpc_llm.config import load_config
    from hpc_llm.errors import UserError

    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now raises ImportError
    with pytest.raises(UserError, match="bf16.*ml_dtypes"):
        load_config(None, ["train.precision=bf16"])
    # NumPy's own float16 needs nothing
    assert load_config(None, ["train.precision=fp16"]).train.precision == "fp16"


@pytest.mark.parametrize("name", LOW)
def test_round_in_place_rounds_every_entry(name):
    """Precision.round_ walks the array in pieces: across several pieces and a ragged last one, every entry ends up
    exactly as the format rounds it (x.astype(low)), with no entry left in fp32."""
    prec = Precision(name)
    x = np.random.default_rng(5).standard_normal((2 << 18) + 12345).astype(np.float32)
    want = x.astype(prec.low).astype(np.float32)
    assert not np.array_equal(want, x)
    got = prec.round_(x)
    assert got is x and np.array_equal(x, want)


# -- fp16's loss scaler ----------------------------------------------------------------------------------------------


def test_loss_scaler_rules():
    """Megatron's: hysteresis 2 (the second overflow in a row halves), a floor, doubling after `window` clean steps
    (which also restores the hysteresis)."""
    s = LossScaler(init=8.0, window=3, hysteresis=2, min_scale=2.0)
    s.update(True)
    assert s.scale == 8.0  # one overflow: skipped, not yet halved
    s.update(True)
    assert s.scale == 4.0
    s.update(True)
    assert s.scale == 2.0
    s.update(True)
    assert s.scale == 2.0  # the floor
    for _ in range(2):
        s.update(False)
    assert s.scale == 2.0
    s.update(False)
    assert s.scale == 4.0 and s.hysteresis_tracker == 2 and s.growth_tracker == 0
    s.update(True)
    assert s.scale == 4.0
    s.update(False)  # a clean step does not restore the hysteresis: the next overflow halves
    s.update(True)
    assert s.scale == 2.0


class MegatronScaler:
    """Megatron-LM's DynamicGradScaler, written from its rules as a function of the history, not of counters: the
    scale doubles when the clean steps since the last overflow or growth (whichever came later) reach `window`,
    restoring the hysteresis; an overflow halves it (never below the floor) once `hysteresis` overflows have been
    seen since the last growth (in a row or not: a clean step does not restore the hysteresis)."""

    def __init__(self, init: float, window: int, hysteresis: int, floor: float):
        self.scale, self.window, self.hysteresis, self.floor = init, window, hysteresis, floor
        self.history: list[bool] = []  # True: an overflow
        self.last_growth = -1  # index of the step that last grew the scale

    def update(self, overflow: bool) -> None:
        self.history.append(overflow)
        now = len(self.history) - 1
        since_growth = self.history[self.last_growth + 1 :]
        if overflow:
            if sum(since_growth) >= self.hysteresis:
                self.scale = max(self.scale / 2, self.floor)
            return
        last_overflow = max((i for i, o in enumerate(self.history) if o), default=-1)
        if now - max(last_overflow, self.last_growth) == self.window:
            self.scale *= 2
            self.last_growth = now


def test_loss_scaler_equals_megatrons_state_machine():
    """200 random sequences (overflow rates 5% to 70%, windows 1-5, hysteresis 1-3, floors reached and left): after
    every step the scaler's scale equals the reference's; each sequence is cut once at a random step, the scaler's
    state() loaded into a new LossScaler that finishes it. Among them: clean steps, an overflow, then fewer than
    `window` clean steps (no growth: the count restarts at an overflow)."""
    rng = np.random.default_rng(34)
    bad, restarts = [], 0
    for case in range(200):
        window, hysteresis = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        init, floor = 2.0 ** int(rng.integers(0, 6)), 2.0 ** int(rng.integers(-2, 2))
        init = max(init, floor)
        overflows = rng.random(int(rng.integers(20, 80))) < rng.choice([0.05, 0.2, 0.4, 0.7])
        cut = int(rng.integers(0, len(overflows)))
        ref = MegatronScaler(init, window, hysteresis, floor)
        s = LossScaler(init=init, window=window, hysteresis=hysteresis, min_scale=floor)
        for i, o in enumerate(overflows):
            if i == cut:
                state = dict(s.state())
                s = LossScaler(init=123.0, window=window, hysteresis=hysteresis, min_scale=floor)
                s.load(state)
            s.update(bool(o))
            ref.update(bool(o))
            if s.scale != ref.scale:
                bad.append(
                    f"case {case} (window {window}, hysteresis {hysteresis}): step {i} scale {s.scale}, "
                    f"reference {ref.scale}; overflows {overflows[: i + 1].astype(int).tolist()}"
                )
                break
        # a run of clean steps cut by an overflow and followed by fewer than `window` clean ones
        h = "".join("x" if o else "." for o in overflows)
        restarts += window > 1 and any(
            "." * a + "x" + "." * b in h
            for a in range(1, window)
            for b in range(1, window)
            if a + b >= window
        )
    assert not bad, "\n".join(bad[:5])
    assert restarts >= 20, f"only {restarts} sequences restart the clean count mid-window"


def fp16_cfg(make_cfg, out, **kw):
    return make_cfg(
        out, **{"train.precision": "fp16", "model.dropout": 0.1, "train.grad_accum": 2, **kw}
    )


def test_overflow_skips_the_step_and_touches_nothing(make_cfg):
    """A loss scale so large that the scaled gradients overflow fp16: the step is skipped (parameters, moments and
    Adam's step counter unchanged, skipped_steps counted), the second overflow halves the scale; then, with the scale
    come down, steps are taken again."""
    from hpc_llm.train.trainer import Trainer

    tr = Trainer(
        fp16_cfg(
            make_cfg, "ovf", **{"train.loss_scale_init": 2.0**60, "train.loss_scale_window": 1000}
        ),
        grid=single_process_grid(),
    )
    before = (tr.model.flat.copy(), tr.opt.m.copy(), tr.opt.v.copy(), tr.opt.t)
    tr.train_step()
    assert tr.skipped_steps == 1 and tr.scaler.scale == 2.0**60 and tr.step == 1
    assert np.array_equal(tr.model.flat, before[0]) and np.array_equal(tr.opt.m, before[1])
    assert np.array_equal(tr.opt.v, before[2]) and tr.opt.t == before[3]
    tr.train_step()
    assert tr.skipped_steps == 2 and tr.scaler.scale == 2.0**59
    while tr.skipped_steps < 80 and tr.opt.t == 0:
        tr.train_step()
    assert (
        tr.opt.t == 1 and not np.array_equal(tr.model.flat, before[0]) and tr.scaler.scale < 2.0**59
    )


@pytest.mark.parallel(nprocs=2)
def test_overflow_on_one_rank_skips_on_every_rank(data_dir, shared_tmp_path):
    """dp 2: only rank 1's rows overflow (its scaled gradient is made infinite); both ranks skip the step and hold the
    same parameters and scale; the next step is taken by both."""
    cfg = run_config(
        data_dir, shared_tmp_path / "run", **{"train.precision": "fp16", "train.max_iters": 2}
    )
    from hpc_llm.train.trainer import Trainer

    tr = Trainer(cfg, grid=make_grid(MPI.COMM_WORLD, 1))
    finish = tr.sync.finish

    def poisoned_finish(*args):
        if MPI.COMM_WORLD.rank == 1 and tr.step == 0:
            tr.model.grad_flat[7] = np.inf  # before the reduction: rank 1's own gradient overflowed
        finish(*args)

    tr.sync.finish = poisoned_finish
    flat0 = tr.model.flat.copy()
    tr.train_step()
    skipped_first = (tr.skipped_steps, bool(np.array_equal(tr.model.flat, flat0)))
    tr.train_step()
    crcs = MPI.COMM_WORLD.allgather(
        (crc(tr.model.flat), tr.scaler.scale, tr.skipped_steps, tr.opt.t)
    )
    check(
        skipped_first == (1, True) and len(set(crcs)) == 1 and crcs[0][2:] == (1, 1),
        f"first step {skipped_first}, then {crcs}",
    )


def test_scaler_state_resumes_bitwise(make_cfg):
    """fp16 with a small window (the scale grows during the run): 3 steps, save, resume to 6 equals 6 straight, bit for
    bit (losses, parameters, the scaler's state)."""
    from hpc_llm.train.trainer import Trainer

    common = {"train.loss_scale_init": 4.0, "train.loss_scale_window": 2}
    straight = Trainer(
        fp16_cfg(make_cfg, "straight", **common, **{"train.max_iters": 6}),
        grid=single_process_grid(),
    )
    straight.run()
    first = Trainer(
        fp16_cfg(make_cfg, "first", **common, **{"train.max_iters": 3}), grid=single_process_grid()
    )
    path = first.run()["checkpoint"]
    resumed = Trainer(
        fp16_cfg(make_cfg, "resumed", **common, **{"train.max_iters": 6}),
        resume=path,
        grid=single_process_grid(),
    )
    assert resumed.scaler.state() == first.scaler.state() and first.scaler.scale > 4.0
    resumed.run()
    assert resumed.metrics.train["loss"] == straight.metrics.train["loss"]
    assert resumed.metrics.train["loss_scale"] == straight.metrics.train["loss_scale"]
    assert np.array_equal(resumed.model.flat, straight.model.flat)
    assert resumed.scaler.state() == straight.scaler.state()


@pytest.mark.parallel(nprocs=2)
def test_checkpoints_move_between_precisions_and_layouts(data_dir, tmp_path, shared_tmp_path):
    """bf16 at dp 2 for 3 steps -> fp32 at tp 2 to 6 -> fp16 at pp 2 to 9 (dropout on): each resume starts from the
    saved fp32 master weights and moments; its steps equal a single-process run in the same precision resumed from
    the same file (layouts agree to float32 rounding: 1e-5), and the loss keeps falling across the changes."""
    world = MPI.COMM_WORLD
    common = {"model.dropout": 0.1, "model.n_head": 4, "train.grad_accum": 2, "train.eval_iters": 0}
    legs = [("bf16", 1, 1, 3), ("fp32", 2, 1, 6), ("fp16", 1, 2, 9)]
    path, bad, losses = None, [], []
    for i, (prec, tp, pp, steps) in enumerate(legs):
        overrides = {
            **common,
            "train.precision": prec,
            "train.max_iters": steps,
            "parallel.tp": tp,
            "parallel.pp": pp,
        }
        tr = train(
            run_config(data_dir, shared_tmp_path / f"leg{i}", **overrides),
            make_grid(world, tp, pp),
            resume=path,
        )
        if path is not None:
            single = {**overrides, "parallel.tp": 1, "parallel.pp": 1}
            ref = train(
                run_config(data_dir, tmp_path / f"ref{i}", **single),
                single_process_grid(),
                resume=path,
            )
            a, b = np.array(tr.metrics.train["loss"]), np.array(ref.metrics.train["loss"])
            if a.shape != b.shape or not np.max(np.abs(a - b) / b) <= 1e-5:
                bad.append(f"leg {i} ({prec}, tp {tp}, pp {pp}): {a} vs one process {b}")
        losses = tr.metrics.train["loss"]
        path = tr.summary["checkpoint"]
    if not (len(losses) == 9 and np.mean(losses[-3:]) < np.mean(losses[:3])):
        bad.append(f"losses across the legs: {losses}")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=2)
def test_sequence_parallel_in_each_precision_follows_tensor_parallel(data_dir, shared_tmp_path):
    """bf16, fp16 and fp32 at tp 2 with sequence parallelism (its kept slices in the format, gathered for the
    matmuls) against tp 2 without it, dropout on, 5 steps: losses and grad norms within float32's 1e-5 relative
    (only the order of the LayerNorms' gradient sums differs)."""
    bad = []
    for prec in ("bf16", "fp16", "fp32"):
        runs = {}
        for sp in (False, True):
            overrides = {
                "model.dropout": 0.1,
                "train.grad_accum": 2,
                "train.eval_iters": 0,
                "train.precision": prec,
                "parallel.tp": 2,
                "parallel.sequence_parallel": sp,
            }
            runs[sp] = train(
                run_config(data_dir, shared_tmp_path / f"{prec}-{sp}", **overrides),
                make_grid(MPI.COMM_WORLD, 2),
            ).metrics.train
        for key in ("loss", "grad_norm"):
            a, b = np.array(runs[True][key]), np.array(runs[False][key])
            if a.shape != b.shape or not np.max(np.abs(a - b) / b) <= 1e-5:
                bad.append(f"{prec} {key}: sequence parallel {a} vs tensor parallel {b}")
    check(not bad, "\n".join(bad))
