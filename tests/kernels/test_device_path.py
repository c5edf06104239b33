"""The device path's launch counts (kernels/cuda/launches.py, plan/launches.py) and the fused optimizer's twin.

The counts are what the code runs on a device, counted on NumPy: they must not grow with the model (the heads, the
width, the layers, the shard), and stay under stated bounds."""

import numpy as np
import pytest

from hpc_llm.config import TrainConfig
from hpc_llm.kernels.cuda.launches import counting, xp
from hpc_llm.optim import AdamW, global_grad_norm
from hpc_llm.plan.launches import block_counts, optimizer_counts

# launches per block, whatever T (the fused attention): forward, backward (B and W); GEMMs included
BLOCK_BOUNDS = {"fp32": (16, 28), "bf16": (40, 60)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "modes",
    [
        dict(precision="fp32"),
        dict(precision="bf16", tp=2, sp=True, recompute="selective", dropout=0.1),
    ],
    ids=["fp32", "bf16-tp2-sp-selective-dropout"],
)
def test_block_launches_do_not_grow_with_the_model_or_the_sequence(modes):
    small = block_counts(T=64, head_dim=16, heads_per_rank=2, **modes)
    large = block_counts(T=64, head_dim=32, heads_per_rank=3, **modes)
    longer = block_counts(
        T=256, head_dim=16, heads_per_rank=2, **modes
    )  # two attention tiles: eight
    for other in (large, longer):
        assert small.forward.launches == other.forward.launches
        assert small.backward.launches == other.backward.launches
    fwd, bwd = BLOCK_BOUNDS[modes["precision"]]
    assert small.forward.total <= fwd and small.backward.total <= bwd
    # the bytes do grow: what the planner scales
    assert large.forward.elementwise_bytes > 2 * small.forward.elementwise_bytes


@pytest.mark.timeout(60)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_optimizer_step_launches_do_not_grow_with_the_shard(precision):
    small, large = optimizer_counts(1, 64, precision), optimizer_counts(3, 192, precision)
    assert small.launches == large.launches
    # norm (2) + AdamW (1), and with a 16-bit compute copy its refresh (one rounding pass)
    assert small.total == (3 if precision == "fp32" else 4)
    assert large.elementwise_bytes > 10 * small.elementwise_bytes


def _optimizer(xpm, seed=0, n=3000):
    rng = np.random.default_rng(seed)
    p = xpm.asarray(rng.standard_normal(n).astype(np.float32))
    g = xpm.asarray(rng.standard_normal(n).astype(np.float32))
    t = TrainConfig(weight_decay=0.1)
    return AdamW(p, g, [(100, 1700), (2000, 2900)], t, owned=[(0, 1200), (1500, 3000)], chunk=256)


@pytest.mark.timeout(30)
def test_fused_adamw_equals_the_chunked_optimizer_bitwise():
    cpu, dev = _optimizer(np), _optimizer(xp)
    dev_chunks = dev.segments
    dev = AdamW(dev.p, dev.g, [(100, 1700), (2000, 2900)], dev.cfg, owned=dev.owned)
    assert len(dev.segments) < len(dev_chunks)  # one segment per decay edge, not per chunk
    with counting() as ledger:
        for step in range(3):
            for o in (cpu, dev):
                o.step(1e-2 * (step + 1), grad_scale=0.5)
    assert ledger.total == 3  # one launch a step
    for a in ("p", "m", "v"):
        assert np.array_equal(np.asarray(getattr(cpu, a)), np.asarray(getattr(dev, a))), a


@pytest.mark.timeout(30)
def test_fused_norm_equals_the_chunked_norm():
    from types import SimpleNamespace

    comm = SimpleNamespace(allreduce_scalar=lambda v: v)
    g = np.random.default_rng(3).standard_normal(200_000).astype(np.float32) * 1e3
    ranges = [(0, 70_000), (90_000, 200_000)]
    want = global_grad_norm(g, ranges, comm)
    gd = xp.asarray(g)
    with counting() as ledger:
        got = global_grad_norm(gd, ranges, comm)
    assert ledger.total == 2
    assert abs(got - want) <= 1e-13 * want


@pytest.mark.timeout(60)
def test_fused_attention_is_priced_from_its_bytes_and_tile_products():
    """The ledger holds the fused kernels' bytes (q, k, v, y, logsumexp once forward; plan/fused_attention.py's
    docstring), and the planner's products are 2 forward and 7 backward of T x (mean keys of a query tile) x hd, at
    the rate of the dtype attention.cu multiplies them in."""
    from types import SimpleNamespace

    from hpc_llm.plan import fused_attention

    T, hd, heads = 64, 16, 2
    fwd = block_counts(T=T, head_dim=hd, heads_per_rank=heads).forward
    qkv = 3 * T * heads * hd * 4
    assert fwd.launches["attention_forward"] == 1
    assert fwd.nbytes["attention_forward"] == qkv + qkv // 3 + heads * T * 4
    rates = {"float32": 1e12, "bfloat16": 8e12, "float16": 6e12}
    cl = SimpleNamespace(gemm_rate=lambda dtype, *shape: rates[dtype])
    keys = (32 * 32 + 32 * 64) / 64  # tiles [0, 32) and [32, 64): 32 and 64 keys
    # tensor cores (a 16-bit format, hd a multiple of 16) at the format's rate, else scalar loops at float32's
    for low, head, rate in [
        (None, hd, 1e12),
        ("bfloat16", hd, 8e12),
        ("float16", hd, 6e12),
        ("bfloat16", 20, 1e12),
    ]:
        p = SimpleNamespace(share=1.0, low=low, cl=cl)
        one = 2.0 * T * keys * head * 3 / rate  # b = 1, h = 3
        assert fused_attention.fused_seconds(p, 1, T, 3, head, False) == pytest.approx(2 * one)
        assert fused_attention.fused_seconds(p, 1, T, 3, head, True) == pytest.approx(7 * one)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("precision, deferred", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_device_block_equals_the_cpu_block_bitwise(precision, deferred, monkeypatch):
    """The device branches (the biases folded into GELU's and dropout+residual's kernels, the fused passes), run by
    the stand-in for CuPy with values computed (not counting), give the CPU path's output and gradients bit for bit;
    and the forward launches the two fused kernels. The fused attention is off here: its online softmax and Philox
    masks differ from the CPU loop's by design (tests/kernels/test_attention.py holds it to its bound). deferred:
    the weight gradients run after the input gradients (a zero-bubble schedule's W)."""
    from hpc_llm.config import ModelConfig
    from hpc_llm.model import attention as SA
    from hpc_llm.model.gpt import GPT
    from hpc_llm.model.layers import DropoutRNG, WeightWork

    monkeypatch.setenv("HPC_LLM_KERNELS", "numpy")  # the CPU path's twins (numba's tanh differs)
    monkeypatch.setattr(SA, "FUSED_ATTENTION", False)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.1)
    got = {}
    for mod in (np, xp):
        model = GPT(cfg, mod, seed=None, precision=precision)
        rng = np.random.default_rng(5)
        model.flat[...] = mod.asarray(rng.standard_normal(model.local_size).astype(np.float32))
        model.refresh_compute()
        block = model.chunks[0].blocks[0]
        x = mod.asarray(rng.standard_normal((2, 16, 32)).astype(np.float32))
        y, cache = block.forward(x, DropoutRNG(0, 0, 0, range(2), mod))
        work = WeightWork(None if deferred else False)
        dx = block.backward_input(mod.ones_like(y), cache, work, DropoutRNG(0, 0, 0, range(2), mod))
        work.run(False)
        got[mod] = [np.asarray(a).copy() for a in (y, dx, model.grad_flat)]
    for a, b in zip(got[np], got[xp]):
        assert np.array_equal(a, b)
    fwd = block_counts(T=16, head_dim=16, precision=precision, dropout=0.1).forward
    assert fwd.launches["dropout_residual_forward"] == 2 and fwd.launches["bias_gelu_forward"] == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_kept_16_bit_values_widen_to_the_rounded_float32_bitwise(fmt):
    """Precision.keep on a device stores 2 bytes an element (round.cu's narrow_format, one launch), and use widens
    them (widen_format, one launch) to exactly the float32-rounded values the CPU path computes (Precision.operand):
    ties, NaN, infinities, subnormals and overflow included; keep_use gives both in one launch (narrow_round)."""
    from hpc_llm.model.precision import Precision

    prec = Precision(fmt)
    x = np.random.default_rng(7).standard_normal(4096).astype(np.float32) * 100
    x[:8] = [np.nan, np.inf, -np.inf, 1e-40, -0.0, 70000.0, 1 + 2**-8, 1 + 3 * 2**-8]
    xd = xp.asarray(x)
    with counting() as ledger, np.errstate(over="ignore"):  # fp16: 70000 -> inf
        kept = prec.keep(xd)
        back = prec.use(kept, np.float32)
        kept2, back2 = prec.keep_use(xd, np.float32)  # a linear layer's input: one pass
    assert ledger.total == 3 and kept.nbytes == kept2.nbytes == 2 * x.size
    with np.errstate(over="ignore"):
        want = prec.operand(x.copy())
    for got in (back, back2):
        assert np.array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))
    assert np.array_equal(np.asarray(kept).view(np.uint16), np.asarray(kept2).view(np.uint16))


@pytest.mark.timeout(60)
def test_16_bit_tp_transfers_count_their_conversions_whatever_the_size():
    """parallel.act_comm = bf16 on a device: each TP collective adds a conversion before and after (wire_narrow,
    wire_widen), counted by the harness, the same number at two model sizes."""
    kw = dict(T=64, tp=2, precision="bf16", sp=True, dropout=0.1, act_comm="bf16")
    small, large = (
        block_counts(head_dim=16, **kw),
        block_counts(head_dim=32, heads_per_rank=3, **kw),
    )
    plain = block_counts(head_dim=16, **{**kw, "act_comm": "fp32"})
    for a, b, p in zip(
        (small.forward, small.backward),
        (large.forward, large.backward),
        (plain.forward, plain.backward),
    ):
        assert a.launches == b.launches
        # the LayerNorms' partial gradients are summed in fp32 (tp.plain): no wire
        n = a.launches["wire_narrow"]
        assert a.launches["wire_widen"] == n and 0 < n <= a.launches["tp_collective"]
        assert a.total == p.total + 2 * n


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_2_byte_compute_copy_trains_as_the_float32_copy_bitwise(fmt, monkeypatch):
    """On a device GPT.compute is stored in 2 bytes (the blocks' matrices and wte, which kernels/cuda/gemm16
    multiplies; the other tensors, and wte again for the embedding, rounded in float32 beside it): refresh_compute
    writes the bits the CPU's rounding gives (one launch), a whole model's loss and gradients, the tied head's 16-bit
    GEMMs included, equal the float32 compute copy's bit for bit (the same values; the twin widens them), and the
    planner counts exactly the bytes the model allocates for it."""
    from hpc_llm.config import ModelConfig
    from hpc_llm.model import attention as SA
    from hpc_llm.model.gpt import GPT, stored_16_bit
    from hpc_llm.model.precision import Precision
    from hpc_llm.plan.memory import Layout, rank_memory
    from hpc_llm.plan.predict import bytes_of

    monkeypatch.setenv("HPC_LLM_KERNELS", "numpy")
    monkeypatch.setattr(SA, "FUSED_ATTENTION", False)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    rng = np.random.default_rng(1)
    idx, tgt = (rng.integers(0, 64, (2, 16)) for _ in range(2))
    ref = GPT(cfg, np, seed=None)
    master = rng.standard_normal(ref.local_size).astype(np.float32) * 0.1
    at = ref.spec["h.0.attn.c_attn.weight"].offset
    master[at : at + 3] = [1 + 2**-8, 1 + 3 * 2**-8, 1e-40]  # ties, a subnormal
    got = {}
    for mod in (np, xp):
        model = GPT(cfg, mod, seed=None, precision=fmt)
        model.flat[...] = mod.asarray(master)
        with counting() as ledger:
            model.refresh_compute()
        loss = model.forward(mod.asarray(idx), mod.asarray(tgt), keep_cache=True)
        model.backward()
        got[mod] = loss, np.asarray(model.grad_flat).copy(), model
    (loss, grads, cpu), (dev_loss, dev_grads, dev) = got[np], got[xp]
    assert ledger.total == 1 and dev.compute.itemsize == 2
    assert loss == dev_loss and np.array_equal(grads, dev_grads)
    low = Precision(fmt).low
    for s in dev.specs:
        want = cpu.params[s.name]
        value = np.asarray(dev.params[s.name])
        if stored_16_bit(s):
            assert value.dtype == low and np.array_equal(value, want.astype(low)), s.name
        else:
            assert np.array_equal(value.view(np.uint32), want.view(np.uint32)), s.name
    # wte served both ways: the head's GEMMs read its bits, the embedding gathers its float32 rows
    wte = cpu.params["wte.weight"]
    head, embedding = dev.chunks[-1].head, dev.chunks[0].embedding
    assert head.wte.value.dtype == low and np.array_equal(head.wte.value, wte.astype(low))
    assert embedding.wte.value is dev.params["wte.weight"] and cpu.chunks[-1].head.wte.value is wte
    device = type("Device", (), {"backend": "cupy"})()
    mem = rank_memory(cfg, Layout(), 0, bytes_of(fmt, device, Layout()))
    assert mem.master == dev.compute.nbytes + dev.compute_wide.nbytes < 4 * dev.local_size


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_head_launches_are_what_the_planner_prices(fmt):
    """The tied head on a device (plan/compute.head_forward, head_backward_input, head_weight on a CuPy cluster):
    its three GEMMs at the format's rate (Pricer.linear), each on 16-bit operands, and the conversions priced are the
    narrowing and widening launches it runs (the input kept once, dlogits narrowed once for both backward GEMMs)."""
    from helpers import plan_cluster_dict

    from hpc_llm.config import ModelConfig
    from hpc_llm.model.gpt import GPT
    from hpc_llm.plan import cluster_file as K
    from hpc_llm.plan import compute as C
    from hpc_llm.plan import pricer

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    head = GPT(cfg, xp, seed=0, precision=fmt).chunks[-1].head
    rng = np.random.default_rng(2)
    x = xp.asarray(rng.standard_normal((2, 16, 32)).astype(np.float32))
    with counting() as fwd:
        _, cache = head.forward(x, xp.asarray(rng.integers(0, 64, (2, 16))))
    with counting() as bwd:
        head.backward(cache, 1.0, False)
    d = plan_cluster_dict()
    d["compute"] = {**d["compute"], "backend": "cupy"}

    class Tally(pricer.Pricer):
        def _cast(self, elems, to_low, calls=1.0):
            planned["narrow_format" if to_low else "widen_format"] += 1
            return pricer.Cost()

        def linear(self, m, n, k):
            planned["matmul"] += 1
            assert self.gemm16
            return pricer.Cost()

    low = {"bf16": "bfloat16", "fp16": "float16"}[fmt]
    p = Tally(K.cluster_from_dict(d), "float32", 4, 1, None, low=low)
    for ledger, priced in (
        (fwd, lambda: C.head_forward(p, 2, 16, 32, 64)),
        (bwd, lambda: C.head_backward(p, 2, 16, 32, 64, False)),
    ):
        planned = dict.fromkeys(("narrow_format", "widen_format", "matmul"), 0)
        priced()
        assert planned == {k: ledger.launches.get(k, 0) for k in planned}


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "precision, recompute", [("fp32", "none"), ("bf16", "none"), ("bf16", "selective")]
)
def test_planned_device_activations_equal_what_the_device_path_keeps(precision, recompute):
    """plan/activations.py's cache bytes for a device (fused attention: y and the logsumexp kept, no probabilities
    or masks; 16-bit kept activations) are the bytes of the arrays a chunk's forward on the stand-in keeps, and
    less than the host path's where the probabilities would be kept."""
    from helpers import cache_bytes

    from hpc_llm.config import ModelConfig
    from hpc_llm.model.gpt import GPT
    from hpc_llm.model.layers import DropoutRNG
    from hpc_llm.plan.activations import chunk_cache_bytes
    from hpc_llm.plan.predict import PRECISIONS

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=64, dropout=0.1)
    b = 2
    model = GPT(cfg, xp, seed=0, recompute=recompute, precision=precision)
    tokens = np.random.default_rng(0).integers(0, 64, (b, 64))
    _, cache = model.chunks[0].forward(
        xp.asarray(tokens), xp.asarray(tokens), DropoutRNG(0, 0, 0, range(b), xp)
    )
    by = PRECISIONS[precision][1]
    planned = [
        chunk_cache_bytes(cfg, 1, b, 2, True, True, by.act, recompute, by.compute, device=d)
        for d in (True, False)
    ]
    assert cache_bytes(cache) == planned[0]
    assert planned[0] < planned[1] if recompute == "none" else planned[0] > planned[1]
