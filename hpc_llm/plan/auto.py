"""`parallel.layout = "auto"`: the planner picks the layout for the ranks the job got, on the machine a cluster file
describes (`hpc-llm train --cluster FILE`; `hpc-llm bench calibrate` writes one), before any compute
(docs/planning.md, "The layout picked at start").

What it may change: parallel.tp, pp, zero, schedule, virtual_stages, sequence_parallel, and train.grad_accum with
train.batch_size at the same global batch (batch_size x grad_accum sequences: the same samples each step, so the
run's curve does not depend on the layout picked), and train.recompute where nothing fits without it. What it
keeps: the model, its dtype, parallel.act_comm and grad_comm (priced: plan/grad_comm.py), and every other setting.
The fastest layout that fits (the planner's tokens/s) wins; the line it prints names the runner-up and its
predicted step.
"""

from __future__ import annotations

import dataclasses

from hpc_llm.config import Config, validated
from hpc_llm.errors import UserError
from hpc_llm.plan.cluster_file import load_cluster
from hpc_llm.plan.memory import RECOMPUTES, Layout
from hpc_llm.plan.predict import precision_of
from hpc_llm.plan.search import describe, search


def apply_layout(cfg: Config, lay: Layout) -> Config:
    """cfg run at `lay` (its parallel and batch fields set from it), checked as any config is."""
    par = dataclasses.replace(
        cfg.parallel,
        layout="",
        tp=lay.tp,
        pp=lay.pp,
        zero=lay.zero,
        schedule=lay.schedule,
        virtual_stages=lay.virtual,
        sequence_parallel=lay.sequence_parallel,
        pp_layers=[],
    )
    train = dataclasses.replace(
        cfg.train,
        grad_accum=lay.micro_batches,
        batch_size=lay.batch_size,
        recompute=lay.recompute,
    )
    return validated(dataclasses.replace(cfg, parallel=par, train=train))


def run_precision(cfg: Config) -> str:
    """The planner's name for the run's arithmetic: train.precision, or the model's dtype when that is fp32."""
    if cfg.train.precision != "fp32":
        return cfg.train.precision
    return precision_of(cfg.model.dtype)


def auto_layout(cfg: Config, cluster: str | None, ranks: int) -> tuple[Config, str]:
    """(cfg at the fastest layout that fits `ranks` ranks on `cluster`, the line that says which and why).
    cfg.model.vocab_size must be resolved. A missing cluster file, or no layout that fits: one UserError."""
    if not cluster:
        raise UserError(
            'parallel.layout = "auto": give the machine\'s cluster file, `hpc-llm train --cluster FILE` '
            "(`hpc-llm bench calibrate --out FILE` under the job's launcher writes one)"
        )
    cl = load_cluster(cluster)
    batch = cfg.train.batch_size * cfg.train.grad_accum
    try:
        preds, _ = search(
            cfg.model,
            cl,
            ranks,
            batch,
            precisions=[run_precision(cfg)],
            checkpoint_interval=cfg.checkpoint.interval,
            max_iters=cfg.train.max_iters,
            recomputes=RECOMPUTES,
            bucket_mb=cfg.parallel.bucket_mb,
            sequence_parallel=(False, True),
            act_comm=cfg.parallel.act_comm,
            grad_comm=(cfg.parallel.grad_comm, cfg.parallel.powersgd_rank),
            saves=(cfg.checkpoint.writer, cfg.checkpoint.async_save),
        )
    except UserError as e:
        raise UserError(f'parallel.layout = "auto" on {ranks} ranks of {cluster}: {e}') from None
    best = preds[0]
    grid = lambda p: (p.layout.pp, p.layout.dp, p.layout.tp, p.layout.zero)  # noqa: E731
    # the runner-up: the best of another grid (the same grid's other micro-batchings are variations of the winner)
    others = [p for p in preds if grid(p) != grid(best)] or preds[1:]
    line = (
        f'parallel.layout = "auto": {describe(best.layout)}, predicted {1000 * best.time["step"]:.0f} ms '
        f"per step on {ranks} ranks of {cluster} (the fastest of {len(preds)} that fit, by the planner"
    )
    if others:
        second = others[0]
        line += (
            f"; next {describe(second.layout)}, {1000 * second.time['step']:.0f} ms"
            f" (+{100 * (second.time['step'] / best.time['step'] - 1):.1f}%)"
        )
    return apply_layout(cfg, best.layout), line + ")"
