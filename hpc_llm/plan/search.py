"""One layout's predicted step (memory and time, broken down), and the search over every layout for N devices.

A step, as train_step runs it: the rank's schedule op list (forward/backward per micro-batch and chunk, with their
tensor-parallel allreduces inside, activations between stages by point-to-point), timed by simulate.py; then the
tied embedding's allreduce (pp > 1), the data-parallel reduction (buckets launched during each chunk's last
backward as their gradients become final, nonblocking: the part that runs while backward still computes is hidden;
the buckets that become final only when backward ends take the blocking collective), the loss and norm scalars, the
gradient norm, AdamW on the owned elements and ZeRO-1's allgather; and a checkpoint's write amortised over
checkpoint.interval. The slowest stage sets the step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.model.gpt import param_specs
from hpc_llm.parallel.schedule import Timing
from hpc_llm.plan import cluster as K
from hpc_llm.plan.compute import Pricer, chunk_costs, norm_time, optimizer_time, refresh_time
from hpc_llm.plan.memory import (
    Bytes,
    Layout,
    bucket_elems,
    grad_sync,
    max_rank_memory,
    specs_of,
    stage_plan,
)
from hpc_llm.plan.simulate import simulate_costs

# precision -> (the matmuls' dtype, bytes). bf16/fp16 as model/precision.py does them: operands rounded to the format
# but stored and multiplied as float32 (NumPy has no bf16 GEMM), activations kept in 2 bytes, a float32 compute copy
# of the weights. "bf16-tc" is what the same scheme would give with tensor-core GEMMs (planned, not in the code).
PRECISIONS = {
    "fp32": ("float32", Bytes.of(4)),
    "fp64": ("float64", Bytes.of(8)),
    "bf16": ("float32", Bytes(param=4, grad=4, moment=4, act=2, master=4, compute=4)),
    "fp16": ("float32", Bytes(param=4, grad=4, moment=4, act=2, master=4, compute=4)),
    "bf16-tc": ("bfloat16", Bytes(param=4, grad=4, moment=4, act=2, master=4, compute=4)),
}
LOW = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "bf16-tc": "bfloat16",
}  # the 2-byte format each converts to


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


def _levels(cl: K.Cluster, lay: Layout, share: float = 1.0) -> dict:
    """Which link each group uses: ranks are packed per node, tp fastest, then dp, then pp (grid.py); `share` ranks
    per device fit that many more ranks on a node."""
    per_node = cl.devices * share

    def level(span: int) -> str:
        return "intra" if span <= per_node else "inter"

    return {"tp": level(lay.tp), "dp": level(lay.dp * lay.tp), "pp": level(lay.ranks)}


def _link(cl: K.Cluster, level: str, share: float) -> K.Link:
    """The link as one rank sees it when `share` ranks share a device: they share its cores (on a CPU the MPI
    library's copies and polling are the rank's own cycles) or its link, so a collective takes `share` times as
    long, as compute does (validation: 4 ranks on 2 cores take twice the 2-rank step, communication included)."""
    link = cl.link(level)
    if share == 1:
        return link
    return K.Link(link.latency_s * share, link.bw / share, link.nb_bw / share, link.overlap)


def memory_of(
    cfg: ModelConfig,
    lay: Layout,
    cl: K.Cluster,
    precision: str,
    pp_layers=(),
    writer: str = "gather",
    checkpoint_memory: bool = True,
):
    """-> (stage, RankMemory) of the stage with the largest peak: what predict reports, without the time."""
    return max_rank_memory(
        cfg,
        lay,
        PRECISIONS[precision][1],
        pp_layers=pp_layers,
        runtime=int(cl.runtime_bytes),
        writer=writer,
        save_on_device=checkpoint_memory and cl.backend == "numpy",
    )


def resolve_precision(cfg: ModelConfig, precision: str | None) -> str:
    precision = precision or precision_of(cfg.dtype)
    if (
        precision == "fp32" and cfg.dtype == "float64"
    ):  # train.precision "fp32" means the model's dtype throughout
        precision = "fp64"
    return precision


def flops_per_token(cfg: ModelConfig) -> float:
    """GPT.flops_per_token: 6N + 12 L T C, N without the position embedding."""
    n = sum(math.prod(s.shape) for s in param_specs(cfg) if s.name != "wpe.weight")
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def predict(
    cfg: ModelConfig,
    lay: Layout,
    cl: K.Cluster,
    precision: str | None = None,
    share: float = 1.0,
    checkpoint_interval: int = 0,
    max_iters: int = 0,
    pp_layers=(),
    writer: str = "gather",
    checkpoint_memory: bool = True,
    memory=None,
) -> Prediction:
    """checkpoint_memory: count the save's scratch and assembly against the device (they are host arrays: on a
    CuPy cluster they never are; False also for planning training alone). memory: memory_of(...) if already
    known (the search computes it first, to skip the layouts that do not fit)."""
    precision = resolve_precision(cfg, precision)
    gdtype, by = PRECISIONS[precision]
    lv = _levels(cl, lay, share)
    links = {
        g: (_link(cl, lv[g], share) if n > 1 else None)
        for g, n in (("tp", lay.tp), ("dp", lay.dp), ("pp", lay.pp))
    }
    pr = Pricer(cl, gdtype, by.compute, lay.tp, links["tp"], share, low=LOW.get(precision))
    b, T, C = lay.rows, cfg.block_size, cfg.n_embd
    S = lay.pp * lay.virtual
    plans = [stage_plan(cfg, lay, s, pp_layers) for s in range(lay.pp)]
    layers = plans[0].layers
    same = {}  # the middle virtual stages are alike: price each kind of chunk once
    for v in range(S):
        key = (len(layers[v]), v == 0, v == S - 1)
        if key not in same:
            same[key] = chunk_costs(cfg, pr, b, key[0], key[1], key[2], lay.recompute)
    costs = [same[(len(layers[v]), v == 0, v == S - 1)] for v in range(S)]
    msg = b * T * C * by.compute
    t_comm = K.p2p(msg, links["pp"].latency_s, links["pp"].bw) if lay.pp > 1 else 0.0

    def cost(kind, v, later):
        return costs[v]["F" if kind == "F" else ("B+" if later else "B")].total

    timing = simulate_costs(lay.schedule, lay.pp, lay.micro_batches, lay.virtual, cost, t_comm)
    events = [
        [] for _ in range(lay.pp)
    ]  # each rank's events, in its order (one pass, not one per rank)
    for e in timing.events:
        events[e.rank].append(e)
    n_total = sum(math.prod(s.shape) for s in specs_of(cfg, 1, stage_plan(cfg, Layout(), 0)))
    per_stage = []
    for s in range(lay.pp):
        per_stage.append(_stage_tail(cfg, lay, pr, by, s, plans[s], costs, events[s], links))
    crit = max(range(lay.pp), key=lambda s: per_stage[s]["sync_at"])
    sync_at = per_stage[crit]["sync_at"]
    scalars = 0.0
    if lay.ranks > 1:  # the loss and the norm: world / model-parallel scalar allreduces
        world_link = _link(cl, lv["pp"], share)
        scalars = 2 * K.allreduce(8, lay.ranks, world_link.latency_s, world_link.bw)
    post = max(per_stage[s]["optimizer"] + per_stage[s]["zero_gather"] for s in range(lay.pp))
    interval = checkpoint_interval or max_iters
    ckpt = 0.0
    if interval:
        file_bytes = 3 * n_total * by.param  # params + Adam m and v, full tensors
        gather = 0.0
        if lay.ranks > 1:
            link = _link(cl, lv["pp"], share)
            gather = file_bytes * (1 - 1 / lay.ranks) / link.bw
        ckpt = (file_bytes / cl.write_bw + gather) / interval
    busy = timing.busy[crit]
    tp_time = sum(
        costs[e.op.chunk * lay.pp + crit]["F" if e.op.kind == "F" else "B"].tp for e in events[crit]
    )
    step = sync_at + scalars + post + ckpt
    t = {
        "step": step,
        "compute": busy - tp_time,
        "tp_comm": tp_time,
        "pipeline_wait": per_stage[crit]["end"] - busy,
        "emb_allreduce": per_stage[crit]["emb"],
        "dp_exposed": per_stage[crit]["dp_exposed"],
        "dp_hidden": per_stage[crit]["dp_hidden"],
        "scalars": scalars,
        "optimizer": per_stage[crit]["optimizer"],
        "zero_gather": per_stage[crit]["zero_gather"],
        "checkpoint": ckpt,
    }
    tokens = lay.batch_size * lay.micro_batches * T
    devices = lay.ranks / share
    peak = max(r for _, r in cl.gemm[gdtype])
    mem_stage, mem = memory or memory_of(
        cfg, lay, cl, precision, pp_layers, writer, checkpoint_memory
    )
    return Prediction(
        lay,
        precision,
        mem.breakdown(),
        mem_stage,
        t,
        tokens / step,
        flops_per_token(cfg) * tokens / step / (devices * peak),
        timing.bubble,
        timing,
    )


def _stage_tail(cfg, lay, pr, by, s, plan, costs, events, links) -> dict:
    """After the stage's last op (events: its ops, timed): the embedding allreduce, the data-parallel reduction
    (what hides behind the last backwards and what is left), and the optimizer (and with bf16/fp16 the compute
    copy's refresh), for data-parallel rank 0 (the largest ZeRO-1 pieces)."""
    specs = specs_of(cfg, lay.tp, plan)
    n = sum(x.size for x in specs)
    sync = grad_sync(n, lay.dp, 0, bucket_elems(lay.bucket_mb, by.grad), lay.zero == 1)
    owned = sum(b - a for a, b in sync.owned)
    end = max((e.end for e in events), default=0.0)
    emb = 0.0
    if lay.pp > 1 and (s == 0 or s == lay.pp - 1):
        wte = cfg.padded_vocab // lay.tp * cfg.n_embd * by.grad
        emb = K.allreduce(wte, 2, links["pp"].latency_s, links["pp"].bw)
    dp_exposed = dp_hidden = 0.0
    if lay.dp > 1:
        link = links["dp"]
        offset = {x.name: x.offset for x in specs}
        reports = []  # (time, offset): grad_ready calls during each chunk's last backward
        last_b = {}
        for e in events:
            if e.op.kind == "B":
                last_b[e.op.chunk] = e
        acc = (
            "+" if lay.micro_batches > 1 else ""
        )  # the last backward accumulates unless it is the only one
        for c, e in last_b.items():
            v = plan.chunks[c]
            t = e.start
            if v == plan.n_virtual - 1:
                t += costs[v]["head_B" + acc].total
                reports.append((t, offset["ln_f.weight"]))
            for i in reversed(plan.layers[v]):
                t += costs[v]["block_B" + acc].total
                reports.append((t, offset[f"h.{i}.attn.c_attn.weight"]))
        bg_end, exposed_nb, blocking, hidden = 0.0, 0.0, 0.0, 0.0
        for a, b_ in sync.buckets:
            nbytes = (b_ - a) * by.grad
            ready = [t for t, off in reports if off <= a]
            if ready:
                coll = K.reduce_scatter if sync.zero else K.allreduce
                d = coll(nbytes, lay.dp, link.latency_s, link.nb_bw)
                start = max(min(ready), bg_end)
                bg_end = start + link.overlap * d
                exposed_nb += (1 - link.overlap) * d
                hidden += link.overlap * d
            else:
                coll = K.reduce_scatter if sync.zero else K.allreduce
                blocking += coll(
                    nbytes, lay.dp, link.latency_s, link.nb_bw if sync.zero else link.bw
                )
        late = max(0.0, bg_end - end)
        dp_exposed = late + exposed_nb + blocking
        dp_hidden = hidden - late
    zero_gather = 0.0
    if lay.zero and lay.dp > 1:
        link = links["dp"]
        zero_gather = sum(
            K.allgather((b_ - a) * by.param, lay.dp, link.latency_s, link.bw)
            for a, b_ in sync.buckets
        )
    opt = optimizer_time(pr, owned) + norm_time(pr, owned) + refresh_time(pr, n)
    return {
        "sync_at": end + emb + dp_exposed,
        "end": end,
        "emb": emb,
        "dp_exposed": dp_exposed,
        "dp_hidden": dp_hidden,
        "optimizer": opt,
        "zero_gather": zero_gather,
    }


# -- the search ----------------------------------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(
    cfg: ModelConfig,
    n_devices: int,
    global_batch: int,
    bucket_mb: float = 25.0,
    recomputes=("none",),
    max_virtual: int = 4,
):
    """Every (layout, reason) for n_devices ranks: reason None when the code accepts it, else the first rule it
    breaks (the same rules config_checks.py and grid.py enforce)."""
    for tp in divisors(n_devices):
        for pp in divisors(n_devices // tp):
            dp = n_devices // (tp * pp)
            base = f"tp={tp} pp={pp} dp={dp}"
            if cfg.n_head % tp:
                yield Layout(pp, dp, tp), f"{base}: tp does not divide model.n_head={cfg.n_head}"
                continue
            if cfg.padded_vocab % tp:
                yield (
                    Layout(pp, dp, tp),
                    f"{base}: tp does not divide the padded vocabulary {cfg.padded_vocab}",
                )
                continue
            if cfg.n_layer % pp:
                yield Layout(pp, dp, tp), f"{base}: pp does not divide model.n_layer={cfg.n_layer}"
                continue
            # micro-batch counts: those whose rows per rank are a power of two, and every count up to 8
            ms = [
                m
                for m in divisors(global_batch)
                if (global_batch // m) % dp == 0
                and (m <= 8 or (global_batch // m // dp) & (global_batch // m // dp - 1) == 0)
            ]
            if not ms:
                yield (
                    Layout(pp, dp, tp),
                    f"{base}: no micro-batch count leaves a batch divisible by dp={dp}",
                )
                continue
            scheds = (
                [("1f1b", 1)]
                if pp == 1
                else [("1f1b", 1), ("gpipe", 1)]
                + [
                    ("interleaved", v)
                    for v in range(2, max_virtual + 1)
                    if cfg.n_layer % (pp * v) == 0
                ]
            )
            for m in ms:
                for name, v in scheds:
                    if name == "interleaved" and m % pp:
                        continue
                    for zero in (0, 1) if dp > 1 else (0,):
                        for rc in recomputes:
                            yield (
                                Layout(
                                    pp, dp, tp, zero, name, v, m, global_batch // m, bucket_mb, rc
                                ),
                                None,
                            )


def search(
    cfg: ModelConfig,
    cl: K.Cluster,
    n_devices: int,
    global_batch: int,
    precisions=None,
    share: float = 1.0,
    checkpoint_interval: int = 0,
    max_iters: int = 0,
    recomputes=("none",),
    bucket_mb: float = 25.0,
    max_micro: int = 4096,
    checkpoint_memory: bool = True,
):
    """-> (feasible predictions sorted by tokens/s, [(layout, reason)] infeasible). Each layout's memory comes
    first: one that does not fit is rejected before its schedule is simulated (memory does not depend on time, so
    the answer is the same as predicting every layout: tests/test_plan.py)."""
    if n_devices < 1:
        raise UserError(f"--gpus: expected a positive integer, got {n_devices}")
    if global_batch < 1:
        raise UserError(f"--global-batch: expected a positive integer, got {global_batch}")
    precisions = precisions or [precision_of(cfg.dtype)]
    ok, bad = [], []
    for lay, reason in layouts(cfg, n_devices, global_batch, bucket_mb, recomputes):
        if reason:
            bad.append((lay, reason))
            continue
        if lay.micro_batches > max_micro:
            continue
        for prec in precisions:
            memory = memory_of(
                cfg, lay, cl, resolve_precision(cfg, prec), checkpoint_memory=checkpoint_memory
            )
            mem, limit = memory[1].breakdown(), cl.memory_bytes
            if mem["peak"] > limit:
                counted = [
                    k
                    for k in mem
                    if k != "peak" and (memory[1].save_on_device or not k.startswith("checkp"))
                ]
                big = max(counted, key=lambda k: mem[k])  # the largest term the peak counts
                bad.append(
                    (
                        lay,
                        f"{describe(lay)} {prec}: memory {mem['peak'] / 1e9:.2f} GB per rank > "
                        f"{limit / 1e9:.2f} GB per device (largest: {big} {mem[big] / 1e9:.2f} GB)",
                    )
                )
                continue
            ok.append(
                predict(
                    cfg,
                    lay,
                    cl,
                    prec,
                    share,
                    checkpoint_interval,
                    max_iters,
                    checkpoint_memory=checkpoint_memory,
                    memory=memory,
                )
            )
    if not ok:
        if not bad:
            raise UserError(
                f"--gpus {n_devices}: no layout (no micro-batch count up to {max_micro} fits "
                f"global batch {global_batch})"
            )
        mem = [r for _, r in bad if "memory" in r]
        if mem:
            tight = min(mem, key=lambda r: float(r.split("memory ")[1].split(" GB")[0]))
            raise UserError(
                f"the model fits on no layout of {n_devices} devices; the closest: {tight}"
            )
        raise UserError(f"--gpus {n_devices} admits no layout: {bad[0][1]}")
    ok.sort(key=lambda p: -p.tokens_per_s)
    return ok, bad


def describe(lay: Layout) -> str:
    s = f"pp{lay.pp} dp{lay.dp} tp{lay.tp}"
    if lay.zero:
        s += " zero1"
    if lay.pp > 1:
        s += f" {lay.schedule}" + (f" v{lay.virtual}" if lay.virtual > 1 else "")
    s += f" m{lay.micro_batches} b{lay.batch_size}"
    if lay.recompute != "none":
        s += f" recompute={lay.recompute}"
    return s


def format_table(preds: list, bad: list, top: int = 20) -> str:
    gb = 1e9
    lines = [
        f"{'layout':42} {'prec':5} {'mem GB':>7} {'act':>6} {'step ms':>9} {'compute':>8} {'tp':>6} "
        f"{'pp wait':>7} "
        f"{'dp exp':>6} {'dp hid':>6} {'opt':>6} {'tokens/s':>10} {'MFU':>6}"
    ]
    for p in preds[:top]:
        t, m = p.time, p.memory
        ms = lambda k: f"{1000 * t[k]:.1f}"  # noqa: E731
        lines.append(
            f"{describe(p.layout):42} {p.precision:5} {m['peak'] / gb:7.2f} {m['activations'] / gb:6.2f} "
            f"{1000 * t['step']:9.1f} {ms('compute'):>8} {ms('tp_comm'):>6} {ms('pipeline_wait'):>7} "
            f"{ms('dp_exposed'):>6} {ms('dp_hidden'):>6} {ms('optimizer'):>6} {p.tokens_per_s:10.0f} "
            f"{100 * p.mfu:5.1f}%"
        )
    if len(preds) > top:
        lines.append(f"... {len(preds) - top} more feasible layouts (--top, --json)")
    if bad:
        lines.append(f"infeasible ({len(bad)}):")
        seen = set()
        for _, reason in bad:
            if reason not in seen:
                seen.add(reason)
                lines.append(f"  {reason}")
            if len(seen) >= top:
                lines.append("  ...")
                break
    return "\n".join(lines)
