"""Every layer's backward, and the whole model's gradient, against finite differences in float64: every entry of
every tensor, each against its own derived error bound.

The finite-difference estimate and its error bound
--------------------------------------------------
Along one entry x_i of a smooth scalar f (all of ours are: no ReLU, dropout masks fixed by a seeded generator), the
central difference with step s is, by Taylor's theorem,

    D(s) = (f(x + s e_i) - f(x - s e_i)) / 2s = f' + s^2/6 f''' + s^4/120 f^(5) + s^6/5040 f^(7) + ...

Richardson extrapolation over the steps h, 2h, 4h removes the even powers one by one:

    R1(s) = (4 D(s) - D(2s)) / 3 = D(s) + (D(s) - D(2s)) / 3  = f' - s^4/30 f^(5) + O(s^6)
    R2    = (16 R1(h) - R1(2h)) / 15 = (64 D(h) - 20 D(2h) + D(4h)) / 45 = f' + O(h^6)

R2 is the numeric derivative. Its truncation error is bounded by T = |R1(2h) - R1(h)| / 15 (= h^4/30 |f^(5)| + O(h^6),
the truncation error of R1(h), measured per entry): that exceeds R2's own O(h^6) error by a factor ~1/h^2 ~ 1e7, so it
needs no safety factor (where f^(5) happens to vanish, the O(h^6) remainder, h^6 = 2e-22 times a derivative, is far
below the rounding term).

Rounding. Each evaluation of f in float64 is off by at most eps_f. R2 = (32 A(h) - 5 A(2h) + A(4h)/8) / (45 h) with
A(s) = f(x + s) - f(x - s) off by at most 2 eps_f, so R2's rounding error is at most
2 (32 + 5 + 1/8) / 45 * eps_f / h = 1.65 eps_f / h (T carries another 0.15 eps_f / h of rounding, which only enlarges
the bound). eps_f is a multiple of the unit roundoff u = 2^-53 times S, the magnitude of f: the sum of the absolute
values of the terms f adds up, inner sums included (each test states its S: the same formula with every term taken in
absolute value, e.g. sum |R| (|x| |w| + |b|) for sum(R * (x w + b))). A worst-case analysis gives gamma_k S with k the
number of roundings along the longest chain (tens); rounding errors of independent operations do not all line up, and
we take eps_f = 8 u S. Measured (every entry, 200 seeds of each layer test): |analytic - R2| <= 2.3 u S / h, i.e.
eps_f <= 1.4 u S, worst ratio to the bound 0.17; the whole model (30 seeds x dropout 0 and 0.2): worst ratio 0.41 (an
entry whose bound is mostly truncation: n_embd = 2, a LayerNorm over two channels).

Each difference quotient divides by the step actually taken, (x + s) - (x - s), not 2s: with s a power of two x +- s
is exact unless it crosses a power of two, and where it is not the representation error of the step drops out too.

Per entry:  |analytic_i - R2_i| <= bound_i = T_i + 1.65 * 8 u S / h,
asserted as max_i |analytic_i - R2_i| / bound_i <= 1, the worst entry and ratio in the failure message.

h = 2^-12 (steps up to 2^-10 ~ 1e-3): large enough that the rounding term is small (13 u S / h = 6e-12 S), small
enough that T stays below it for almost every entry. The old check (norm-wise relative error < 1e-6, h = 1e-5, 40
random entries per model tensor) let a single entry be wrong by 1e-6 of the whole tensor's norm, or by anything at
all when it was not drawn; here an error of 1e-6 relative in one entry exceeds its bound wherever |gradient_i| is
above ~1e-5 S and T_i is small, which is most entries: test_checker_rejects_one_entry_error.
"""

import re

import numpy as np
import pytest

from hpc_llm.config import ModelConfig
from hpc_llm.model import attention as SA
from hpc_llm.model import layers as L
from hpc_llm.model import vocab_parallel as VP
from hpc_llm.model.distill import (
    Distill,
    vocab_parallel_distill_backward,
    vocab_parallel_distill_forward,
)
from hpc_llm.model.gpt import GPT
from hpc_llm.parallel.comm import Comm

U = 2.0**-53  # unit roundoff of float64
H = 2.0**-12  # the smallest of the three steps h, 2h, 4h
EPS_F = 8.0  # |fl(f) - f| <= EPS_F * U * S, S the magnitude of f (see above)
ROUNDING = 2 * (32 + 5 + 1 / 8) / 45  # = 1.65: R2's rounding error in units of eps_f / h


def richardson(f, x, h=H):
    """Per entry of x (changed in place one entry at a time and restored bitwise): (R2, T), the extrapolated central
    difference of the scalar f() and the bound on its truncation error, both shaped like x."""
    assert x.dtype == np.float64, x.dtype
    flat = x.reshape(-1)
    assert np.shares_memory(flat, x), (
        "x must be contiguous: its entries are perturbed through a flat view"
    )
    D = np.empty((3, flat.size))
    for i in range(flat.size):
        x0 = flat[i]
        for k, s in enumerate((h, 2 * h, 4 * h)):
            xp, xm = x0 + s, x0 - s
            flat[i] = xp
            fp = f()
            flat[i] = xm
            fm = f()
            D[k, i] = (fp - fm) / (xp - xm)
        flat[i] = x0
    d1, d2, d4 = D
    r1h, r12h = (4 * d1 - d2) / 3, (4 * d2 - d4) / 3
    r2 = (64 * d1 - 20 * d2 + d4) / 45
    return r2.reshape(x.shape), (np.abs(r12h - r1h) / 15).reshape(x.shape)


def rounding(scale, h=H):
    """R2's rounding-error bound for an f of magnitude `scale` (S)."""
    assert scale > 0
    return ROUNDING * EPS_F * U * scale / h


def assert_within(analytic, numeric, trunc, scale, what=""):
    """Per entry: |analytic - numeric| <= bound = trunc + rounding(scale), asserted as max ratio <= 1; the failure
    names the worst entry. Returns the worst ratio."""
    analytic = np.asarray(analytic, np.float64)
    assert analytic.shape == numeric.shape, (
        f"{what}: shape {analytic.shape}, expected {numeric.shape}"
    )
    assert np.all(np.isfinite(analytic)), f"{what}: non-finite analytic gradient"
    bnd = trunc + rounding(scale)
    ratio = np.abs(analytic - numeric) / bnd
    i = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    assert ratio[i] <= 1.0, (
        f"{what}: worst ratio |analytic - numeric| / bound = {ratio[i]:.3g} > 1 at entry {tuple(map(int, i))} of "
        f"{ratio.size}: analytic {analytic[i]!r}, numeric {numeric[i]!r}, |diff| {abs(analytic[i] - numeric[i]):.3e}, "
        f"bound {bnd[i]:.3e} (truncation {trunc[i]:.3e} + rounding {rounding(scale):.3e}); "
        f"{int(np.count_nonzero(ratio > 1))} entries over their bound"
    )
    return float(ratio[i])


def check(analytic, f, x, scale, what=""):
    """The analytic gradient of f() w.r.t. x against R2 on every entry, each within its bound."""
    numeric, trunc = richardson(f, x)
    return assert_within(analytic, numeric, trunc, scale, what)


SEEDS = [0, 1, 2]


def linear_case(seed):
    rng = np.random.default_rng(seed)
    B, T, I, O = rng.integers(1, 4), rng.integers(1, 6), rng.integers(1, 9), rng.integers(1, 9)  # noqa: E741 - the shapes' usual names
    x, w, b = rng.standard_normal((B, T, I)), rng.standard_normal((I, O)), rng.standard_normal(O)
    R = rng.standard_normal((B, T, O))
    f = lambda: float((L.linear_forward(x, w, b) * R).sum())  # noqa: E731
    # S: sum |R| (|x| |w| + |b|)
    scale = float((np.abs(R) * (np.abs(x) @ np.abs(w) + np.abs(b))).sum())
    return x, w, b, R, f, scale


@pytest.mark.parametrize("seed", SEEDS)
def test_linear(seed):
    x, w, b, R, f, scale = linear_case(seed)
    # garbage: accumulate=False must overwrite it
    dw, db = (np.full_like(w, 7.0), np.full_like(b, 7.0))
    dx = L.linear_backward(R.copy(), x, w, dw, db, accumulate=False)
    check(dx, f, x, scale, "dx")
    check(dw, f, w, scale, "dw")
    check(db, f, b, scale, "db")
    # accumulate=True adds the same gradient again
    dw2, db2 = dw.copy(), db.copy()
    L.linear_backward(R.copy(), x, w, dw2, db2, accumulate=True)
    np.testing.assert_allclose(dw2, 2 * dw, rtol=1e-12)
    np.testing.assert_allclose(db2, 2 * db, rtol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_layernorm(seed):
    rng = np.random.default_rng(seed)
    B, T, C = rng.integers(1, 4), rng.integers(1, 6), rng.integers(2, 12)
    x = rng.standard_normal((B, T, C)) * 3 + 1
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    R = rng.standard_normal((B, T, C))
    f = lambda: float((L.layernorm_forward(x, w, b)[0] * R).sum())  # noqa: E731
    out, cache = L.layernorm_forward(x, w, b)
    # S: out = (x - mean) rstd w + b, each term in absolute value
    rstd = cache[1]
    scale = float(
        (
            np.abs(R)
            * ((np.abs(x) + np.abs(x.mean(-1, keepdims=True))) * rstd * np.abs(w) + np.abs(b))
        ).sum()
    )
    dw, db = np.zeros(C), np.zeros(C)
    dx = L.layernorm_backward(R.copy(), cache, w, dw, db, accumulate=False)
    check(dx, f, x, scale, "dx")
    check(dw, f, w, scale, "dw")
    check(db, f, b, scale, "db")
    # against the textbook formula
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_gelu(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rng.integers(1, 4), rng.integers(1, 20))) * 3
    R = rng.standard_normal(x.shape)
    f = lambda: float((L.gelu_forward(x)[0] * R).sum())  # noqa: E731
    out, t = L.gelu_forward(x)
    # S: out = 0.5 x + 0.5 x tanh(.), whose terms cancel for x << 0: sum |R| 0.5 |x| (1 + |t|) <= sum |R| |x|
    scale = float((np.abs(R) * np.abs(x)).sum())
    dx = L.gelu_backward(R.copy(), x, t)
    check(dx, f, x, scale, "dx")
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
def test_embedding(seed):
    rng = np.random.default_rng(seed)
    V, Tmax, C = rng.integers(3, 10), 8, rng.integers(1, 6)
    B, T = rng.integers(1, 4), rng.integers(1, Tmax + 1)
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((Tmax, C))
    idx = rng.integers(0, V, (B, T))
    R = rng.standard_normal((B, T, C))
    f = lambda: float((L.embedding_forward(wte, wpe, idx) * R).sum())  # noqa: E731
    scale = float((np.abs(R) * (np.abs(wte[idx]) + np.abs(wpe[:T]))).sum())
    dwte, dwpe = np.full_like(wte, 5.0), np.full_like(wpe, 5.0)
    L.embedding_backward(R, idx, dwte, dwpe, accumulate=False, accumulate_wte=False)
    check(dwte, f, wte, scale, "dwte")
    check(dwpe, f, wpe, scale, "dwpe")
    assert np.all(dwpe[T:] == 0)  # position rows beyond T: exactly zero


def attention_scale(qkv, R, H, dropout, seed):
    """S of sum(R * attention(qkv)): y = (P * mask) v with P * mask >= 0, so the terms' magnitudes are
    (P * mask) |v|: attention itself on qkv with |v| (the same masks: the same seed)."""
    C = qkv.shape[-1] // 3
    qkv_abs = qkv.copy()
    qkv_abs[..., 2 * C :] = np.abs(qkv_abs[..., 2 * C :])
    return float(
        (
            np.abs(R) * SA.attention_forward(qkv_abs, H, dropout, np.random.default_rng(seed))[0]
        ).sum()
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention(seed, dropout):
    rng = np.random.default_rng(seed)
    B, T, H, hd = rng.integers(1, 3), rng.integers(1, 7), rng.integers(1, 4), rng.integers(1, 5)
    C = H * hd
    qkv = rng.standard_normal((B, T, 3 * C))
    R = rng.standard_normal((B, T, C))

    def f():
        return float((SA.attention_forward(qkv, H, dropout, np.random.default_rng(9))[0] * R).sum())

    y, cache = SA.attention_forward(qkv, H, dropout, np.random.default_rng(9))
    dqkv = SA.attention_backward(R.copy(), cache, H)
    check(dqkv, f, qkv, attention_scale(qkv, R, H, dropout, 9), "dqkv")
    if dropout == 0.0:
        # against a plain per-head reference with an explicit mask
        q, k, v = np.split(qkv, 3, axis=-1)
        ref = np.empty((B, T, C))
        for h in range(H):
            s = slice(h * hd, (h + 1) * hd)
            sc = q[..., s] @ k[..., s].transpose(0, 2, 1) / np.sqrt(hd)
            sc = np.where(np.tril(np.ones((T, T), bool)), sc, -np.inf)
            p = np.exp(sc - sc.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            ref[..., s] = p @ v[..., s]
        np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_cross_entropy(seed):
    rng = np.random.default_rng(seed)
    N, V = rng.integers(1, 8), rng.integers(2, 10)
    pad = rng.integers(0, 4)
    logits = rng.standard_normal((N, V + pad))
    targets = rng.integers(0, V, N)
    ce = lambda z: VP.vocab_parallel_cross_entropy_forward(z, targets, V, 0, Comm(None))  # noqa: E731
    f = lambda: ce(logits.copy())[0]  # noqa: E731
    loss, cache = ce(logits.copy())
    ref = np.mean(np.log(np.exp(logits[:, :V]).sum(1)) - logits[np.arange(N), targets])
    assert abs(loss - ref) < 1e-12
    d = VP.vocab_parallel_cross_entropy_backward(cache, scale=0.7)
    # S: the loss is a mean of log(sum exp(z - max)) >= 0 and max - z_target >= 0, so the sum of its terms' magnitudes
    # is the loss itself; + 1 for the absolute rounding of log(s) near s = 1 and of the shifts z - max
    numeric, trunc = richardson(f, logits)
    assert_within(d / 0.7, numeric, trunc, loss + 1.0, "dlogits")
    # padding: no gradient, and no effect on the loss
    assert np.all(d[:, V:] == 0) and np.all(numeric[:, V:] == 0)


def _distill_reference(z, u, targets, V, alpha, T):
    """The distillation loss from its definition (float64, the real columns only), and S: its terms' magnitudes."""
    z, u = z[:, :V], u[:, :V]

    def logsm(x):
        shifted = x - x.max(1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))

    ce = -logsm(z)[np.arange(len(z)), targets]
    lp, lq = logsm(u / T), logsm(z / T)
    kl = (np.exp(lp) * (lp - lq)).sum(1)
    loss = np.mean((1 - alpha) * ce + alpha * T * T * kl)
    # S: the CE's as in test_cross_entropy; the KL's sums sum_v p |a - b| and the two log-sums (>= 0), + 1 for the
    # absolute rounding of the logs and shifts
    a = u / T - (u / T).max(1, keepdims=True)
    b = z / T - (z / T).max(1, keepdims=True)
    spread = (np.exp(lp) * np.abs(a - b)).sum(1) + np.abs(lp - a).max(1) + np.abs(lq - b).max(1)
    S = (1 - alpha) * (ce.mean() + 1) + alpha * T * T * (spread.mean() + 1)
    return loss, S


@pytest.mark.parametrize("seed", SEEDS)
def test_distill_loss(seed):
    """alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE against its definition, and its gradient with respect to
    the student's logits against finite differences, every entry (padding columns: no gradient, no effect)."""
    rng = np.random.default_rng(seed)
    N, V, pad = rng.integers(1, 8), rng.integers(2, 10), rng.integers(0, 4)
    logits, teacher = rng.standard_normal((2, N, V + pad)) * 2
    targets = rng.integers(0, V, N)
    alpha, T = float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.5, 4.0))

    def loss_of(z):
        d = Distill(targets, teacher.copy(), alpha, T)
        return vocab_parallel_distill_forward(z, d, V, 0, Comm(None))

    loss, cache = loss_of(logits.copy())
    ref, S = _distill_reference(logits, teacher, targets, V, alpha, T)
    assert abs(loss - ref) < 1e-12 * S
    d = vocab_parallel_distill_backward(cache, scale=0.7)
    numeric, trunc = richardson(lambda: loss_of(logits.copy())[0], logits)
    assert_within(d / 0.7, numeric, trunc, S, "dlogits")
    assert np.all(d[:, V:] == 0) and np.all(numeric[:, V:] == 0)


def test_distill_alpha_zero_is_cross_entropy():
    """alpha = 0: the loss and the gradient are the cross-entropy's, bit for bit."""
    rng = np.random.default_rng(3)
    logits, teacher = rng.standard_normal((2, 6, 13))
    targets = rng.integers(0, 11, 6)
    d = Distill(targets, teacher, 0.0, 2.0)
    loss, cache = vocab_parallel_distill_forward(logits.copy(), d, 11, 0, Comm(None))
    want, ce = VP.vocab_parallel_cross_entropy_forward(logits.copy(), targets, 11, 0, Comm(None))
    assert loss == want
    got = vocab_parallel_distill_backward(cache, 0.3)
    assert np.array_equal(got, VP.vocab_parallel_cross_entropy_backward(ce, 0.3))


def tiny_config(rng, dropout=0.0, bias=True):
    """1-2 layers, 1-3 heads of size 1-3, 2-6 positions, a vocabulary of 2-63 padded to 64 (so wte always has padded
    rows): at most ~2800 parameters, every entry checked in a few seconds."""
    H = int(rng.integers(1, 4))
    return ModelConfig(
        n_layer=int(rng.integers(1, 3)),
        n_head=H,
        n_embd=H * int(rng.integers(1, 4)),
        block_size=int(rng.integers(2, 7)),
        vocab_size=int(rng.integers(2, 64)),
        dropout=dropout,
        dtype="float64",
        bias=bias,
    )


def model_case(seed, dropout, bias=True):
    """A perturbed tiny model, a batch, the loss function of its parameters (dropout masks fixed) and its gradients."""
    rng = np.random.default_rng(seed)
    cfg = tiny_config(rng, dropout, bias)
    model = GPT(cfg, seed=seed)
    # leave the init's zeros/ones: exercise every term (the padded rows of wte too: what they hold must not matter)
    model.flat[:] += rng.standard_normal(model.num_params) * 0.1
    B, T = int(rng.integers(1, 3)), cfg.block_size
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    tgt = rng.integers(0, cfg.vocab_size, (B, T))

    def f():
        return model.forward(idx, tgt, rng=np.random.default_rng(5), keep_cache=True)

    loss = f()
    model.backward(loss_scale=1.0)
    return cfg, model, f, loss, {k: v.copy() for k, v in model.grads.items()}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_gradient(seed, dropout):
    """The whole model: every entry of every parameter tensor, the padded vocabulary rows included (their gradient
    exactly 0, and the loss bitwise independent of them).

    S: the loss is a mean of non-negative terms (as in test_cross_entropy), so S = loss + 1; the logits' own rounding
    (a few u times |logit|, and |logit| <~ 1 in these models) reaches it through p - onehot (|.| <= 2 per row) and is
    covered by the + 1."""
    cfg, model, f, loss, grads = model_case(seed, dropout)
    assert cfg.padded_vocab > cfg.vocab_size
    assert sorted(grads) == sorted(s.name for s in model.specs)
    for name, p in model.params.items():
        numeric, trunc = richardson(f, p)
        assert_within(grads[name], numeric, trunc, loss + 1.0, name)
        if name == "wte.weight":
            assert np.all(numeric[cfg.vocab_size :] == 0), "padded vocabulary rows change the loss"
    assert np.all(grads["wte.weight"][cfg.vocab_size :] == 0), (
        "padded vocabulary rows: non-zero gradient"
    )


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_is_inverted_dropout(p):
    """The finite-difference checks hold for any fixed mask; this checks the mask's meaning: a fraction p of the
    entries dropped, the kept ones scaled by exactly 1/(1-p), so the expectation is the input's. 512 x 512 draws: the
    kept fraction within 5 standard errors sqrt(p(1-p)/n) of 1 - p, and the mean of the output within 5 of its
    standard error sqrt(p/(1-p)/n) of 1."""
    n = 512 * 512
    out, mask = L.dropout_forward(np.ones((512, 512)), p, np.random.default_rng(0))
    kept = mask.keep
    assert kept.dtype == np.bool_  # one byte an element in the cache
    assert mask.scale == 1.0 / (1.0 - p) and np.array_equal(
        out, np.where(kept, 1.0 / (1.0 - p), 0.0)
    )
    assert abs(kept.mean() - (1 - p)) <= 5 * np.sqrt(p * (1 - p) / n)
    assert abs(out.mean() - 1.0) <= 5 * np.sqrt(p / (1 - p) / n)
    d = L.dropout_backward(np.full((512, 512), 2.0), mask)
    assert np.array_equal(d, 2.0 * out)


@pytest.mark.parametrize("seed", SEEDS)
def test_model_gradient_without_biases(seed):
    """model.bias = false (nanoGPT's shakespeare setting): no bias in any linear layer or LayerNorm, and the gradient
    of every remaining entry against finite differences, as above."""
    cfg, model, f, loss, grads = model_case(seed, 0.2, bias=False)
    assert not [s.name for s in model.specs if s.name.endswith(".bias")]
    assert len(model.specs) == 2 + 6 * cfg.n_layer + 1
    for name, p in model.params.items():
        numeric, trunc = richardson(f, p)
        assert_within(grads[name], numeric, trunc, loss + 1.0, name)


def test_checker_rejects_one_entry_error():
    """The check is sharp: one entry of a correct gradient made wrong by 1e-6 relative fails it, at every entry with
    |g| >= 2e-5 S (1e-6 |g| is then at least 2e-11 S, against a bound of 6e-12 S plus the truncation term), both in a
    layer test (linear, every entry of dx, dw, db) and in the whole model (every entry of every parameter tensor, with
    dropout); those are at least 80% of the non-zero entries. And through the checker itself: in every tensor the
    largest entry, made wrong by 1e-6 relative, fails with that entry named."""
    x, w, b, R, f, scale = linear_case(0)
    dw, db = np.empty_like(w), np.empty_like(b)
    dx = L.linear_backward(R.copy(), x, w, dw, db, accumulate=False)
    cases = [
        (f"linear d{n}", g, p, f, scale) for n, g, p in (("x", dx, x), ("w", dw, w), ("b", db, b))
    ]
    _, model, f_model, loss, grads = model_case(0, 0.2)
    cases += [(name, grads[name], model.params[name], f_model, loss + 1.0) for name in model.params]
    nonzero = above = 0
    for what, g, p, f, S in cases:
        numeric, trunc = richardson(f, p)
        assert_within(g, numeric, trunc, S, what)  # the correct gradient passes
        # a wrong entry changes only its own ratio, so the checker fails iff that ratio exceeds 1: all entries at once
        fails = np.abs(g * (1 + 1e-6) - numeric) / (trunc + rounding(S)) > 1
        sel = np.abs(g) >= 2e-5 * S
        assert np.all(fails[sel]), (
            f"{what}: 1e-6 relative errors missed at {np.argwhere(sel & ~fails)[:5].tolist()}"
        )
        nonzero, above = nonzero + np.count_nonzero(g), above + np.count_nonzero(sel)
        i = np.unravel_index(int(np.argmax(np.abs(g))), g.shape)
        one = g.copy()
        one[i] *= 1 + 1e-6
        with pytest.raises(AssertionError, match=re.escape(f"at entry {tuple(map(int, i))} of")):
            assert_within(one, numeric, trunc, S, what)
    assert above >= 0.8 * nonzero, (
        f"only {above} of {nonzero} non-zero gradient entries have |g| >= 2e-5 S"
    )


def test_backward_overwrite_and_accumulate():
    """accumulate=False leaves no trace of an earlier backward; accumulate=True sums micro-batches."""
    rng = np.random.default_rng(3)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=13, dtype="float64")
    model = GPT(cfg, seed=1)
    batches = [(rng.integers(0, 13, (2, 5)), rng.integers(0, 13, (2, 5))) for _ in range(2)]
    fresh = []
    for x, y in batches:
        model.forward(x, y, keep_cache=True)
        model.backward()
        fresh.append(model.grad_flat.copy())
    # overwrite after a previous backward equals the fresh gradient of batch 1 (already checked above by order)
    model.forward(*batches[0], keep_cache=True)
    model.backward()
    np.testing.assert_array_equal(model.grad_flat, fresh[0])
    model.forward(*batches[1], keep_cache=True)
    model.backward(accumulate=True)
    np.testing.assert_allclose(model.grad_flat, fresh[0] + fresh[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("block", [1, 2, 3])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_query_blocks(monkeypatch, block, dropout):
    """Blocked attention (several query blocks, each with its own key range) equals the one-block computation and
    its backward matches finite differences."""
    rng = np.random.default_rng(block)
    B, T, H, hd = 2, 7, 2, 3
    qkv = rng.standard_normal((B, T, 3 * H * hd))
    R = rng.standard_normal((B, T, H * hd))
    y_one, cache_one = SA.attention_forward(qkv, H)
    d_one = SA.attention_backward(R.copy(), cache_one, H)
    monkeypatch.setattr(SA, "ATTN_BLOCK", block)
    assert len(SA.query_blocks(T)) > 1
    y, cache = SA.attention_forward(qkv, H)
    np.testing.assert_allclose(y, y_one, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(
        SA.attention_backward(R.copy(), cache, H), d_one, rtol=1e-12, atol=1e-14
    )

    def f():
        return float((SA.attention_forward(qkv, H, dropout, np.random.default_rng(4))[0] * R).sum())

    _, cache = SA.attention_forward(qkv, H, dropout, np.random.default_rng(4))
    check(
        SA.attention_backward(R.copy(), cache, H),
        f,
        qkv,
        attention_scale(qkv, R, H, dropout, 4),
        "dqkv",
    )


def test_model_gradient_compiled_kernels(monkeypatch):
    """The whole model's check again with every compiled kernel (HPC_LLM_KERNELS=numba, float64), dropout on."""
    pytest.importorskip("numba")
    monkeypatch.setenv("HPC_LLM_KERNELS", "numba")
    test_model_gradient(SEEDS[0], 0.2)
