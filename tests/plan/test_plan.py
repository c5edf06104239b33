"""The planner (hpc_llm/plan): its memory model equals what the code allocates, its collective costs equal the stated
formulas, its pipeline simulator agrees with schedule_timing.simulate and the ideal bubble, and `hpc-llm plan` answers
bad input with one line. No timing assertions: the time model's accuracy is measured in docs/planning.md."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from helpers import cache_bytes, plan_cluster_dict, tiny_config

from hpc_llm import cli
from hpc_llm.checkpoint.format import deal
from hpc_llm.config import ModelConfig, TrainConfig, load_config
from hpc_llm.errors import UserError
from hpc_llm.kernels import gemm
from hpc_llm.model.attention import query_blocks
from hpc_llm.model.gpt import GPT
from hpc_llm.model.layers import ELEMENTWISE_CHUNK, DropoutRNG
from hpc_llm.model.precision import Precision
from hpc_llm.optim import AdamW
from hpc_llm.parallel import schedule as S
from hpc_llm.parallel import schedule_timing as T
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.data_parallel import GradientSync
from hpc_llm.plan import cluster as K
from hpc_llm.plan import cluster_file as KF
from hpc_llm.plan.activations import chunk_cache_bytes, chunk_weight_bytes
from hpc_llm.plan.memory import Bytes, Layout, rank_memory, specs_of, stage_plan, stage_sync
from hpc_llm.plan.predict import PRECISIONS, _checkpoint_time, bytes_of, predict, save_terms
from hpc_llm.plan.search import search
from hpc_llm.plan.simulate import simulate_costs


class FakeComm(Comm):
    """A group of `size` ranks seen from `rank`, with no MPI: collectives leave buffers as they are (shapes, not
    values, are what the memory model is about)."""

    def __init__(self, size: int, rank: int = 0):
        super().__init__(None)
        self.size, self.rank = size, rank

    def allreduce_(self, buf, op: str = "sum"):
        return buf

    # sequence parallelism's collectives: the shapes they give (the whole from `size` slices, a slice of the whole)
    def allgather_along(self, x, axis: int):
        return np.concatenate([x] * self.size, axis=axis)

    def reduce_scatter_along(self, x, axis: int):
        n = x.shape[axis] // self.size
        return np.take(x, range(self.rank * n, (self.rank + 1) * n), axis=axis)


CL = KF.cluster_from_dict(plan_cluster_dict())
# CL with a bf16 GEMM figure: a CPU cluster whose nodes run bf16 products on oneDNN (Cluster.reads_bf16)
CL_BF16 = KF.cluster_from_dict(
    {
        **plan_cluster_dict(),
        "compute": {
            **plan_cluster_dict()["compute"],
            "gemm": {
                **plan_cluster_dict()["compute"]["gemm"],
                "bfloat16": {"32": 1e11, "1024": 2e11},
            },
        },
    }
)


def this_cpu(precision: str, lay: Layout):
    """The planner's bytes for a model built on this machine: the cluster this CPU is (gemm.reads_bf16)."""
    reads = precision in ("bf16", "fp16") and gemm.reads_bf16(Precision(precision))
    return bytes_of(precision, CL_BF16 if reads else CL, lay)


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=100)
    return ModelConfig(**{**base, **kw})


# -- memory: parameters, gradients, optimizer state --------------------------------------------------------------


@pytest.mark.parametrize(
    "tp, pp, stage, virtual, dp, dp_rank, zero, precision",
    [
        (1, 1, 0, 1, 1, 0, 0, "fp32"),
        (2, 1, 0, 1, 1, 1, 0, "fp32"),
        (1, 2, 0, 1, 2, 0, 1, "fp32"),
        (2, 2, 1, 1, 2, 1, 1, "fp32"),
        (1, 2, 1, 2, 3, 2, 1, "fp32"),
        (4, 1, 0, 1, 2, 0, 1, "bf16"),
    ],
)
def test_persistent_memory_equals_the_trainers_buffers(
    tp, pp, stage, virtual, dp, dp_rank, zero, precision
):
    cfg = tiny()
    lay = Layout(
        pp=pp,
        dp=dp,
        tp=tp,
        zero=zero,
        schedule="interleaved" if virtual > 1 else "1f1b",
        virtual=virtual,
        micro_batches=4,
        batch_size=2 * dp,
        bucket_mb=0.002,
    )
    plan = stage_plan(cfg, lay, stage)
    model = GPT(cfg, seed=None, tp_comm=FakeComm(tp, tp - 1), plan=plan, precision=precision)
    bucket = int(lay.bucket_mb * 2**20) // 4
    sync = GradientSync(model.grad_flat, FakeComm(dp, dp_rank), bucket, zero == 1)
    assert len(sync.buckets) > 2  # several buckets: ZeRO pieces of each, not one split
    opt = AdamW(model.flat, model.grad_flat, model.decay_ranges(), TrainConfig(), owned=sync.owned)
    by = this_cpu(precision, lay)
    mem = rank_memory(cfg, lay, stage, by, dp_rank=dp_rank, optimizer_threads=opt.threads)
    assert mem.params == model.flat.nbytes
    assert mem.grads == model.grad_flat.nbytes
    bits = model.compute_bits.nbytes if model.compute_bits is not None else 0
    assert mem.master == (model.compute.nbytes if model.compute is not model.flat else 0) + bits
    assert mem.moments == opt.m.nbytes + opt.v.nbytes
    assert mem.optimizer_temps == sum(a.nbytes + b.nbytes for a, b in opt._temps)
    if zero and dp > 1:
        assert mem.moments < 2 * model.flat.nbytes  # sharded: a piece of every bucket


def test_persistent_memory_of_a_real_trainer(make_cfg):
    from hpc_llm.train.trainer import Trainer

    cfg = make_cfg(**{"train.precision": "bf16"})
    tr = Trainer(cfg)
    lay = Layout(batch_size=cfg.train.batch_size, micro_batches=cfg.train.grad_accum)
    mem = rank_memory(tr.cfg.model, lay, 0, this_cpu("bf16", lay), optimizer_threads=tr.opt.threads)
    bits = tr.model.compute_bits.nbytes if tr.model.compute_bits is not None else 0
    assert (mem.params, mem.grads, mem.master) == (
        tr.model.flat.nbytes,
        tr.model.grad_flat.nbytes,
        tr.model.compute.nbytes + bits,
    )
    assert mem.moments == tr.opt.m.nbytes + tr.opt.v.nbytes


@pytest.mark.parallel(nprocs=2)
def test_zero1_moments_of_a_real_trainer_at_dp2(data_dir, shared_tmp_path):
    from mpi4py import MPI

    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    cfg = tiny_config(
        data_dir, shared_tmp_path / "run", **{"parallel.zero": 1, "parallel.bucket_mb": 0.004}
    )
    tr = Trainer(cfg, grid=make_grid(MPI.COMM_WORLD, 1, 1))
    lay = Layout(dp=2, zero=1, batch_size=cfg.train.batch_size, bucket_mb=0.004)
    mem = rank_memory(
        tr.cfg.model, lay, 0, Bytes.of(4), dp_rank=tr.grid.dp_rank, optimizer_threads=tr.opt.threads
    )
    assert len(tr.sync.buckets) > 1
    assert mem.moments == tr.opt.m.nbytes + tr.opt.v.nbytes < 2 * tr.model.flat.nbytes
    assert (mem.params, mem.grads) == (tr.model.flat.nbytes, tr.model.grad_flat.nbytes)


# -- memory: the activations a forward keeps ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, tp, pp, stage, dropout, recompute, precision, sp",
    [
        (dict(), 1, 1, 0, 0.0, "none", "fp32", False),
        # 3 query blocks, dropout masks
        (dict(block_size=300, n_embd=64), 1, 1, 0, 0.1, "none", "fp32", False),
        (dict(block_size=130), 2, 1, 0, 0.0, "none", "fp32", False),  # tensor parallel shards
        (dict(), 1, 2, 0, 0.0, "none", "fp32", False),
        (dict(), 2, 2, 1, 0.1, "none", "fp32", False),  # pipeline stages
        (dict(), 1, 1, 0, 0.0, "block", "fp32", False),  # recompute: block inputs only
        # kept in 2 bytes, rstd and masks in 4
        (dict(block_size=140), 2, 1, 0, 0.0, "none", "fp16", False),
        (dict(dtype="float64"), 1, 1, 0, 0.0, "none", "fp32", False),
        # selective recompute: no probabilities or attention masks kept (1 and 3 query blocks, dropout)
        (dict(), 2, 1, 0, 0.1, "selective", "fp32", False),
        (dict(block_size=300, n_embd=64), 1, 1, 0, 0.1, "selective", "bf16", False),
        # sequence parallel: the replicated terms on the slice (both pipeline ends, dropout, 2 and 4 ranks)
        (dict(), 2, 1, 0, 0.1, "none", "fp32", True),
        (dict(block_size=140), 4, 2, 1, 0.1, "none", "fp16", True),
        (dict(), 2, 2, 0, 0.0, "block", "fp32", True),  # its block inputs: slices
        (dict(block_size=260), 2, 1, 0, 0.1, "selective", "bf16", True),
    ],
)
def test_activation_term_equals_the_cache_a_forward_keeps(
    shape, tp, pp, stage, dropout, recompute, precision, sp
):
    cfg = tiny(dropout=dropout, **shape)
    b = 3
    lay = Layout(pp=pp, tp=tp, batch_size=b)
    model = GPT(
        cfg,
        seed=0,
        tp_comm=FakeComm(tp, tp - 1),
        plan=stage_plan(cfg, lay, stage),
        recompute=recompute,
        precision=precision,
        sequence_parallel=sp,
    )
    chunk = model.chunks[0]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, cfg.block_size))
    shape_in = model.act_shape(b, cfg.block_size)  # (b, T/tp, C) with sequence parallelism
    inp = tokens if chunk.embedding else rng.standard_normal(shape_in).astype(model.dtype)
    drop = DropoutRNG(0, 0, 0, range(b)) if dropout else None
    out, cache = chunk.forward(inp, tokens if chunk.head else None, drop)
    if chunk.head is None:
        assert out.shape == shape_in
    it = model.dtype.itemsize
    by = PRECISIONS["fp64" if it == 8 else precision][1]
    expect = chunk_cache_bytes(
        cfg,
        tp,
        b,
        len(chunk.blocks),
        chunk.embedding is not None,
        chunk.head is not None,
        by.act,
        recompute,
        by.compute,
        sp,
    )
    assert cache_bytes(cache) == expect


@pytest.mark.parametrize(
    "shape, tp, pp, stage, dropout, recompute, precision, sp",
    [
        (dict(), 1, 1, 0, 0.1, "none", "fp32", False),  # embedding, blocks, head
        (dict(block_size=140), 2, 2, 1, 0.0, "selective", "fp16", False),
        (dict(), 2, 2, 0, 0.1, "block", "bf16", True),
        (dict(), 2, 2, 1, 0.0, "none", "fp32", True),
        (dict(), 2, 1, 0, 0.0, "none", "bf16", False),
    ],
)
def test_weight_term_equals_what_b_leaves_for_w(
    shape, tp, pp, stage, dropout, recompute, precision, sp
):
    """A zero-bubble schedule's B keeps, per micro-batch until its W, exactly chunk_weight_bytes: the arrays of
    Chunk.backward_input's WeightWork (the gradient buffer W writes into aside)."""
    cfg = tiny(dropout=dropout, **shape)
    b = 3
    lay = Layout(pp=pp, tp=tp, batch_size=b)
    model = GPT(
        cfg,
        seed=0,
        tp_comm=FakeComm(tp, tp - 1),
        plan=stage_plan(cfg, lay, stage),
        recompute=recompute,
        precision=precision,
        sequence_parallel=sp,
    )
    chunk = model.chunks[0]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, cfg.block_size))
    shape_in = model.act_shape(b, cfg.block_size)
    inp = tokens if chunk.embedding else rng.standard_normal(shape_in).astype(model.dtype)
    drop = DropoutRNG(0, 0, 0, range(b)) if dropout else None
    out, cache = chunk.forward(inp, tokens if chunk.head else None, drop)
    dout = None if chunk.head else rng.standard_normal(shape_in).astype(model.dtype)
    _, weights = chunk.backward_input(dout, cache, head_accumulate=False)
    kept = cache_bytes([work.todo for _, work in weights]) - model.grad_flat.nbytes
    by = this_cpu(precision, lay)
    first, last = chunk.embedding is not None, chunk.head is not None
    n = len(chunk.blocks)
    expect = chunk_weight_bytes(cfg, tp, b, n, first, last, by.act, by.compute, sp, by.weight_dy)
    assert kept == expect


def test_sequence_parallel_and_selective_caches_drop_exactly_their_terms():
    """The block cache under sequence parallelism is the plain one less exactly the replicated terms (both
    LayerNorms, the branch masks, the column-parallel inputs) times (1 - 1/tp); under selective recompute, less the
    probabilities, attention masks and GELU's tanh (4bTC/tp): term by term, in elements."""
    from hpc_llm.plan.activations import attention_scores, block_cache_elems

    b, T, C, H, tp = 2, 256, 64, 8, 4
    n, rows = b * T * C, b * T
    replicated = {
        "ln_1 xhat": n,
        "ln_1 rstd": rows,
        "ln_1 output (qkv input)": n,
        "attention branch dropout mask": n,
        "ln_2 xhat": n,
        "ln_2 rstd": rows,
        "ln_2 output (fc input)": n,
        "MLP branch dropout mask": n,
    }
    plain = block_cache_elems(b, T, C, H, tp, True)
    sp = block_cache_elems(b, T, C, H, tp, True, sp=True)
    assert plain.keys() == sp.keys()
    for name, elems in plain.items():
        assert sp[name] == elems - replicated.get(name, 0) * (1 - 1 / tp), name
    assert sum(plain.values()) - sum(sp.values()) == sum(replicated.values()) * (tp - 1) // tp
    att = b * H // tp * attention_scores(T)
    sel = block_cache_elems(b, T, C, H, tp, True, recompute="selective")
    dropped = {
        "attention probabilities": att,
        "attention dropout masks": att,
        "GELU tanh": 4 * n // tp,
    }
    for name, elems in plain.items():
        assert sel[name] == elems - dropped.get(name, 0), name


def test_in_flight_activations_follow_the_schedule():
    """1F1B keeps p - s micro-batches on stage s, GPipe all m: the activation term scales with that count."""
    cfg = tiny()
    by = Bytes.of(4)
    per = chunk_cache_bytes(cfg, 1, 2, 2, True, False)
    one = rank_memory(
        cfg, Layout(pp=2, schedule="1f1b", micro_batches=8, batch_size=2), 0, by
    ).activations
    gp = rank_memory(
        cfg, Layout(pp=2, schedule="gpipe", micro_batches=8, batch_size=2), 0, by
    ).activations
    assert one == 2 * per
    assert gp == 8 * per


# -- collective costs --------------------------------------------------------------------------------------------


def test_collective_formulas_hand_computed():
    a, b = 1e-6, 1e9
    # 12.006 ms
    assert K.ring_allreduce(8e6, 4, a, b) == pytest.approx(2 * 3 / 4 * 8e6 / 1e9 + 6e-6)
    assert K.tree_allreduce(8e6, 4, a, b) == pytest.approx(2 * 2 * (1e-6 + 8e-3))
    assert K.allreduce(8e6, 4, a, b) == pytest.approx(0.012006)  # large: the ring
    # small: the tree (ring: 14 latencies)
    assert K.allreduce(8, 8, a, b) == pytest.approx(6 * (1e-6 + 8e-9))
    assert K.reduce_scatter(8e6, 4, a, b) == pytest.approx(3 / 4 * 8e-3 + 3e-6)
    assert K.allgather(8e6, 4, a, b) == K.reduce_scatter(8e6, 4, a, b)
    assert K.p2p(1e6, a, b) == pytest.approx(1e-6 + 1e-3)
    assert K.allreduce(1e9, 1, a, b) == 0.0


def test_gemm_and_elementwise_figures_interpolate():
    assert CL.gemm_rate("float32", 4096, 4096, 4096) == 1e11  # beyond the table: its end
    # halfway in log(dimension)
    mid = CL.gemm_rate("float32", 1024, 1024, int(math.sqrt(32 * 1024)))
    assert mid == pytest.approx(7.5e10, rel=1e-3)
    assert CL.gemm_time("float32", 10, 10, 10, batch=3) == pytest.approx(3 * (1e-6 + 2000 / 5e10))


# -- the pipeline simulator --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, p, m, v",
    [
        ("gpipe", 4, 8, 1),
        ("1f1b", 4, 8, 1),
        ("1f1b", 3, 5, 1),
        ("interleaved", 2, 4, 2),
        ("interleaved", 4, 8, 3),
    ],
)
def test_simulated_bubble_is_ideal_without_transfer_costs(name, p, m, v):
    t = simulate_costs(
        name, p, m, v, lambda kind, s, later: (1.0 if kind == S.Phase.FORWARD else 2.0) / v
    )
    assert t.bubble == pytest.approx((p - 1) / (v * m + p - 1))
    ref = T.simulate(name, p, m, v, 1.0, 2.0, 0.3)
    assert simulate_costs(
        name, p, m, v, lambda k, s, later: (1.0 if k == S.Phase.FORWARD else 2.0) / v, 0.3
    ).makespan == pytest.approx(ref.makespan)


def test_a_heavier_last_stage_lengthens_the_step():
    even = simulate_costs("1f1b", 2, 4, 1, lambda k, s, later: 1.0)
    heavy = simulate_costs("1f1b", 2, 4, 1, lambda k, s, later: 2.0 if s == 1 else 1.0)
    assert heavy.makespan > even.makespan


def test_zero_bubble_prices_b_and_w_apart():
    """The backward's price is its B's and W's (the regrouping changes nothing); zb-h1 priced op by op with uniform
    costs is schedule_timing.simulate's; predicted at pp 4, its W's fill 1F1B's bubble: the same compute, less waiting,
    a shorter step; zbv (priced per virtual stage on its V) shorter still, with no embedding allreduce; zb-h1's last
    stage keeps p - 1 micro-batches' W parts beside one cache where 1F1B keeps one cache."""
    from hpc_llm.plan import compute as PC
    from hpc_llm.plan import pricer
    from hpc_llm.plan.peak import _chunk_sizes

    cfg = tiny(n_layer=4, n_embd=64, block_size=64)
    pr = pricer.Pricer(CL, "float32", 4, 2, K.Link(1e-5, 1e9, 1e9), sp=True)
    for acc in (False, True):
        whole = PC.block_backward(pr, 2, 64, 64, 4, acc, False, 128)
        parts = PC.block_backward_input(pr, 2, 64, 64, 4) + PC.block_weight(
            pr, 2, 64, 64, 4, acc, 128
        )
        assert parts.total == pytest.approx(whole.total, rel=1e-12) and parts.tp == pytest.approx(
            whole.tp
        )
    costs = {S.Phase.FORWARD: 1.0, S.Phase.BACKWARD: 1.2, S.Phase.WEIGHT: 0.8}
    t = simulate_costs("zb-h1", 4, 8, 1, lambda kind, s, later: costs[kind])
    assert t.makespan == pytest.approx(T.simulate("zb-h1", 4, 8, t_b=1.2, t_w=0.8).makespan)
    lay = dict(pp=4, micro_batches=8, batch_size=2)
    zb, base = (predict(cfg, Layout(schedule=n, **lay), CL) for n in ("zb-h1", "1f1b"))
    assert sum(e.op.kind == S.Phase.WEIGHT for e in zb.timing.events) == 4 * 8
    assert zb.time["compute"] == pytest.approx(base.time["compute"], rel=0.05)
    assert (
        zb.time["pipeline_wait"] < base.time["pipeline_wait"]
        and zb.time["step"] < base.time["step"]
    )
    # zbv: priced with its V placement (each virtual stage's own costs); its W's fill more of the bubble
    t = simulate_costs("zbv", 4, 8, 2, lambda kind, s, later: costs[kind] / 2)
    assert t.makespan == pytest.approx(T.simulate("zbv", 4, 8, 2, t_b=1.2, t_w=0.8).makespan)
    zv = predict(cfg, Layout(schedule="zbv", virtual=2, **lay), CL)
    assert sum(e.op.kind == S.Phase.WEIGHT for e in zv.timing.events) == 4 * 8 * 2
    assert zv.time["pipeline_wait"] < zb.time["pipeline_wait"] and zv.time["step"] < zb.time["step"]
    assert zv.time["emb_allreduce"] == 0  # one embedding copy, on stage 0
    by = Bytes.of(4)
    for name, want in (("zb-h1", lambda f, w: 3 * w + f), ("1f1b", lambda f, w: f)):
        lay_n = Layout(schedule=name, **lay)
        plan = stage_plan(cfg, lay_n, 3)
        f, w = (
            _chunk_sizes(cfg, lay_n, plan, by)[0],
            _chunk_sizes(cfg, lay_n, plan, by, weight=True)[0],
        )
        assert rank_memory(cfg, lay_n, 3, by).activations == want(f, w), name


# -- predictions and the search ----------------------------------------------------------------------------------


def test_prediction_parts_and_dp_overlap():
    cfg = tiny(n_layer=4, n_embd=64, block_size=64)
    p = predict(cfg, Layout(dp=2, batch_size=8, bucket_mb=0.01), CL)
    t = p.time
    assert t["step"] == pytest.approx(
        sum(v for k, v in t.items() if k not in ("step", "dp_hidden"))
    )
    # buckets launched during backward overlap it (overlap 1 on this cluster)
    assert t["dp_hidden"] > 0
    # one bucket: final only at the end
    blocking = predict(cfg, Layout(dp=2, batch_size=8, bucket_mb=100), CL)
    assert blocking.time["dp_hidden"] == 0 and blocking.time["dp_exposed"] > 0
    zero = predict(cfg, Layout(dp=2, zero=1, batch_size=8), CL)
    assert zero.time["zero_gather"] > 0 and zero.memory["moments"] < p.memory["moments"]


def test_a_teacher_is_priced_on_the_last_stage():
    """train.teacher: its TP shard of the weights (a real GPT's buffer) and 3 logits slices on the last stage only,
    and its forward on the last stage's forwards, which lengthens the step."""
    cfg, teacher = tiny(), tiny(n_layer=6, n_embd=64)
    lay = Layout(pp=2, tp=2, micro_batches=4, batch_size=2)
    by = PRECISIONS["fp32"][1]
    last = rank_memory(cfg, lay, 1, by, teacher=teacher)
    weights = GPT(teacher, seed=None, tp_comm=FakeComm(2, 1)).flat.nbytes
    logits = lay.rows * 16 * (teacher.padded_vocab // 2)
    assert last.teacher == weights + 3 * logits * 4
    assert last.peak == rank_memory(cfg, lay, 1, by).peak + last.teacher
    assert rank_memory(cfg, lay, 0, by, teacher=teacher).teacher == 0
    plain, taught = predict(cfg, lay, CL), predict(cfg, lay, CL, teacher=teacher)
    assert taught.time["step"] > plain.time["step"]


def test_search_sorts_by_speed_and_names_limits():
    cfg = tiny()
    ok, bad = search(cfg, CL, 4, 8)
    speeds = [p.tokens_per_s for p in ok]
    assert speeds == sorted(speeds, reverse=True)
    assert {(p.layout.pp, p.layout.dp, p.layout.tp) for p in ok} >= {
        (1, 4, 1),
        (2, 2, 1),
        (1, 1, 4),
    }
    _, bad = search(tiny(n_head=2, n_layer=2), CL, 4, 8)
    assert any(r.startswith("tp=4 pp=1 dp=1: tp does not divide model.n_head=2") for _, r in bad)
    assert any(r.startswith("tp=1 pp=4 dp=1: pp does not divide model.n_layer=2") for _, r in bad)


def test_memory_first_search_gives_the_same_answer_as_predicting_every_layout():
    """search() rejects a layout whose memory does not fit before simulating its schedule, and does not price a
    layout's variants that recompute more than one that fits (slower by construction): the feasible list (its
    order, every time and memory term) and the infeasible reasons are those of predicting every layout whole and
    dropping those variants."""
    from hpc_llm.plan.search import describe, layouts

    cfg = tiny(n_layer=4, n_embd=64, block_size=64)
    precisions, recomputes = ["fp32", "fp16"], ("none", "selective", "block")
    every = [
        (lay, prec, predict(cfg, lay, CL, prec))
        for lay, why in layouts(cfg, 4, 16, 25.0, recomputes, sequence_parallel=(False, True))
        if why is None
        for prec in precisions
    ]
    assert any(lay.sequence_parallel for lay, _, _ in every)
    peaks = sorted(p.memory["peak"] for _, _, p in every)
    cl = dataclasses.replace(CL, memory_bytes=peaks[len(peaks) // 2])  # about half the layouts fit
    fits = {(lay, prec) for lay, prec, p in every if p.memory["peak"] <= cl.memory_bytes}
    less = {"none": (), "selective": ("none",), "block": ("none", "selective")}

    def dominated(lay, prec) -> bool:
        return any(
            (dataclasses.replace(lay, recompute=r), prec) in fits for r in less[lay.recompute]
        )

    slow_ok = sorted(
        (p for lay, prec, p in every if (lay, prec) in fits and not dominated(lay, prec)),
        key=lambda p: -p.tokens_per_s,
    )
    slow_bad = [
        f"{describe(lay)} {prec}: memory {p.memory['peak'] / 1e9:.2f} GB per rank"
        for lay, prec, p in every
        if p.memory["peak"] > cl.memory_bytes and not dominated(lay, prec)
    ]
    ok, bad = search(
        cfg, cl, 4, 16, precisions, recomputes=recomputes, sequence_parallel=(False, True)
    )
    assert len(ok) > 10 and len(slow_bad) > 10
    # some variants were skipped, and each was slower than the fitting one that replaced it
    skipped = [
        (lay, prec, p) for lay, prec, p in every if (lay, prec) in fits and dominated(lay, prec)
    ]
    assert skipped
    step = {(lay, prec): p.time["step"] for lay, prec, p in every}
    for lay, prec, p in skipped:
        for r in less[lay.recompute]:
            if (dataclasses.replace(lay, recompute=r), prec) in fits:
                assert p.time["step"] > step[(dataclasses.replace(lay, recompute=r), prec)]
    assert [(p.layout, p.precision, p.time, p.memory) for p in ok] == [
        (p.layout, p.precision, p.time, p.memory) for p in slow_ok
    ]
    assert [r.split(" > ")[0] for _, r in bad if ": memory " in r] == slow_bad


@pytest.mark.parametrize(
    "tp, block_size, sp, recompute",
    [
        (1, 64, False, "none"),  # 1 and 2 query blocks
        (2, 140, False, "none"),
        (2, 140, True, "none"),  # sequence parallel: slices kept and used, wholes as operands
        (2, 140, False, "selective"),  # probabilities not kept, rebuilt in backward
        (4, 256, True, "selective"),
    ],
)
def test_conversions_priced_are_those_the_code_makes(monkeypatch, tp, block_size, sp, recompute):
    """bf16/fp16: the elements the time model converts to the format and back (compute.py, Pricer.keep, use,
    operand, round_) are those a real forward and backward convert (Precision's methods, counted)."""
    from hpc_llm.model import precision as P
    from hpc_llm.plan import compute as C
    from hpc_llm.plan import pricer

    code = {True: 0, False: 0}  # to the format, back
    real = {k: getattr(P.Precision, k) for k in ("keep", "use", "operand", "round_")}

    def counting(name, to, back):
        def f(self, x, *a):
            if self.low is not None:
                code[True] += to * x.size
                code[False] += back * x.size
            return real[name](self, x, *a)

        return f

    for name, to, back in (("keep", 1, 0), ("use", 0, 1), ("operand", 1, 1), ("round_", 1, 1)):
        monkeypatch.setattr(P.Precision, name, counting(name, to, back))

    class Tally(pricer.Pricer):
        def _cast(self, elems, to_low, calls=1.0):
            planned[to_low] += elems
            return pricer.Cost()

    cfg = tiny(block_size=block_size, n_layer=2)
    b = 3
    model = GPT(
        cfg,
        seed=0,
        tp_comm=FakeComm(tp),
        plan=stage_plan(cfg, Layout(tp=tp, batch_size=b), 0),
        precision="fp16",
        recompute=recompute,
        sequence_parallel=sp,
    )
    chunk = model.chunks[0]
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, cfg.block_size))
    pr = Tally(CL, "float32", 4, tp, CL.link("intra"), low="float16", sp=sp)
    selective = recompute == "selective"
    T, Cm, H, V = cfg.block_size, cfg.n_embd, cfg.n_head, cfg.padded_vocab
    for phase in ("forward", "backward"):
        code.update({True: 0, False: 0})
        planned = {True: 0, False: 0}
        if phase == "forward":
            _, cache = chunk.forward(tokens, tokens)
            for _ in range(cfg.n_layer):
                C.block_forward(pr, b, T, Cm, H, selective)
            C.head_forward(pr, b, T, Cm, V)
        else:
            chunk.backward(None, cache)
            C.head_backward(pr, b, T, Cm, V, False)
            for _ in range(cfg.n_layer):
                C.block_backward(pr, b, T, Cm, H, False, selective)
        assert planned == code and code[True] > 0 and code[False] > 0, phase


def test_cast_figures_price_bf16_conversions():
    """With [compute.cast] a conversion costs elements / rate + a call; without it, a pass of 6 bytes per element."""
    d = plan_cluster_dict()
    d["compute"]["cast"] = {"to_bfloat16": 1e9, "from_bfloat16": 2e9}
    cl = KF.cluster_from_dict(d)
    assert cl.cast_time("bfloat16", True, 1e6) == pytest.approx(1e-3 + 1e-6)
    assert cl.cast_time("bfloat16", False, 1e6, calls=4) == pytest.approx(5e-4 + 4e-6)
    assert CL.cast_time("bfloat16", True, 1e6) == pytest.approx(CL.pass_time(1.5e6, 4, 1e6))
    cfg = tiny(n_layer=2, n_embd=64, block_size=64)
    fp32, bf16 = (predict(cfg, Layout(batch_size=4), cl, prec) for prec in ("fp32", "bf16"))
    slow = dataclasses.replace(cl, cast={"to_bfloat16": 1e8, "from_bfloat16": 2e8})
    assert (
        fp32.time["step"]
        < bf16.time["step"]
        < predict(cfg, Layout(batch_size=4), slow, "bf16").time["step"]
    )
    d["compute"]["cast"] = {"to_bf16": 1e9}
    with pytest.raises(UserError, match="compute.cast.to_bf16: expected one of to_bfloat16"):
        KF.cluster_from_dict(d)


def test_oversubscribed_ranks_share_their_link():
    """Two ranks per device: compute and collectives both take twice as long."""
    cfg = tiny(n_layer=2, n_embd=64, block_size=64)
    lay = Layout(dp=2, batch_size=8)
    one, two = predict(cfg, lay, CL), predict(cfg, lay, CL, share=2.0)
    assert two.time["compute"] == pytest.approx(2 * one.time["compute"])
    assert two.time["dp_exposed"] == pytest.approx(2 * one.time["dp_exposed"])


def test_cluster_toml_round_trip(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(KF.to_toml(plan_cluster_dict(), "header"))
    cl = KF.load_cluster(path)
    assert cl.gemm["float32"] == [(32.0, 5e10), (1024.0, 1e11)]
    assert cl.link("inter").bw == 1e9 and cl.devices == 4


# -- the CLI -----------------------------------------------------------------------------------------------------


def write_cluster(tmp_path, **kw) -> str:
    d = plan_cluster_dict(**{k: None for k in kw.pop("drop", ())})
    for k, v in kw.items():
        section, key = k.split("__")
        d[section][key] = v
    path = tmp_path / "cluster.toml"
    path.write_text(KF.to_toml(d))
    return str(path)


def write_config(tmp_path, **model) -> str:
    fields = dict(n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=100, **model)
    text = (
        "[model]\n"
        + "".join(f"{k} = {v}\n" for k, v in fields.items())
        + "[train]\nbatch_size = 4\n"
    )
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return str(path)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "missing figure compute.scatter_rate"),
        ("no_layout", "--gpus 3 admits no layout"),
        ("fits_nowhere", "fits on no layout of 2 devices; the closest"),
        ("no_inter", "missing figures link.inter"),
    ],
)
def test_plan_bad_input_is_one_line(tmp_path, capsys, case, expect):
    cfg = write_config(tmp_path)
    gpus, batch = "2", "4"
    if case == "missing":
        cl = write_cluster(tmp_path, drop=["compute__scatter_rate"])
    elif case == "no_layout":
        cl, gpus, batch = write_cluster(tmp_path), "3", "4"
    elif case == "fits_nowhere":
        cl = write_cluster(tmp_path, node__memory_bytes=1e5)
    else:
        cl, gpus = write_cluster(tmp_path, drop=["link__inter"], node__devices=1), "2"
    rc, _, err = run_cli(
        capsys, "plan", cfg, "--cluster", cl, "--gpus", gpus, "--global-batch", batch
    )
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("hpc-llm: error: ") and expect in err, err


def test_plan_json_fields_and_timeline(tmp_path, capsys):
    png = tmp_path / "t.png"
    rc, out, _ = run_cli(
        capsys,
        "plan",
        write_config(tmp_path),
        "--cluster",
        write_cluster(tmp_path),
        "--gpus",
        "2",
        "--global-batch",
        "8",
        "--json",
        "--timeline",
        str(png),
    )
    assert rc == 0
    r = json.loads(out)
    best = r["feasible"][0]
    assert set(best["memory_bytes"]) >= {
        "params",
        "grads",
        "moments",
        "activations",
        "workspace",
        "pipeline_buffers",
        "checkpoint_scratch",
        "peak",
    }
    assert set(best["time_s"]) >= {
        "step",
        "compute",
        "tp_comm",
        "pipeline_wait",
        "dp_exposed",
        "dp_hidden",
        "zero_gather",
        "optimizer",
        "checkpoint",
    }
    assert best["tokens_per_s"] == max(p["tokens_per_s"] for p in r["feasible"])
    assert {p["precision"] for p in r["feasible"]} == {"fp32", "bf16"}
    # every layout fits without recompute here, so its recomputing variants (slower) are not listed
    assert {p["layout"]["recompute"] for p in r["feasible"]} == {"none"}
    tp2 = {p["layout"]["sequence_parallel"] for p in r["feasible"] if p["layout"]["tp"] == 2}
    assert tp2 == {False, True}
    assert png.stat().st_size > 1000


def test_plan_compare_puts_prediction_beside_the_run(tmp_path, capsys, make_cfg):
    cfg = make_cfg()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    rows = [
        {"kind": "train", "step": s, "tokens_per_s": tps}
        for s, tps in ((1, 10.0), (2, 1000.0), (3, 1000.0))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, _ = run_cli(
        capsys,
        "plan",
        "--compare",
        str(run),
        "--cluster",
        write_cluster(tmp_path),
        "--gpus",
        "1",
        "--json",
    )
    assert rc == 0
    r = json.loads(out)
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    assert r["measured_step_s"] == pytest.approx(tokens / 1000.0)  # the warm-up window left out
    assert r["error"] == pytest.approx(r["predicted_step_s"] / r["measured_step_s"] - 1)


# -- one given layout (--layout) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_tail, text, lay, pp_layers",
    [
        (
            "",
            "pp=2,tp=2,dp=1,schedule=interleaved,virtual=2,micro=4,mbs=2,sp=1,recompute=selective,act_comm=bf16",
            Layout(
                pp=2,
                tp=2,
                schedule="interleaved",
                virtual=2,
                micro_batches=4,
                batch_size=2,
                recompute="selective",
                sequence_parallel=True,
                act_comm="bf16",
            ),
            (),
        ),
        # the config's uneven split (parallel.pp_layers, which the code runs), kept by a layout with its pp and
        # virtual stages (before, it was refused as uneven)
        (
            "grad_accum = 4\n[parallel]\npp = 3\npp_layers = [1, 2, 1]\n",
            "pp=3,virtual=1",
            Layout(pp=3, micro_batches=4, batch_size=4),
            [1, 2, 1],
        ),
    ],
    ids=["interleaved-sp-bf16", "uneven-split"],
)
def test_plan_layout_prices_one_layout(tmp_path, capsys, config_tail, text, lay, pp_layers):
    """--layout: the one layout described (keys over the config's), its memory terms and step in JSON, equal to
    predict() of that layout (and of the config's split); the text names every non-zero term and says whether it
    fits."""
    cfg_path, cl = write_config(tmp_path), write_cluster(tmp_path)
    with open(cfg_path, "a") as f:
        f.write(config_tail)
    rc, out, err = run_cli(capsys, "plan", cfg_path, "--cluster", cl, "--layout", text, "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["layout"] == dataclasses.asdict(lay)
    cfg = load_config(cfg_path)
    args = (
        tiny(),
        lay,
        KF.load_cluster(cl),
        "fp32",
        1.0,
        cfg.checkpoint.interval,
        cfg.train.max_iters,
    )
    # checkpoint.writer "auto" on several ranks: the parts writer
    pred = predict(*args, pp_layers=pp_layers, writer="parts")
    assert r["memory_bytes"] == pred.memory and r["time_s"] == pytest.approx(pred.time)
    assert r["memory_bytes"]["pipeline_buffers"] > 0
    assert (r["time_s"]["tp_comm"] > 0) == (lay.tp > 1)
    assert r["fits"] is (pred.memory["peak"] <= 16e9) and r["device_memory_bytes"] == 16e9
    if pp_layers:  # the config's split priced, not an even one
        assert pred.memory != predict(*args, pp_layers=[2, 1, 1], writer="parts").memory
    rc, out, err = run_cli(capsys, "plan", cfg_path, "--cluster", cl, "--layout", text)
    assert rc == 0 and "pipeline send buffers" in out and "AdamW moments" in out, err
    assert "of 16.00 per device: fits" in out and "step " in out


@pytest.mark.parametrize(
    "layout, expect",
    [
        ("pp=0", "--layout pp: expected a positive integer, got '0'"),
        ("tp=x", "--layout tp: expected a positive integer, got 'x'"),
        ("sp=maybe", "--layout sp: expected one of 0, 1, false, true, off, on, got 'maybe'"),
        ("recompute=all", "--layout recompute: expected one of none, selective, block, got 'all'"),
        ("act_comm=int8", "--layout act_comm: expected one of fp32, bf16, fp16, got 'int8'"),
        ("send_depth=-1", "--layout send_depth: expected all or a positive integer, got '-1'"),
        ("colour=red", "--layout: unknown key 'colour'"),
        ("pp", "--layout: expected KEY=VALUE pairs"),
        ("pp=2,pp=2", "--layout pp: given twice"),
        ("tp=3", "--layout tp=3: expected a divisor of model.n_head=4"),
        ("sp=1", "--layout sp=1: expected false with tp = 1"),
        ("pp=3", "--layout pp=3: expected a divisor of model.n_layer=4 with virtual=1"),
        (
            "pp=2,schedule=interleaved,virtual=2,micro=3",
            "--layout micro=3: expected a multiple of pp=2 with schedule=interleaved",
        ),
        ("virtual=2", "--layout virtual=2: expected 1 with schedule=1f1b (only interleaved"),
        ("dp=3", "--layout dp=3 does not divide train.batch_size=4"),
        ("precision=fp8", "--layout precision: expected one of fp32, fp64, bf16, fp16, bf16-tc"),
    ],
)
def test_plan_layout_bad_value_is_one_line(tmp_path, capsys, layout, expect):
    rc, _, err = run_cli(
        capsys,
        "plan",
        write_config(tmp_path),
        "--cluster",
        write_cluster(tmp_path),
        "--layout",
        layout,
    )
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("hpc-llm: error: ") and expect in err, err


def test_plan_layout_gpus_and_batch_flags_agree(tmp_path, capsys):
    cfg_path, cl = write_config(tmp_path), write_cluster(tmp_path)
    rc, out, _ = run_cli(
        capsys, "plan", cfg_path, "--cluster", cl, "--layout", "tp=2", "--gpus", "4", "--json"
    )
    assert rc == 0 and json.loads(out)["layout"]["dp"] == 2  # dp from --gpus / (pp tp)
    for extra, expect in (
        (["--gpus", "3"], "--gpus 3: not a multiple of pp x tp = 2"),
        (["--global-batch", "8"], "--global-batch: not used with --layout"),
    ):
        rc, _, err = run_cli(capsys, "plan", cfg_path, "--cluster", cl, "--layout", "tp=2", *extra)
        assert rc == 2 and err.count("\n") == 1 and expect in err, err


# -- pipeline send buffers and messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, p, stage, m, v",
    [
        ("gpipe", 4, 1, 8, 1),
        ("1f1b", 4, 0, 8, 1),
        ("1f1b", 4, 2, 8, 1),
        ("interleaved", 4, 0, 8, 2),
        ("interleaved", 4, 3, 8, 3),
    ],
)
def test_sends_in_flight_are_capped_at_the_depth_per_direction(name, p, stage, m, v):
    """At each op: min(sends made so far in that direction, D), counted from the op list itself (a chunk's forward
    sends unless it is the last virtual stage, its backward unless it is the first); D None: every send so far."""
    from hpc_llm.plan.peak import sends_in_flight

    cfg = tiny(n_layer=12)
    lay = Layout(pp=p, schedule=name, virtual=v, micro_batches=m)
    plan = stage_plan(cfg, lay, stage)
    ops = S.schedule(name, p, stage, m, v)
    last = p * v - 1
    for depth in (1, 2, 3, None):
        walk = list(sends_in_flight(ops, plan, depth))
        for k, (fwd, bwd) in enumerate(walk):
            made_f = sum(
                1 for op in ops[:k] if op.kind == S.Phase.FORWARD and plan.chunks[op.chunk] != last
            )
            made_b = sum(
                1 for op in ops[:k] if op.kind == S.Phase.BACKWARD and plan.chunks[op.chunk] != 0
            )
            cap = made_f if depth is None else min(made_f, depth)
            assert (fwd, bwd) == (cap, made_b if depth is None else min(made_b, depth))
        most = max(f + b for f, b in walk)
        if depth is not None:
            assert max(max(f, b) for f, b in walk) <= depth
            assert most <= 2 * depth
    # the cap binds: unbounded, some op sees more than one send in flight
    assert max(sum(x) for x in sends_in_flight(ops, plan, None)) > 2


def test_pipeline_buffers_follow_the_codes_send_depth(monkeypatch):
    """The pipeline term holds at most D messages per direction, D = schedule_timing.send_depth(name, p, m, v) (a
    stand-in here where the code does not have it yet), every send of the step where the code has none (send_depth=0
    asks for that); a message is (b, T, C) in the compute dtype, (b, T/tp, C) with sequence parallelism, and with 16-bit
    transfers n + SCALE_WORDS uint16 words."""
    from hpc_llm.parallel.compression import SCALE_WORDS
    from hpc_llm.plan.peak import message_bytes

    cfg = tiny(n_layer=8, block_size=64)
    by = Bytes.of(4)
    lay = Layout(pp=4, tp=2, schedule="1f1b", micro_batches=16, batch_size=2)
    n = 2 * 64 * 32
    assert message_bytes(cfg, lay, by) == 4 * n
    assert message_bytes(cfg, dataclasses.replace(lay, sequence_parallel=True), by) == 4 * n // 2
    sp16 = dataclasses.replace(lay, sequence_parallel=True, act_comm="bf16")
    assert message_bytes(cfg, sp16, by) == 2 * (n // 2 + SCALE_WORDS)

    def buffers(layout, stage=1):
        return rank_memory(cfg, layout, stage, by).pipeline_buffers

    every = buffers(dataclasses.replace(lay, send_depth=0))
    assert every > 4 * 4 * n  # 1F1B's middle stage: more than 2 sends per direction held to the end
    for depth in (1, 2):
        held = buffers(dataclasses.replace(lay, send_depth=depth))
        assert 0 < held <= 2 * depth * 4 * n < every
    calls = []

    def stand_in(name, p, m, v=1):  # the layout's own depth is asked of schedule_timing.send_depth
        calls.append((name, p, m, v))
        return 2

    monkeypatch.setattr(T, "send_depth", stand_in)
    assert buffers(lay) == buffers(dataclasses.replace(lay, send_depth=2))
    assert ("1f1b", 4, 16, 1) in calls
    monkeypatch.undo()
    assert buffers(lay) == buffers(dataclasses.replace(lay, send_depth=T.send_depth("1f1b", 4, 16)))


# -- Megatron's published layouts (docs/planning.md, "Megatron's published layouts") -----------------------------

PUBLISHED = {  # inputs/megatron_<row>.toml: the layout of Korthikanti et al. 2022's row
    "22b": "pp=1,tp=8,dp=1,schedule=1f1b,virtual=1,micro=1,mbs=4",
    "175b": "pp=8,tp=8,dp=1,schedule=interleaved,virtual=3,micro=64,mbs=1",
    "530b": "pp=35,tp=8,dp=1,schedule=interleaved,virtual=3,micro=280,mbs=1",
    "1t": "pp=64,tp=8,dp=1,schedule=1f1b,virtual=1,micro=512,mbs=1",
}
MODES = {  # cumulative, bf16 precision; send_depth=1 is schedule_timing.send_depth's D at these four layouts
    "today": "recompute=block,sp=0,act_comm=fp32,send_depth=all",
    "bounded": "recompute=block,sp=0,act_comm=fp32,send_depth=1",
    "16-bit": "recompute=block,sp=0,act_comm=bf16,send_depth=1",
    "sp": "recompute=block,sp=1,act_comm=bf16,send_depth=1",
    "selective": "recompute=selective,sp=1,act_comm=bf16,send_depth=1",
    "no recompute": "recompute=none,sp=1,act_comm=bf16,send_depth=1",
}
# the doc's table: peak GB per GPU (the largest stage, A100 80 GB file) under each mode
DOC_PEAK_GB = {
    "22b": (63.6, 63.6, 63.6, 53.9, 63.3, 65.7),
    "175b": (98.5, 66.5, 66.4, 54.5, 66.9, 70.0),
    "530b": (318.9, 67.4, 67.4, 43.5, 66.6, 72.4),
    "1t": (267.2, 74.4, 74.5, 47.0, 73.5, 80.2),
}


def test_published_rows_fit_80gb_as_the_doc_claims():
    """docs/planning.md's table of Megatron's published rows: each figure (GB, one decimal) and whether it fits
    80 GB is what the planner gives for that row at its published layout under that mode, from the files and
    --layout values the doc's commands name."""
    from hpc_llm.plan.given import given_layout
    from hpc_llm.plan.predict import memory_of

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    cl = KF.load_cluster(root / "inputs/clusters/a100_dgx_ib200.toml")
    assert cl.memory_bytes == 80e9
    for row, layout in PUBLISHED.items():
        cfg = load_config(str(root / f"inputs/megatron_{row}.toml"))
        own, _ = given_layout(
            cfg, ""
        )  # the config's own layout is the published one, every mode on
        for (mode, extra), doc in zip(MODES.items(), DOC_PEAK_GB[row]):
            lay, prec = given_layout(cfg, f"{layout},precision=bf16,{extra}")
            if mode == "selective":
                assert dataclasses.replace(own, send_depth=1) == lay and prec == "bf16"
            peak = memory_of(cfg.model, lay, cl, prec)[1].peak
            assert round(peak / 1e9, 1) == doc, (row, mode, peak)
            assert (peak <= 80e9) == (doc <= 80.0), (row, mode)
            if hasattr(S, "send_depth") and lay.pp > 1:  # the D the doc uses is the code's
                assert T.send_depth(lay.schedule, lay.pp, lay.micro_batches, lay.virtual) == 1


@pytest.mark.parametrize(
    "tp, sp, recompute",
    [
        (1, False, "none"),
        (8, False, "none"),
        (8, True, "none"),
        (4, True, "selective"),
        (8, True, "selective"),
    ],
)
def test_per_layer_forms_beside_korthikanti_are_the_planners(tp, sp, recompute):
    """docs/planning.md's per-layer forms (dropout on, masks 1 byte): bf16 keeping 10n + 32n/t + 8sb + 3abS/t, fp32
    18n + 64n/t + 8sb + 5abS/t (n = sbh; with sequence parallelism the first and third terms / t; selective: no abS
    term, and GELU's tanh, 8n/t in bf16 and 16n/t in fp32, not kept) are block_cache_bytes exactly, at 175B's layer
    (s 2048, h 12288, a 96: 16 query blocks) and a 3-block one."""
    from hpc_llm.plan.activations import attention_scores, block_cache_bytes

    for s, h, a, b in ((2048, 12288, 96, 1), (320, 64, 8, 3)):
        n, S, r = s * b * h, attention_scores(s), (1 / tp if sp else 1)
        keeps = recompute != "selective"  # the probabilities, their masks and GELU's tanh
        bf16 = 10 * n * r + (24 + keeps * 8) * n / tp + 8 * s * b * r + keeps * 3 * a * b * S / tp
        fp32 = 18 * n * r + (48 + keeps * 16) * n / tp + 8 * s * b * r + keeps * 5 * a * b * S / tp
        for act, form in ((2, bf16), (4, fp32)):
            got = block_cache_bytes(b, s, h, a, tp, True, act, 4, sp, recompute)
            assert got == pytest.approx(form, rel=1e-12), (s, act)
    assert attention_scores(2048) == 17 * 2048**2 // 32


# -- the time of the new modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("act_comm", [None, "bfloat16"])
def test_tensor_parallel_collectives_per_block(act_comm):
    """TP communication per block, as the code calls it: without sequence parallelism 2 allreduces of the (b, T, C)
    activation forward and 2 backward; with it 2 all-gathers + 2 reduce-scatters forward and 4 all-gathers + 2
    reduce-scatters backward (S = the whole buffer), plus the LayerNorms' partial gradients (4C) allreduced; 16-bit
    transfers: the activations' S in 2 bytes (the gradients' allreduce stays 4)."""
    from hpc_llm.plan import compute as P
    from hpc_llm.plan.pricer import Pricer

    b, T, C, H, tp = 2, 64, 32, 4, 4
    link = CL.link("intra")
    n, it = b * T * C, 2 if act_comm else 4
    a, bw = link.latency_s, link.bw

    def priced(sp):
        return Pricer(CL, "float32", 4, tp, link, sp=sp, comm_low=act_comm)

    ar, ag, rs = (f(n * it, tp, a, bw) for f in (K.allreduce, K.allgather, K.reduce_scatter))
    assert P.block_forward(priced(False), b, T, C, H).tp == pytest.approx(2 * ar)
    assert P.block_backward(priced(False), b, T, C, H, False, ln_params=2 * C).tp == pytest.approx(
        2 * ar
    )
    assert P.block_forward(priced(True), b, T, C, H).tp == pytest.approx(2 * ag + 2 * rs)
    partials = K.allreduce(4 * C * 4, tp, a, bw)
    back = P.block_backward(priced(True), b, T, C, H, False, ln_params=2 * C).tp
    assert back == pytest.approx(4 * ag + 2 * rs + partials)


def test_selective_recompute_prices_each_query_blocks_probabilities_again():
    """recompute "selective": backward runs each query block's q k^T, softmax and rounding again (not x v) and uses
    no kept probabilities, and GELU's tanh again from its input; forward keeps neither. In fp32 (no conversions):
    backward's extra compute is exactly the blocks' q k^T GEMMs, 9 accesses per score and the exps, and gelu_tanh's
    5 passes (9 accesses per element) over each L2 chunk of the 4bTC GELU input and its tanhs; the step is longer,
    by less than "block"'s."""
    from hpc_llm.plan import compute as P
    from hpc_llm.plan import pricer

    b, T, C, H = 2, 300, 64, 4  # 3 query blocks
    p = pricer.Pricer(CL, "float32", 4, 1, None)
    extra = pricer.Cost()
    for q0, q1 in query_blocks(T):
        s = b * H * (q1 - q0) * q1
        extra += p.gemm(q1 - q0, q1, C // H, b * H) + p.ew(9 * s, s, 6) + p.exp(s)
    hidden = 4 * b * T * C
    chunks = -(-hidden // ELEMENTWISE_CHUNK)
    extra += p.ew(9 * hidden, min(hidden, ELEMENTWISE_CHUNK), 5 * chunks) + p.exp(hidden)
    none, sel = (P.block_backward(p, b, T, C, H, False, sel) for sel in (False, True))
    assert sel.compute - none.compute == pytest.approx(extra.compute)
    assert P.block_forward(p, b, T, C, H, True).compute == pytest.approx(
        P.block_forward(p, b, T, C, H).compute
    )
    cfg = tiny(n_layer=2, n_embd=64, block_size=300)
    steps = [
        predict(cfg, Layout(batch_size=2, recompute=rc), CL).time["step"]
        for rc in ("none", "selective", "block")
    ]
    assert steps[0] < steps[1] < steps[2]


def test_pipeline_transfer_of_16_bit_words_with_sequence_parallelism():
    """A pipeline message costs p2p of its bytes: (b, T/tp, C) with sequence parallelism, n + 2 16-bit words with
    16-bit transfers, plus their conversion there and back; fewer bytes give a shorter wait for the same compute."""
    from hpc_llm.plan.peak import message_bytes
    from hpc_llm.plan.predict import _transfer_time

    cfg = tiny(n_layer=4, n_embd=64, block_size=64)
    lay = Layout(pp=2, tp=2, micro_batches=4, batch_size=2)
    link, by = CL.link("intra"), Bytes.of(4)
    n = 2 * 64 * 64
    assert _transfer_time(cfg, lay, CL, by, link, 1.0) == pytest.approx(K.p2p(4 * n, 2e-6, 5e9))
    sp16 = dataclasses.replace(lay, sequence_parallel=True, act_comm="bf16")
    casts = CL.cast_time("bfloat16", True, n // 2) + CL.cast_time("bfloat16", False, n // 2)
    assert message_bytes(cfg, sp16, by) == 2 * (n // 2 + 2)
    assert _transfer_time(cfg, sp16, CL, by, link, 1.0) == pytest.approx(
        K.p2p(2 * (n // 2 + 2), 2e-6, 5e9) + casts
    )


def test_the_save_terms_of_each_writer(tmp_path):
    """A save of params + Adam m, v (3 x 4 bytes a parameter in fp32) on 8 ranks, 4 a node: gather writes the file
    at one writer's bandwidth after moving 7/8 of it to rank 0; parts writes each node's share at that bandwidth (2
    nodes: half the file's time) and moves nothing; in the background only the staging copy (a memory pass over a
    rank's eighth) is the stall; amortised over the interval."""
    cl = KF.load_cluster(write_cluster(tmp_path))
    lay = Layout(dp=8)
    n = sum(math.prod(s.shape) for s in specs_of(tiny(), 1, stage_plan(tiny(), Layout(), 0)))
    file_bytes = 12 * n
    gather = save_terms(tiny(), lay, cl, "fp32", "gather", False)
    parts = save_terms(tiny(), lay, cl, "fp32", "parts", False)
    background = save_terms(tiny(), lay, cl, "fp32", "parts", True)
    world = cl.link("intra" if lay.ranks <= cl.devices else "inter")
    assert gather["save_s"] == pytest.approx(
        file_bytes / cl.write_bw + file_bytes * 7 / 8 / world.bw
    )
    assert parts["save_s"] == parts["stall_s"] == pytest.approx(file_bytes / 2 / cl.write_bw)
    assert background["save_s"] == parts["save_s"]
    share = file_bytes / 8 / 4
    assert background["stall_s"] == pytest.approx(cl.pass_time(2 * share, 4, share))
    by = PRECISIONS["fp32"][1]
    args = (tiny(), lay, cl, by, world)
    assert _checkpoint_time(*args, 10, "parts") == pytest.approx(parts["save_s"] / 10)
    assert _checkpoint_time(*args, 0, "parts", True) == 0.0
    # mpio: each node's writers at the storage bandwidth, each rank first receiving its datasets' pieces
    mpio = save_terms(tiny(), lay, cl, "fp32", "mpio", False)
    assert (
        mpio["save_s"]
        == mpio["stall_s"]
        == pytest.approx(file_bytes / 2 / cl.write_bw + file_bytes * 7 / 8 / 8 / world.bw)
    )


@pytest.mark.parametrize(
    "layout, staging",
    [
        # one process: the whole checkpoint (params, m, v: 3 x 4 bytes a parameter)
        ("dp=1", lambda n, owned, dealt: 12 * n),
        # ZeRO-1: its own moments, and the parameters dealt to it
        ("dp=2,zero=1", lambda n, owned, dealt: 8 * owned + 4 * dealt),
        # ZeRO-3: its own pieces of everything
        ("dp=2,zero=3", lambda n, owned, dealt: 12 * owned),
    ],
)
def test_plan_prices_the_configs_writer_and_background_saves(tmp_path, capsys, layout, staging):
    """`hpc-llm plan --layout` with the config's checkpoint.writer and async_save: the save term is the writer's
    (gather through one writer, parts a node's share, in the background only the staging copy), and background
    saves add the host staging buffer (the pieces a rank writes, kept between saves) to the memory, exactly."""
    cl = write_cluster(tmp_path)
    base = write_config(tmp_path)
    runs = {}
    for name, section in (
        ("gather", 'writer = "gather"'),
        ("parts", 'writer = "parts"'),
        ("async", 'writer = "auto"\nasync_save = true'),
    ):
        path = tmp_path / f"{name}.toml"
        path.write_text(open(base).read() + f"[checkpoint]\ninterval = 10\n{section}\n")
        rc, out, err = run_cli(
            capsys, "plan", str(path), "--cluster", cl, "--layout", layout, "--json"
        )
        assert rc == 0, err
        runs[name] = json.loads(out)
    ckpt = {k: r["time_s"]["checkpoint"] for k, r in runs.items()}
    lay = Layout(**runs["async"]["layout"])
    want = {
        k: _checkpoint_time(
            tiny(), lay, KF.load_cluster(cl), PRECISIONS["fp32"][1], CL.link("intra"), 10, w, a
        )
        for k, w, a in (
            ("gather", "gather", False),
            ("parts", "parts", False),
            ("async", "parts", True),
        )
    }
    assert ckpt == pytest.approx(want) and ckpt["async"] < ckpt["parts"] <= ckpt["gather"]
    mem = {k: r["memory_bytes"] for k, r in runs.items()}
    specs = specs_of(tiny(), 1, stage_plan(tiny(), lay, 0))
    n = sum(s.size for s in specs)
    owned = sum(b - a for a, b in stage_sync(specs, lay, 0, PRECISIONS["fp32"][1]).owned)
    # the parameters dealt over the replicas with m and v by size, largest first: data-parallel rank 0's
    dealt = sum(
        s.size
        for s, d in zip(specs, deal([math.prod(s.shape) for s in specs] * 3, lay.dp))
        if d == 0
    )
    assert mem["parts"]["checkpoint_scratch"] == mem["gather"]["checkpoint_scratch"] == 0
    assert mem["async"]["checkpoint_scratch"] == staging(n, owned, dealt) > 0
    assert mem["async"]["peak"] - mem["parts"]["peak"] == staging(n, owned, dealt)
