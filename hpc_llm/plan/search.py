"""The search over every layout for N devices: which layouts the code accepts (and why not the others), which fit
in memory, and their predicted steps (predict.py), best first; and the table the CLI prints of them."""

from __future__ import annotations

from dataclasses import replace

from hpc_llm.checkpoint.trainer_state import auto_writer
from hpc_llm.config import ModelConfig
from hpc_llm.errors import UserError
from hpc_llm.parallel.schedule import SPLIT
from hpc_llm.plan.cluster import Cluster
from hpc_llm.plan.memory import RECOMPUTES, Layout, RankMemory
from hpc_llm.plan.predict import memory_of, precision_of, predict, resolve_precision


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split_error(cfg: ModelConfig, tp: int, pp: int) -> str | None:
    """Why the model cannot be split tp ways by tensor and pp ways by pipeline, or None."""
    if cfg.n_head % tp:
        return f"tp does not divide model.n_head={cfg.n_head}"
    if cfg.padded_vocab % tp:
        return f"tp does not divide the padded vocabulary {cfg.padded_vocab}"
    if cfg.n_layer % pp:
        return f"pp does not divide model.n_layer={cfg.n_layer}"
    return None


def _micro_counts(global_batch: int, dp: int) -> list[int]:
    """Micro-batch counts: those whose rows per rank are a power of two, and every count up to 8."""
    return [
        m
        for m in divisors(global_batch)
        if (global_batch // m) % dp == 0
        and (m <= 8 or (global_batch // m // dp) & (global_batch // m // dp - 1) == 0)
    ]


def _schedules(cfg: ModelConfig, pp: int, max_virtual: int) -> list[tuple[str, int]]:
    """(schedule, virtual stages per rank) for pp stages."""
    if pp == 1:
        return [("1f1b", 1)]
    interleaved = [
        ("interleaved", v) for v in range(2, max_virtual + 1) if cfg.n_layer % (pp * v) == 0
    ]
    vee = [("zbv", 2)] if cfg.n_layer % (2 * pp) == 0 else []
    return [("1f1b", 1), ("gpipe", 1), ("zb-h1", 1)] + vee + interleaved


def _sp_options(cfg: ModelConfig, tp: int, sequence_parallel) -> tuple:
    """Sequence parallel off and on where the code accepts it (tp > 1, block_size divisible by tp, no LoRA)."""
    valid = tp > 1 and cfg.block_size % tp == 0 and not cfg.lora_rank
    return tuple(x for x in sequence_parallel if valid or not x)


def layouts(
    cfg: ModelConfig,
    n_devices: int,
    global_batch: int,
    bucket_mb: float = 25.0,
    recomputes=("none",),
    max_virtual: int = 4,
    sequence_parallel=(False,),
    act_comm: str = "fp32",
):
    """Every (layout, reason) for n_devices ranks: reason None when the code accepts it, else the first rule it
    breaks (the same rules config/checks.py and grid.py enforce). sequence_parallel: the settings tried where
    valid; act_comm: the transfers' format, the same for every layout."""
    for tp in divisors(n_devices):
        for pp in divisors(n_devices // tp):
            dp = n_devices // (tp * pp)
            base = f"tp={tp} pp={pp} dp={dp}"
            error = _split_error(cfg, tp, pp)
            if error:
                yield Layout(pp, dp, tp), f"{base}: {error}"
                continue
            ms = _micro_counts(global_batch, dp)
            if not ms:
                yield (
                    Layout(pp, dp, tp),
                    f"{base}: no micro-batch count leaves a batch divisible by dp={dp}",
                )
                continue
            for m in ms:
                for name, v in _schedules(cfg, pp, max_virtual):
                    if name == "interleaved" and m % pp:
                        continue
                    # ZeRO-2/3 reduce a part's gradients as its backward ends: not with a split backward
                    zeros = (0, 1) if name in SPLIT else (0, 1, 2, 3)
                    for zero in zeros if dp > 1 else (0,):
                        for sp in _sp_options(cfg, tp, sequence_parallel):
                            for rc in recomputes:
                                lay = Layout(
                                    pp,
                                    dp,
                                    tp,
                                    zero,
                                    name,
                                    v,
                                    m,
                                    global_batch // m,
                                    bucket_mb,
                                    rc,
                                    sp,
                                    act_comm,
                                )
                                yield lay, None


def _too_big(lay: Layout, prec: str, memory: RankMemory, limit: float) -> str | None:
    """Why the layout's peak memory per rank does not fit the device (naming its largest term), or None."""
    mem = memory.breakdown()
    if mem["peak"] <= limit:
        return None
    counted = [
        k for k in mem if k != "peak" and (memory.save_on_device or not k.startswith("checkp"))
    ]
    big = max(counted, key=lambda k: mem[k])  # the largest term the peak counts
    return (
        f"{describe(lay)} {prec}: memory {mem['peak'] / 1e9:.2f} GB per rank > "
        f"{limit / 1e9:.2f} GB per device (largest: {big} {mem[big] / 1e9:.2f} GB)"
    )


def _no_layout(bad: list, n_devices: int, global_batch: int, max_micro: int) -> UserError:
    """The error when no layout is feasible: none at all, the closest to fitting in memory, or the first rule."""
    if not bad:
        return UserError(
            f"--gpus {n_devices}: no layout (no micro-batch count up to {max_micro} fits "
            f"global batch {global_batch})"
        )
    mem = [r for _, r in bad if "memory" in r]
    if mem:
        tight = min(mem, key=lambda r: float(r.split("memory ")[1].split(" GB")[0]))
        return UserError(
            f"the model fits on no layout of {n_devices} devices; the closest: {tight}"
        )
    return UserError(f"--gpus {n_devices} admits no layout: {bad[0][1]}")


def search(
    cfg: ModelConfig,
    cl: Cluster,
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
    sequence_parallel=(False,),
    act_comm: str = "fp32",
    grad_comm: tuple = ("fp32", 4),
    saves: tuple[str, bool] = ("gather", False),
):
    """-> (feasible predictions sorted by tokens/s, [(layout, reason)] infeasible). saves: checkpoint.writer and
    checkpoint.async_save ("auto" resolved for each layout's ranks, as the trainer does). Each layout's memory comes
    first: one that does not fit is rejected before its schedule is simulated (memory does not depend on time, so
    the answer is the same as predicting every layout: tests/plan/test_plan.py).

    recomputes are tried in the order given, which must recompute more and more ("none", "selective", "block"):
    once one fits, the layout's later ones are neither priced nor listed, since they run the same ops plus more
    recomputation and so are slower (the simulated step is monotone in every op's cost)."""
    if n_devices < 1:
        raise UserError(f"--gpus: expected a positive integer, got {n_devices}")
    if global_batch < 1:
        raise UserError(f"--global-batch: expected a positive integer, got {global_batch}")
    precisions = precisions or [precision_of(cfg.dtype)]
    ok, bad = [], []
    grid = layouts(
        cfg,
        n_devices,
        global_batch,
        bucket_mb,
        recomputes,
        sequence_parallel=sequence_parallel,
        act_comm=act_comm,
    )
    order = {rc: k for k, rc in enumerate(RECOMPUTES)}
    if [order[rc] for rc in recomputes] != sorted(order[rc] for rc in recomputes):
        raise ValueError(f"recomputes: expected an order of {RECOMPUTES}, got {recomputes}")
    fitted = set()  # (layout without its recompute, precision) that fit with less recomputation
    for lay, reason in grid:
        if reason:
            bad.append((lay, reason))
            continue
        # the data-parallel reduction's format and PowerSGD's rank (parallel.grad_comm, powersgd_rank)
        lay = replace(lay, grad_comm=grad_comm[0], powersgd_rank=grad_comm[1])
        if lay.micro_batches > max_micro:
            continue
        writer = auto_writer(saves[0], lay.ranks, saves[1])
        ckpt = {"writer": writer, "checkpoint_memory": checkpoint_memory, "async_save": saves[1]}
        for prec in precisions:
            key = (replace(lay, recompute="none"), prec)
            if key in fitted:
                continue
            if lay.pp > 1 and lay.send_depth is None:
                # first at send depth 1, a lower bound (the buffers grow with the depth): most layouts that do not
                # fit are rejected without schedule_timing.send_depth's simulations
                low = memory_of(
                    cfg, replace(lay, send_depth=1), cl, resolve_precision(cfg, prec), **ckpt
                )
                reason = _too_big(lay, prec, low[1], cl.memory_bytes)
                if reason:
                    bad.append((lay, reason))
                    continue
            memory = memory_of(cfg, lay, cl, resolve_precision(cfg, prec), **ckpt)
            reason = _too_big(lay, prec, memory[1], cl.memory_bytes)
            if reason:
                bad.append((lay, reason))
                continue
            fitted.add(key)
            ok.append(
                predict(
                    cfg,
                    lay,
                    cl,
                    prec,
                    share,
                    checkpoint_interval,
                    max_iters,
                    memory=memory,
                    **ckpt,
                )
            )
    if not ok:
        raise _no_layout(bad, n_devices, global_batch, max_micro)
    ok.sort(key=lambda p: -p.tokens_per_s)
    return ok, bad


def describe(lay: Layout) -> str:
    s = f"pp{lay.pp} dp{lay.dp} tp{lay.tp}"
    if lay.zero:
        s += f" zero{lay.zero}"
    if lay.pp > 1:
        s += f" {lay.schedule}" + (f" v{lay.virtual}" if lay.virtual > 1 else "")
    s += f" m{lay.micro_batches} b{lay.batch_size}"
    if lay.sequence_parallel:
        s += " sp"
    if lay.recompute != "none":
        s += f" recompute={lay.recompute}"
    if lay.act_comm != "fp32":
        s += f" act_comm={lay.act_comm}"
    if lay.send_depth is not None:
        s += f" send_depth={lay.send_depth or 'all'}"
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
