"""One layout's predicted step: memory and time, broken down.

A step, as train_step runs it: the rank's schedule op list (forward/backward per micro-batch and chunk, with their
tensor-parallel allreduces inside, activations between stages by point-to-point), timed by simulate.py; then the
tied embedding's allreduce (pp > 1), the data-parallel reduction (buckets launched during each chunk's last
backward as their gradients become final, nonblocking: the part that runs while backward still computes is hidden;
the buckets that become final only when backward ends take the blocking collective), the loss and norm scalars, the
gradient norm, AdamW on the owned elements and ZeRO-1's allgather; and a checkpoint's write amortised over
checkpoint.interval. The slowest stage sets the step. The search over every layout is search.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from hpc_llm.checkpoint.trainer_state import auto_writer
from hpc_llm.config import ModelConfig
from hpc_llm.model.layout import flops_per_token
from hpc_llm.parallel.schedule import SPLIT, V_SHAPED, Phase, virtual_stage
from hpc_llm.parallel.schedule_timing import Timing
from hpc_llm.plan.cluster import Cluster, Link
from hpc_llm.plan.compute import (
    chunk_costs,
    norm_time,
    optimizer_time,
    refresh_time,
)
from hpc_llm.plan.grad_comm import SIXTEEN, powersgd_seconds, sixteen_bit_casts, wire_bytes
from hpc_llm.plan.layer_calls import in_layers
from hpc_llm.plan.memory import (
    Bytes,
    Layout,
    max_rank_memory,
    specs_of,
    stage_plan,
    stage_sync,
)
from hpc_llm.plan.peak import message_bytes, message_elems
from hpc_llm.plan.pricer import Pricer
from hpc_llm.plan.sharding import zero_pass_seconds
from hpc_llm.plan.simulate import simulate_costs

# precision -> (the matmuls' dtype, bytes). bf16/fp16 as model/precision.py does them: operands rounded to the format,
# activations kept in 2 bytes, a float32 compute copy of the weights, products in float32 where no 16-bit GEMM runs
# them; where one does, Pricer.gemm / linear price them at the format's rate (bf16's large products on a CPU with
# oneDNN's bf16 GEMM, the blocks' linears and the tied head on a device: gemm16) and bytes_of counts what that path
# keeps. "bf16-tc": every GEMM at the bfloat16 rate (planned, not in the code); on a device it differs from "bf16"
# only by the unfused attention's products, which bf16 runs in float32.
PRECISIONS = {
    "fp32": ("float32", Bytes.of(4)),
    "fp64": ("float64", Bytes.of(8)),
    "bf16": ("float32", Bytes(param=4, grad=4, moment=4, act=2, master=4, compute=4)),
    "fp16": ("float32", Bytes(param=4, grad=4, moment=4, act=2, master=4, compute=4)),
    "bf16-tc": ("bfloat16", Bytes(param=4, grad=4, moment=4, act=2, master=4, compute=4)),
}
# the 2-byte format each converts to (train.precision, and parallel.act_comm's 16-bit transfers)
LOW = {"bf16": "bfloat16", "fp16": "float16", "bf16-tc": "bfloat16"}


def bytes_of(precision: str, cl: Cluster, lay: Layout) -> Bytes:
    """PRECISIONS' bytes as the code allocates them on cl: on a device (CuPy) the device path's caches, and the 16-bit
    formats' compute copy stored in 2 bytes (float32 only under ZeRO-3: model/gpt.compute_16_bit); with bf16 on a CPU
    whose products run on oneDNN (Cluster.reads_bf16) the compute copy's bf16 bits beside it (not under ZeRO-3:
    model/gpt.py's compute_bits) and the output gradients W keeps in bf16 (tensor_parallel._operands)."""
    by = PRECISIONS[precision][1]
    if cl.backend != "cupy":
        if precision == "bf16" and cl.reads_bf16:
            return replace(by, master_bits=2 if lay.zero < 3 else 0, weight_dy=2)
        return by
    if by.master == 4 and by.param == 4 and lay.zero < 3:
        return replace(by, master=2, master_wide=4, device=True)
    return replace(by, device=True)


def precision_of(dtype: str) -> str:
    return {"float32": "fp32", "float64": "fp64"}[dtype]


@dataclass
class Prediction:
    layout: Layout
    precision: str
    memory: dict  # the largest stage's RankMemory.breakdown()
    memory_stage: int
    time: dict  # seconds: step and its parts, on the slowest stage
    tokens_per_s: float
    mfu: float
    bubble: float
    timing: Timing | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {
            "layout": asdict(self.layout),
            "precision": self.precision,
            "memory_bytes": self.memory,
            "memory_stage": self.memory_stage,
            "time_s": self.time,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "bubble": self.bubble,
        }


def _levels(cl: Cluster, lay: Layout, share: float = 1.0) -> dict:
    """Which link each group uses: ranks are packed per node, tp fastest, then dp, then pp (grid.py); `share` ranks
    per device fit that many more ranks on a node."""
    per_node = cl.devices * share

    def level(span: int) -> str:
        return "intra" if span <= per_node else "inter"

    return {"tp": level(lay.tp), "dp": level(lay.dp * lay.tp), "pp": level(lay.ranks)}


def _link(cl: Cluster, level: str, share: float) -> Link:
    """The link as one rank sees it when `share` ranks share a device: they share its cores (on a CPU the MPI
    library's copies and polling are the rank's own cycles) or its link, so a collective takes `share` times as
    long, as compute does (validation: 4 ranks on 2 cores take twice the 2-rank step, communication included)."""
    link = cl.link(level)
    if share == 1:
        return link
    return link.slowed(share)


def memory_of(
    cfg: ModelConfig,
    lay: Layout,
    cl: Cluster,
    precision: str,
    pp_layers=(),
    writer: str = "gather",
    checkpoint_memory: bool = True,
    async_save: bool = False,
    teacher: ModelConfig | None = None,
):
    """-> (stage, RankMemory) of the stage with the largest peak: what predict reports, without the time."""
    return max_rank_memory(
        cfg,
        lay,
        bytes_of(precision, cl, lay),
        pp_layers=pp_layers,
        runtime=int(cl.runtime_bytes),
        writer=writer,
        save_on_device=checkpoint_memory and cl.backend == "numpy",
        async_save=async_save,
        teacher=teacher,
    )


def resolve_precision(cfg: ModelConfig, precision: str | None) -> str:
    precision = precision or precision_of(cfg.dtype)
    # train.precision "fp32" means the model's dtype throughout
    if precision == "fp32" and cfg.dtype == "float64":
        precision = "fp64"
    return precision


def _group_links(cl: Cluster, lay: Layout, share: float) -> dict:
    """The link of each parallel group (tp, dp, pp, and the world's: "world"); None for a group of one rank."""
    lv = _levels(cl, lay, share)
    links = {
        g: (_link(cl, lv[g], share) if n > 1 else None)
        for g, n in (("tp", lay.tp), ("dp", lay.dp), ("pp", lay.pp))
    }
    links["world"] = _link(cl, lv["pp"], share) if lay.ranks > 1 else None
    return links


def _virtual_costs(cfg: ModelConfig, lay: Layout, pr: Pricer, layers) -> list[dict]:
    """chunk_costs of each virtual stage; the middle ones are alike, so each kind of chunk is priced once."""
    S = lay.pp * lay.virtual
    same = {}
    for v in range(S):
        key = (len(layers[v]), v == 0, v == S - 1)
        if key not in same:
            same[key] = chunk_costs(cfg, pr, lay.rows, key[0], key[1], key[2], lay.recompute)
    return [same[(len(layers[v]), v == 0, v == S - 1)] for v in range(S)]


def _checkpoint_time(
    cfg: ModelConfig,
    lay: Layout,
    cl: Cluster,
    by: Bytes,
    world: Link | None,
    interval: int,
    writer: str = "gather",
    background: bool = False,
) -> float:
    """A save's cost to training amortised over the checkpoint interval; 0 without saves. gather: the whole file
    through one writer's bandwidth after (1 - 1/ranks) of it crossed the network to world rank 0; mpio: the
    datasets dealt over the ranks, each node's writers into the shared file at one writer's bandwidth (its link
    to the storage), each rank first receiving its datasets' pieces (about (1 - 1/ranks) of its share, all ranks at
    once); parts: every rank its share, a node's ranks together at one writer's bandwidth, nothing over the
    network; in the background (checkpoint.async_save) only the copy of each rank's share into its host buffer, a
    pass at memory bandwidth (a GPU's copy crosses PCIe, slower: not priced), if the write ends within the
    interval."""
    if not interval:
        return 0.0
    n_total = sum(math.prod(s.shape) for s in specs_of(cfg, 1, stage_plan(cfg, Layout(), 0)))
    file_bytes = 3 * n_total * by.param  # params + Adam m and v, full tensors
    # gathered to one writer: each rank's share a message
    share_bytes = file_bytes / lay.ranks
    moved = file_bytes * (1 - 1 / lay.ranks) / world.bw_at(share_bytes) if lay.ranks > 1 else 0.0
    if writer == "gather":
        return (file_bytes / cl.write_bw + moved) / interval
    write = file_bytes / math.ceil(lay.ranks / cl.devices) / cl.write_bw
    if writer == "mpio":
        return (write + moved / lay.ranks) / interval
    if not background:
        return write / interval
    share = file_bytes / lay.ranks
    return cl.pass_time(2 * share / by.param, by.param, share / by.param) / interval


def plan_saves(cfg, ranks: int) -> dict:
    """predict's checkpoint arguments from a Config: its writer ("auto" resolved for ``ranks``, as the trainer
    does) and whether it saves in the background."""
    c = cfg.checkpoint
    return {"writer": auto_writer(c.writer, ranks, c.async_save), "async_save": c.async_save}


def save_terms(
    cfg: ModelConfig, lay: Layout, cl: Cluster, precision: str, writer: str, background: bool
) -> dict:
    """A save's time per writer, beside its cost to training (the stall: the whole save, or in the background
    the staging copy), in seconds: what docs/performance.md tabulates."""
    by = PRECISIONS[resolve_precision(cfg, precision)][1]
    world = _group_links(cl, lay, 1.0)["world"]
    return {
        "save_s": _checkpoint_time(cfg, lay, cl, by, world, 1, writer),
        "stall_s": _checkpoint_time(cfg, lay, cl, by, world, 1, writer, background),
    }


def _step_times(
    lay: Layout, timing: Timing, costs, events, tail: dict, crit: int, scalars, post, ckpt
) -> dict:
    """The step of the slowest stage ``crit`` and its parts, in seconds."""
    busy = timing.busy[crit]
    split, vee = lay.schedule in SPLIT, lay.schedule in V_SHAPED
    tp_time = sum(
        costs[virtual_stage(lay.pp, crit, e.op.chunk, vee)][cost_key(e.op.kind, False, split)].tp
        for e in events[crit]
    )
    return {
        "step": tail["sync_at"] + scalars + post + ckpt,
        "compute": busy - tp_time,
        "tp_comm": tp_time,
        "pipeline_wait": tail["end"] - busy,
        "emb_allreduce": tail["emb"],
        "dp_exposed": tail["dp_exposed"],
        "dp_hidden": tail["dp_hidden"],
        "scalars": scalars,
        "optimizer": tail["optimizer"],
        "zero_gather": tail["zero_gather"],
        "checkpoint": ckpt,
    }


def _events_by_rank(timing: Timing, pp: int) -> list[list]:
    """Each rank's events, in its order (one pass over them, not one per rank)."""
    events = [[] for _ in range(pp)]
    for e in timing.events:
        events[e.rank].append(e)
    return events


def _transfer_time(
    cfg: ModelConfig, lay: Layout, cl: Cluster, by: Bytes, link: Link | None, share: float
) -> float:
    """One pipeline message between neighbours: point to point of (b, T, C) (or the (b, T/tp, C) slice with sequence
    parallelism) in the compute dtype, or as 16-bit words, rounded by the sender and widened by the receiver."""
    if lay.pp == 1:
        return 0.0
    elems = message_elems(cfg, lay)
    nbytes = message_bytes(cfg, lay, by)
    t = link.seconds("p2p", nbytes, 2)
    if lay.comm16:
        fmt = LOW[lay.act_comm]
        t += share * (cl.cast_time(fmt, True, elems) + cl.cast_time(fmt, False, elems))
    return t


def predict(
    cfg: ModelConfig,
    lay: Layout,
    cl: Cluster,
    precision: str | None = None,
    share: float = 1.0,
    checkpoint_interval: int = 0,
    max_iters: int = 0,
    pp_layers=(),
    writer: str = "gather",
    checkpoint_memory: bool = True,
    memory=None,
    async_save: bool = False,
    teacher: ModelConfig | None = None,
) -> Prediction:
    """checkpoint_memory: count the save's scratch and assembly against the device (they are host arrays: on a
    CuPy cluster they never are; False also for planning training alone). memory: memory_of(...) if already
    known (the search computes it first, to skip the layouts that do not fit). teacher: train.teacher's model
    (its block_size and dtype the student's): its weights on the last stage, and its whole forward added to each
    forward of the last virtual stage (train/teacher.py)."""
    precision = resolve_precision(cfg, precision)
    gdtype, by = PRECISIONS[precision]
    links = _group_links(cl, lay, share)
    pr = Pricer(
        cl,
        gdtype,
        by.compute,
        lay.tp,
        links["tp"],
        share,
        low=LOW.get(precision),
        sp=lay.sequence_parallel,
        comm_low=LOW.get(lay.act_comm),
        zero3=lay.zero >= 3,
    )
    T = cfg.block_size
    plans = [stage_plan(cfg, lay, s, pp_layers) for s in range(lay.pp)]
    # the layers' calls at what a Block pays for them (plan/layer_calls.py); the optimizer's at call_s
    layers_pr = in_layers(pr)
    costs = _virtual_costs(cfg, lay, layers_pr, plans[0].layers)
    if teacher is not None:
        taught = chunk_costs(teacher, layers_pr, lay.rows, teacher.n_layer, True, True)["F"]
        costs[-1] = {**costs[-1], "F": costs[-1]["F"] + taught}
    t_comm = _transfer_time(cfg, lay, cl, by, links["pp"], share)

    split = lay.schedule in SPLIT
    # ZeRO-2/3's exposed gathers and reductions, per pass of each virtual stage's chunk (plan/sharding.py; the
    # zero-bubble schedules, which split the backward, run without them)
    zero = {
        (v, kind, later): zero_pass_seconds(
            specs_of(cfg, lay.tp, plans[plans[0].rank_of(v)]),
            plans[plans[0].rank_of(v)],
            lay,
            by,
            links["dp"],
            costs[v],
            v,
            kind == Phase.BACKWARD,
            later,
        )
        for v in range(len(costs))
        for kind in (Phase.FORWARD, Phase.BACKWARD)
        for later in (False, True)
    }

    def cost(kind, v, later):
        return costs[v][cost_key(kind, later, split)].total + zero.get((v, kind, later), 0.0)

    timing = simulate_costs(lay.schedule, lay.pp, lay.micro_batches, lay.virtual, cost, t_comm)
    events = _events_by_rank(timing, lay.pp)
    tails = [
        _stage_tail(cfg, lay, pr, by, s, plans[s], costs, events[s], links) for s in range(lay.pp)
    ]
    crit = max(range(lay.pp), key=lambda s: tails[s]["sync_at"])
    scalars = 0.0
    if lay.ranks > 1:  # the loss and the norm: world / model-parallel scalar allreduces
        scalars = 2 * links["world"].seconds("allreduce", 8, lay.ranks)
    post = max(t["optimizer"] + t["zero_gather"] for t in tails)
    ckpt = _checkpoint_time(
        cfg, lay, cl, by, links["world"], checkpoint_interval or max_iters, writer, async_save
    )
    t = _step_times(lay, timing, costs, events, tails[crit], crit, scalars, post, ckpt)
    tokens = lay.batch_size * lay.micro_batches * T
    devices = lay.ranks / share
    peak = max(r for _, r in cl.gemm[gdtype])
    mem_stage, mem = memory or memory_of(
        cfg, lay, cl, precision, pp_layers, writer, checkpoint_memory, async_save, teacher
    )
    return Prediction(
        lay,
        precision,
        mem.breakdown(),
        mem_stage,
        t,
        tokens / t["step"],
        flops_per_token(cfg) * tokens / t["step"] / (devices * peak),
        timing.bubble,
        timing,
    )


def cost_key(kind: Phase, later: bool, split: bool) -> str:
    """chunk_costs' key of an op: F, B or B+ (a whole backward, first or accumulating), Bi or Bi+ (B alone where the
    schedule splits backwards, with the head's W), W or W+."""
    if kind == Phase.FORWARD:
        return "F"
    if kind == Phase.WEIGHT:
        return "W+" if later else "W"
    if split:
        return "Bi+" if later else "Bi"
    return "B+" if later else "B"


def _grad_reports(lay: Layout, plan, costs, events, offset: dict) -> list[tuple[float, int]]:
    """(time, offset): the grad_ready calls during each chunk's last backward (or W, where the schedule splits
    backwards), as the stage's events time them."""
    reports = []
    last_b = {}
    kind = Phase.WEIGHT if lay.schedule in SPLIT else Phase.BACKWARD
    for e in events:
        if e.op.kind == kind:
            last_b[e.op.chunk] = e
    # the last backward accumulates unless it is the only one
    acc = "+" if lay.micro_batches > 1 else ""
    part = "_W" if kind == Phase.WEIGHT else "_B"
    for c, e in last_b.items():
        v = plan.chunks[c]
        t = e.start
        if v == plan.n_virtual - 1:
            # split: the head's W ran with its B; backward_weight reports it first
            t += 0.0 if kind == Phase.WEIGHT else costs[v]["head_B" + acc].total
            reports.append((t, offset["ln_f.weight"]))
        for i in reversed(plan.layers[v]):
            t += costs[v]["block" + part + acc].total
            reports.append((t, offset[f"h.{i}.attn.c_attn.weight"]))
    return reports


def _dp_reduction(
    lay: Layout, sync, by: Bytes, link: Link, reports, end: float
) -> tuple[float, float]:
    """(exposed, hidden) seconds of the data-parallel reduction: buckets launched as their gradients become final
    run behind the backwards still to come; the others, and what outlasts the stage's end, are exposed."""
    bg_end, exposed_nb, blocking, hidden = 0.0, 0.0, 0.0, 0.0
    # data_parallel.GradientSync's calls: in flight, and (final_kind) for the buckets final only at the end
    if lay.grad_comm in SIXTEEN:
        kind = final_kind = "ialltoallv" if sync.zero else "allreduce16"
    else:
        kind = "ireduce_scatter" if sync.zero else "iallreduce"
        final_kind = "ireduce_scatter" if sync.zero else "allreduce"
    for a, b_ in sync.buckets:
        nbytes = (b_ - a) * wire_bytes(lay.grad_comm, by.grad)
        ready = [t for t, off in reports if off <= a]
        if ready:
            d = link.seconds(kind, nbytes, lay.dp, nonblocking=True)
            start = max(min(ready), bg_end)
            bg_end = start + link.overlap * d
            exposed_nb += (1 - link.overlap) * d
            hidden += link.overlap * d
        else:
            blocking += link.seconds(final_kind, nbytes, lay.dp, nonblocking=sync.zero)
    late = max(0.0, bg_end - end)
    return late + exposed_nb + blocking, hidden - late


def _stage_tail(cfg, lay, pr, by, s, plan, costs, events, links) -> dict:
    """After the stage's last op (events: its ops, timed): the embedding allreduce, the data-parallel reduction
    (what hides behind the last backwards and what is left), and the optimizer (and with bf16/fp16 the compute
    copy's refresh), for data-parallel rank 0 (the largest ZeRO-1 pieces)."""
    specs = specs_of(cfg, lay.tp, plan)
    n = sum(x.size for x in specs)
    sync = stage_sync(specs, lay, 0, by)
    owned = sum(b - a for a, b in sync.owned)
    end = max((e.end for e in events), default=0.0)
    emb = 0.0
    if lay.pp > 1 and (s == 0 or s == lay.pp - 1) and lay.schedule not in V_SHAPED:
        wte = cfg.padded_vocab // lay.tp * cfg.n_embd * by.grad
        emb = links["pp"].seconds("allreduce", wte, 2)
    dp_exposed = dp_hidden = 0.0
    if lay.dp > 1 and lay.zero < 2:  # ZeRO-2/3 reduce in each pass (plan/sharding.py)
        if lay.grad_comm == "powersgd":
            dp_exposed = powersgd_seconds(
                specs, lay.powersgd_rank, lay.dp, links["dp"], pr, by.grad
            )
        else:
            reports = _grad_reports(lay, plan, costs, events, {x.name: x.offset for x in specs})
            dp_exposed, dp_hidden = _dp_reduction(lay, sync, by, links["dp"], reports, end)
        if lay.grad_comm in SIXTEEN:
            dp_exposed += sixteen_bit_casts(pr, lay.grad_comm, n, lay.zero)
    zero_gather = 0.0
    if lay.zero in (1, 2) and lay.dp > 1:  # ZeRO-3 gathers each unit when it is used
        zero_gather = sum(
            links["dp"].seconds("allgather", (b_ - a) * by.param, lay.dp) for a, b_ in sync.buckets
        )
    # ZeRO-3 refreshes only its pieces' compute copy
    kept = owned if lay.zero >= 3 and lay.dp > 1 else n
    opt = optimizer_time(pr, owned) + norm_time(pr, owned) + refresh_time(pr, kept)
    return {
        "sync_at": end + emb + dp_exposed,
        "end": end,
        "emb": emb,
        "dp_exposed": dp_exposed,
        "dp_hidden": dp_hidden,
        "optimizer": opt,
        "zero_gather": zero_gather,
    }
