"""Every layer's backward, and the whole model's gradient, against central finite differences in float64."""

import numpy as np
import pytest

from hpc_llm.config import ModelConfig
from hpc_llm.model import layers as L
from hpc_llm.model import tensor_parallel as TP
from hpc_llm.model.gpt import GPT
from hpc_llm.parallel.comm import Comm

TOL = 1e-6  # norm-wise relative error; central differences with h=1e-5 in float64 are good to ~1e-9 here


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(a), np.linalg.norm(b), 1e-30)


def numeric_grad(f, x, h=1e-5, max_entries=None, rng=None):
    """Central differences of the scalar f() w.r.t. x (modified in place and restored). Optionally on a random subset
    of entries; returns (indices, numeric values)."""
    flat = x.reshape(-1)
    idx = np.arange(flat.size)
    if max_entries is not None and flat.size > max_entries:
        idx = np.sort(rng.choice(flat.size, max_entries, replace=False))
    out = np.empty(idx.size)
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out[j] = (fp - fm) / (2 * h)
    return idx, out


def check(analytic, f, x, rng=None, max_entries=None):
    idx, num = numeric_grad(f, x, max_entries=max_entries, rng=rng)
    err = rel_err(analytic.reshape(-1)[idx], num)
    assert err < TOL, f"relative error {err:.2e}"


SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_linear(seed):
    rng = np.random.default_rng(seed)
    B, T, I, O = rng.integers(1, 4), rng.integers(1, 6), rng.integers(1, 9), rng.integers(1, 9)
    x, w, b = rng.standard_normal((B, T, I)), rng.standard_normal((I, O)), rng.standard_normal(O)
    R = rng.standard_normal((B, T, O))
    f = lambda: float((L.linear_forward(x, w, b) * R).sum())
    dw, db = np.full_like(w, 7.0), np.full_like(b, 7.0)  # garbage: accumulate=False must overwrite it
    dx = L.linear_backward(R.copy(), x, w, dw, db, accumulate=False)
    check(dx, f, x)
    check(dw, f, w)
    check(db, f, b)
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
    f = lambda: float((L.layernorm_forward(x, w, b)[0] * R).sum())
    out, cache = L.layernorm_forward(x, w, b)
    dw, db = np.zeros(C), np.zeros(C)
    dx = L.layernorm_backward(R.copy(), cache, w, dw, db, accumulate=False)
    check(dx, f, x)
    check(dw, f, w)
    check(db, f, b)
    # against the textbook formula
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_gelu(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rng.integers(1, 4), rng.integers(1, 20))) * 3
    R = rng.standard_normal(x.shape)
    f = lambda: float((L.gelu_forward(x)[0] * R).sum())
    out, t = L.gelu_forward(x)
    dx = L.gelu_backward(R.copy(), x, t)
    check(dx, f, x)
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
def test_embedding(seed):
    rng = np.random.default_rng(seed)
    V, Tmax, C = rng.integers(3, 10), 8, rng.integers(1, 6)
    B, T = rng.integers(1, 4), rng.integers(1, Tmax + 1)
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((Tmax, C))
    idx = rng.integers(0, V, (B, T))
    R = rng.standard_normal((B, T, C))
    f = lambda: float((L.embedding_forward(wte, wpe, idx) * R).sum())
    dwte, dwpe = np.full_like(wte, 5.0), np.full_like(wpe, 5.0)
    L.embedding_backward(R, idx, dwte, dwpe, accumulate=False, accumulate_wte=False)
    check(dwte, f, wte)
    check(dwpe, f, wpe)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention(seed, dropout):
    rng = np.random.default_rng(seed)
    B, T, H, hd = rng.integers(1, 3), rng.integers(1, 7), rng.integers(1, 4), rng.integers(1, 5)
    C = H * hd
    qkv = rng.standard_normal((B, T, 3 * C))
    R = rng.standard_normal((B, T, C))

    def f():
        return float((L.attention_forward(qkv, H, dropout, np.random.default_rng(9))[0] * R).sum())

    y, cache = L.attention_forward(qkv, H, dropout, np.random.default_rng(9))
    dqkv = L.attention_backward(R.copy(), cache, H)
    check(dqkv, f, qkv)
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
    ce = lambda z: TP.vocab_parallel_cross_entropy_forward(z, targets, V, 0, Comm(None))  # noqa: E731
    f = lambda: ce(logits.copy())[0]
    loss, cache = ce(logits.copy())
    ref = np.mean(np.log(np.exp(logits[:, :V]).sum(1)) - logits[np.arange(N), targets])
    assert abs(loss - ref) < 1e-12
    d = TP.vocab_parallel_cross_entropy_backward(cache, scale=0.7)
    check(d / 0.7, f, logits)
    assert np.all(d[:, V:] == 0)


def tiny_config(rng, dropout=0.0):
    H = int(rng.integers(1, 4))
    return ModelConfig(n_layer=int(rng.integers(1, 3)), n_head=H, n_embd=H * int(rng.integers(1, 4)),
                       block_size=int(rng.integers(2, 7)), vocab_size=int(rng.integers(2, 70)), dropout=dropout,
                       dtype="float64")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_gradient(seed, dropout):
    """The whole model, every parameter tensor (a random subset of entries in the big ones)."""
    rng = np.random.default_rng(seed)
    cfg = tiny_config(rng, dropout)
    model = GPT(cfg, seed=seed)
    model.flat[:] += rng.standard_normal(model.num_params) * 0.1  # leave the init's zeros/ones: exercise every term
    B, T = int(rng.integers(1, 3)), cfg.block_size
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    tgt = rng.integers(0, cfg.vocab_size, (B, T))

    def f():
        return model.forward(idx, tgt, rng=np.random.default_rng(5), keep_cache=True)

    f()
    model.backward(loss_scale=1.0)
    grads = {k: v.copy() for k, v in model.grads.items()}
    for name, p in model.params.items():
        check(grads[name], f, p, rng=rng, max_entries=40)


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
    y_one, cache_one = L.attention_forward(qkv, H)
    d_one = L.attention_backward(R.copy(), cache_one, H)
    monkeypatch.setattr(L, "ATTN_BLOCK", block)
    assert len(L.query_blocks(T)) > 1
    y, cache = L.attention_forward(qkv, H)
    np.testing.assert_allclose(y, y_one, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(L.attention_backward(R.copy(), cache, H), d_one, rtol=1e-12, atol=1e-14)
    f = lambda: float((L.attention_forward(qkv, H, dropout, np.random.default_rng(4))[0] * R).sum())
    _, cache = L.attention_forward(qkv, H, dropout, np.random.default_rng(4))
    check(L.attention_backward(R.copy(), cache, H), f, qkv)
