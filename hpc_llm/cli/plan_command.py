"""`hpc-llm plan` (hpc_llm.cli.parser maps its flags here): every layout for N devices searched, one --layout priced,
or a run compared with its prediction (--compare); optionally the step's timeline drawn. Checks of the arguments
first, each error a UserError (one line, exit 2); the cost model itself is hpc_llm.plan (docs/planning.md)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

from hpc_llm.cli.commands import check_positive
from hpc_llm.config import load_config
from hpc_llm.data.tokens import TokenData
from hpc_llm.errors import UserError
from hpc_llm.plan.cluster_file import load_cluster
from hpc_llm.plan.compare import compare, format_compare
from hpc_llm.plan.given import format_given, given_layout, own_split
from hpc_llm.plan.predict import plan_saves, predict
from hpc_llm.plan.search import describe, format_table, search
from hpc_llm.plan.timeline import draw
from hpc_llm.runtime.fsio import check_output
from hpc_llm.train.teacher import teacher_config


def _check_plan_args(args) -> None:
    for flag, value in (
        ("--gpus", args.gpus),
        ("--global-batch", args.global_batch),
        ("--max-micro", args.max_micro),
        ("--top", args.top),
    ):
        check_positive(flag, value)
    if not (math.isfinite(args.ranks_per_device) and args.ranks_per_device > 0):
        raise UserError(
            f"--ranks-per-device: expected a positive number, got {args.ranks_per_device}"
        )
    if args.timeline:
        # the config, the cluster file and the compared run's files are inputs: never replaced
        check_output(
            args.timeline, "--timeline", (args.config, args.cluster, args.compare), args.force
        )


def _plan_config(args):
    cfg = load_config(args.config, args.set)
    if cfg.model.vocab_size == 0:
        try:
            vocab_size = TokenData(cfg.data.path).vocab_size
        except UserError:
            raise UserError(
                f"model.vocab_size is 0 (from the data) and {cfg.data.path} is not prepared: set "
                "model.vocab_size"
            ) from None
        return cfg.with_vocab(vocab_size)
    return cfg


def _plan_search(args, cl):
    """Every layout for the config on ``cl``, printed best first; returns the best prediction."""
    if not args.config or args.gpus is None:
        raise UserError("plan: give CONFIG and --gpus N (or --compare RUN_DIR)")
    cfg = _plan_config(args)
    batch = args.global_batch or cfg.train.batch_size * cfg.train.grad_accum
    recomputes = ("none", "selective", "block")
    precisions = (
        [args.precision]
        if args.precision
        else (["fp32", "bf16"] if cfg.model.dtype == "float32" else None)
    )
    preds, bad = search(
        cfg.model,
        cl,
        args.gpus,
        batch,
        precisions=precisions,
        share=args.ranks_per_device,
        checkpoint_interval=cfg.checkpoint.interval,
        max_iters=cfg.train.max_iters,
        recomputes=recomputes,
        bucket_mb=cfg.parallel.bucket_mb,
        max_micro=args.max_micro,
        checkpoint_memory=not args.no_checkpoint_memory,
        sequence_parallel=(False, True),
        act_comm=cfg.parallel.act_comm,
        grad_comm=(cfg.parallel.grad_comm, cfg.parallel.powersgd_rank),
        saves=(cfg.checkpoint.writer, cfg.checkpoint.async_save),
    )
    if args.json:
        feasible = [p.as_dict() for p in preds]
        infeasible = [{"layout": asdict(lay), "reason": r} for lay, r in bad]
        print(json.dumps({"feasible": feasible, "infeasible": infeasible}, indent=1))
    else:
        print(
            f"{cfg.model.n_layer} layers x {cfg.model.n_embd} dim, T {cfg.model.block_size}, global batch "
            f"{batch} sequences, {args.gpus} devices of {cl.name}"
        )
        print(format_table(preds, bad, args.top))
    return preds[0]


def _plan_layout(args, cl):
    """One layout (--layout) priced: its memory per rank, term by term, and its step; returns the prediction."""
    if not args.config:
        raise UserError(
            "plan --layout: give CONFIG (the model; its parallel and train settings are the defaults)"
        )
    if args.compare:
        raise UserError("--layout: not used with --compare (a run's layout is its own)")
    if args.global_batch is not None:
        raise UserError("--global-batch: not used with --layout (give micro= and mbs=)")
    cfg = _plan_config(args)
    lay, precision = given_layout(cfg, args.layout, args.gpus, args.precision)
    pred = predict(
        cfg.model,
        lay,
        cl,
        precision,
        args.ranks_per_device,
        cfg.checkpoint.interval,
        cfg.train.max_iters,
        pp_layers=own_split(cfg, lay),
        checkpoint_memory=not args.no_checkpoint_memory,
        **plan_saves(cfg, lay.ranks),
        teacher=teacher_config(cfg),
    )
    fits = pred.memory["peak"] <= cl.memory_bytes
    if args.json:
        out = pred.as_dict() | {"fits": fits, "device_memory_bytes": cl.memory_bytes}
        print(json.dumps(out, indent=1))
    else:
        print(format_given(cfg.model, pred, cl, not args.no_checkpoint_memory))
    return pred


def run_plan(args) -> None:
    _check_plan_args(args)
    cl = load_cluster(args.cluster)
    if args.layout is not None:
        pred = _plan_layout(args, cl)
    elif args.compare:
        r = compare(args.compare, cl, args.gpus, args.ranks_per_device)
        pred = r.pop("_prediction")
        print(json.dumps(r, indent=2) if args.json else format_compare(r))
    else:
        pred = _plan_search(args, cl)
    if args.timeline:
        draw(
            pred,
            args.timeline,
            "run layout" if args.compare and args.layout is None else describe(pred.layout),
        )
        if not args.json:
            print(f"timeline: {args.timeline}")
