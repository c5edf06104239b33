"""What each verb of the command line does (hpc_llm.cli.parser maps the verbs and flags here; `plan` is
plan_command.py's): checks of the arguments first, each error a UserError (one line, exit 2), then the work, the
output on rank 0."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

from hpc_llm.api import model_from_file, open_checkpoint, tokenizer_of
from hpc_llm.bench.calibrate import calibrate
from hpc_llm.bench.comm import run_from_args
from hpc_llm.config import load_config
from hpc_llm.data.prepare import MIN_MEMORY_MB, prepare, prepare_stdlib
from hpc_llm.data.tokens import TokenData
from hpc_llm.errors import UserError
from hpc_llm.infer.evaluate import check_eval_options, evaluate, open_split
from hpc_llm.infer.generate import check_options, generate_prompts, read_prompts, tp_from_sets
from hpc_llm.model.layout import param_specs
from hpc_llm.parallel.comm import world_comm
from hpc_llm.parallel.grid import world_grid
from hpc_llm.plan.auto import auto_layout
from hpc_llm.plan.cluster_file import cluster_from_dict, to_toml
from hpc_llm.runtime.faults import WATCHDOG, inject, launcher_rank, phase
from hpc_llm.runtime.fsio import atomic_write_bytes, check_output
from hpc_llm.runtime.records import records_beside
from hpc_llm.runtime.stop import EXIT_PREEMPTED, StopRequest
from hpc_llm.tools.gpt2_import import import_gpt2
from hpc_llm.tools.hf_export import export_hf
from hpc_llm.tools.inspect import run as inspect_checkpoints
from hpc_llm.tools.merge_lora import merge_lora
from hpc_llm.tools.prune import Pruning, prune
from hpc_llm.train import train


def _in_phase(name: str, records: bool = False):
    """The verb runs in phase `name`: a failure line or the watchdog's abort says "generate", not "start-up".
    records: a verb of several ranks with no run directory keeps each rank's record beside its `--out` (none: the
    current directory), so the watchdog's line names the rank behind (runtime/records.py)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args):
            with phase(name):
                if not records:
                    return fn(args)
                output = getattr(args, "out", None)
                with records_beside(WATCHDOG.record, world_comm(), output, name):
                    return fn(args)

        return run

    return wrap


def check_positive(flag: str, value) -> None:
    if value is not None and value < 1:
        raise UserError(f"{flag}: expected a positive integer, got {value}")


@_in_phase("prepare", records=True)
def run_prepare(args) -> None:
    if not 0 < args.val_fraction < 1:
        raise UserError(
            f"--val-fraction: expected a number strictly between 0 and 1, got {args.val_fraction}"
        )
    check_positive("--max-bytes", args.max_bytes)
    if args.memory_mb < MIN_MEMORY_MB:
        raise UserError(
            f"--memory-mb: expected an integer of at least {MIN_MEMORY_MB} (MB per rank), got "
            f"{args.memory_mb}"
        )
    # --tokenizer-dir alone means the Hugging Face tokenizer in it
    tokenizer = args.tokenizer or ("gpt2" if args.tokenizer_dir is not None else "byte")
    options = {
        "tokenizer": tokenizer,
        "val_fraction": args.val_fraction,
        "vocab_size": args.vocab_size,
        "tokenizer_dir": args.tokenizer_dir,
        "memory_mb": args.memory_mb,
        "comm": world_comm(),
        "force": args.force,
    }
    if args.stdlib:
        if args.inputs:
            raise UserError("prepare: give input paths or --stdlib, not both")
        meta = prepare_stdlib(args.out, max_bytes=args.max_bytes, **options)
    else:
        if not args.inputs:
            raise UserError(
                "prepare: expected input files or folders (or --stdlib for the embedded corpus)"
            )
        meta = prepare(args.inputs, args.out, pattern=args.pattern, **options)
    if launcher_rank() == 0:
        print(
            f"prepared {args.out}: {meta['n_train']} train + {meta['n_val']} val tokens ({meta['dtype']}), "
            f"{meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {meta['n_files']} files"
        )


def run_train(args) -> int:
    # first: a stop signal during start-up is kept, and honoured at step 0. hold: once the run is over, stop signals
    # are ignored until the process has exited (MPI_Finalize included): Slurm's scripts forward both the warning and
    # the later SIGTERM, and a second signal must not kill a rank that has written its checkpoint (runtime/stop.py)
    with StopRequest(hold=True) as stop:
        inject("startup")
        # agreed: under mpiexec a rank that exits at once with a bad config would get its peers killed before they
        # print, so every rank reads and validates the config, then all raise the same error together; a rank stuck
        # here leaves its peers in the agreement, under the watchdog cli.main armed (--comm-timeout-s)
        world = world_comm()

        def read_config():
            inject("config")
            return load_config(args.config, args.set)

        cfg = world.agree(read_config)
        if cfg.parallel.layout == "auto" or args.cluster:
            cfg = _auto_layout(world, cfg, args.cluster)
        summary = train(cfg, resume=args.resume, stop=stop)
    if launcher_rank() == 0:
        print(json.dumps(summary))
    inject("exit")
    return EXIT_PREEMPTED if summary["stopped_by"] else 0


def _auto_layout(world, cfg, cluster):
    """cfg at the layout the planner picks on rank 0 for this job's ranks (plan/auto.py), the same on every rank;
    its line printed once. Bad input fails every rank alike, before any compute."""

    def pick():
        if cfg.parallel.layout != "auto":
            raise UserError('--cluster: used only with parallel.layout = "auto"')
        if world.rank != 0:
            return None
        resolved = cfg
        if cfg.model.vocab_size == 0:
            resolved = cfg.with_vocab(TokenData(cfg.data.path).vocab_size)
        chosen, line = auto_layout(resolved, cluster, world.size)
        return dataclasses.replace(chosen, model=cfg.model), line

    chosen, line = world.bcast_object(world.agree(pick, "parallel.layout = auto"))
    if world.rank == 0:
        print(line, flush=True)
    return chosen


def _check_generate_args(args) -> None:
    """Every check before the checkpoint is read; under mpiexec all ranks make them alike."""
    check_options(args.max_new_tokens, args.temperature, args.top_k, args.seed, args.top_p)
    check_positive("--num-samples", args.num_samples)
    check_positive("--batch-size", args.batch_size)
    if args.prompts is not None and args.prompt:
        raise UserError("generate: give --prompt or --prompts, not both")


def _open_prompts(args):
    """(the checkpoint opened, its tokenizer, the prompts, their token ids); the checkpoint closed on an error."""
    texts = read_prompts(args.prompts) if args.prompts is not None else [args.prompt or "\n"]
    saved = open_checkpoint(args.checkpoint)
    try:
        tok = tokenizer_of(saved)
        ids = []
        for i, text in enumerate(texts, 1):
            try:
                ids.append(tok.encode(text))
            except UserError as e:
                where = (
                    f"--prompts {args.prompts}: line {i}"
                    if args.prompts is not None
                    else "--prompt"
                )
                raise UserError(f"{where}: {e}") from None
    except BaseException:
        saved.close()
        raise
    return saved, tok, texts, ids


def _write_completions(path: str, rows, results, tok) -> None:
    """One JSON object per row: prompt, completion, tokens (the new ids), seconds; written whole to a temporary name
    beside ``path`` and renamed (a crash leaves the old file, or none)."""
    lines = []
    for (text, _), r in zip(rows, results):
        record = {
            "prompt": text,
            "completion": tok.decode(r["tokens"]),
            "tokens": r["tokens"],
            "seconds": r["seconds"],
        }
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_bytes(Path(path), "".join(lines).encode("utf-8"))


def _print_samples(args, rows, results, tok) -> None:
    for n, ((_, prompt), r) in enumerate(zip(rows, results)):
        if len(rows) > 1:
            print(
                f"--- sample {n}"
                if args.prompts is None
                else f"--- prompt {n // args.num_samples + 1}"
                + (f", sample {n % args.num_samples}" if args.num_samples > 1 else "")
            )
        print(tok.decode(list(prompt) + r["tokens"]))


@_in_phase("generate", records=True)
def run_generate(args) -> None:
    _check_generate_args(args)
    world = world_comm()
    tp = tp_from_sets(args.set, world.size)
    if args.out:
        # agreed: every rank refuses alike; the checkpoint (a run directory: each file in it) and the prompts are
        # inputs, never replaced, --force or not
        world.agree(
            lambda: check_output(args.out, "--out", (args.checkpoint, args.prompts), args.force),
            "checking --out",
        )
    saved, tok, texts, ids = world.agree(
        lambda: _open_prompts(args), "reading the prompts and the checkpoint"
    )
    with saved:
        grid = world_grid(tp)
        model = model_from_file(
            saved, args.backend, args.dtype, args.quantize, grid.tp_comm, agree=grid.world
        )
    rows = [(t, i) for t, i in zip(texts, ids) for _ in range(args.num_samples)]
    inject("generate")
    results = generate_prompts(
        model,
        [i for _, i in rows],
        args.max_new_tokens,
        batch_size=args.batch_size,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if world.rank != 0:
        return
    if args.out:
        _write_completions(args.out, rows, results, tok)
    else:
        _print_samples(args, rows, results, tok)


@_in_phase("eval", records=True)
def run_eval(args) -> None:
    check_eval_options(args.batch_size, args.max_batches)
    world = world_comm()
    tp = tp_from_sets(args.set, world.size, "eval", data_parallel=True)  # dp = ranks / tp replicas

    def inputs():
        saved = open_checkpoint(args.checkpoint)
        try:
            return saved, open_split(saved, args.data, args.split)
        except BaseException:
            saved.close()
            raise

    saved, tokens = world.agree(inputs, "reading the data and the checkpoint")
    with saved:
        grid = world_grid(tp)
        model = model_from_file(
            saved, "numpy", args.dtype, args.quantize, grid.tp_comm, agree=grid.world
        )
    inject("eval")
    result = evaluate(model, tokens, args.batch_size, args.max_batches, grid.dp_comm)
    if world.rank == 0:
        print(
            json.dumps(
                {
                    "split": args.split,
                    **result,
                    "tp": tp,
                    "dp": grid.dp,
                    "dtype": str(model.dtype),
                    "quantize": args.quantize,
                }
            )
        )


def run_inspect(args) -> None:
    inspect_checkpoints(args.checkpoints)


def run_import_gpt2(args) -> None:
    path = import_gpt2(args.model_dir, args.out, force=args.force)
    print(f"wrote {path}")


def run_export_hf(args) -> None:
    done = export_hf(args.checkpoint, args.out, dtype=args.dtype, force=args.force)
    print(f"wrote {done.out}: {', '.join(done.files)}")
    for note in done.notes:
        print(f"note: {note}")


def run_merge_lora(args) -> None:
    path = merge_lora(args.checkpoint, args.out, force=args.force)
    print(
        f"merged the LoRA adapters of {args.checkpoint} into {path} (a plain model: model.lora_rank = 0)"
    )


def run_prune(args) -> None:
    pruning = Pruning(args.heads, args.mlp, args.layers)
    path, m = prune(args.checkpoint, args.out, pruning, force=args.force)
    params = sum(math.prod(s.shape) for s in param_specs(m))
    print(
        f"wrote {path}: {m.n_layer} layers, {m.n_head} heads of {m.head_size}, MLP width {m.mlp_width}, "
        f"{params / 1e6:.3f}M parameters"
    )


@_in_phase("bench comm")
def run_bench_comm(args) -> None:
    if args.json:
        world_comm().agree(
            lambda: check_output(args.json, "--json", (), args.force), "checking --json"
        )
    run_from_args(args)


@_in_phase("bench calibrate")
def run_bench_calibrate(args) -> None:
    out = Path(args.out)
    world_comm().agree(lambda: check_output(out, "--out", (), args.force), "checking --out")
    fig, notes = calibrate(out.parent)
    if launcher_rank() == 0:
        cluster_from_dict(fig, str(out))  # what we write must load
        text = to_toml(fig, "written by `hpc-llm bench calibrate`: " + notes)
        atomic_write_bytes(out, text.encode("utf-8"))
        print(f"wrote {out} ({notes})")
