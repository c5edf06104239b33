"""hpc-llm: prepare, train, generate, eval, inspect, import-gpt2, merge-lora, plan, bench (comm, calibrate).

Also `python -m hpc_llm`.

Exit status: 0 done; 2 a user error (UserError: one line, `hpc-llm: error: ...`, on every rank); 75 `train` stopped
by SIGUSR1 or SIGTERM after writing a checkpoint (resume with `--resume auto`); 1 a fault: one line naming the rank,
its phase and the error (`hpc-llm: rank R failed in PHASE: ...`), after the traceback of the rank it happened on; a
fault only one rank knows of ends the whole job through MPI_Abort (docs/reliability.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from hpc_llm.errors import JobError, UserError
from hpc_llm.runtime.faults import failure_line, launcher_rank


def _need_directory_of(path: str, flag: str) -> None:
    """A file the verb writes at its end: its directory must exist before any work starts."""
    from pathlib import Path

    parent = Path(path).parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: directory {parent} does not exist")


def _prepare(args) -> None:
    from hpc_llm.data import prepare as data
    from hpc_llm.parallel.comm import world_comm

    if not 0 < args.val_fraction < 1:
        raise UserError(
            f"--val-fraction: expected a number strictly between 0 and 1, got {args.val_fraction}"
        )
    if args.max_bytes < 1:
        raise UserError(f"--max-bytes: expected a positive integer, got {args.max_bytes}")
    if args.memory_mb < data.MIN_MEMORY_MB:
        raise UserError(
            f"--memory-mb: expected an integer of at least {data.MIN_MEMORY_MB} (MB per rank), got "
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
    }
    if args.stdlib:
        if args.inputs:
            raise UserError("prepare: give input paths or --stdlib, not both")
        meta = data.prepare_stdlib(args.out, max_bytes=args.max_bytes, **options)
    else:
        if not args.inputs:
            raise UserError(
                "prepare: expected input files or folders (or --stdlib for the embedded corpus)"
            )
        meta = data.prepare(args.inputs, args.out, pattern=args.pattern, **options)
    if launcher_rank() == 0:
        print(
            f"prepared {args.out}: {meta['n_train']} train + {meta['n_val']} val tokens ({meta['dtype']}), "
            f"{meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {meta['n_files']} files"
        )


def _train(args) -> None:
    from hpc_llm.runtime.stop import EXIT_PREEMPTED, StopRequest

    with (
        StopRequest() as stop
    ):  # first: a stop signal during start-up is kept, and honoured at step 0
        from hpc_llm.runtime.faults import inject

        inject("startup")
        from hpc_llm.config import load_config
        from hpc_llm.parallel.comm import world_comm
        from hpc_llm.train.trainer import train

        # agreed: under mpiexec a rank that exits at once with a bad config would get its peers killed before they
        # print, so every rank reads and validates the config, then all raise the same error together
        cfg = world_comm().agree(lambda: load_config(args.config, args.set))
        summary = train(cfg, resume=args.resume, stop=stop)
    if launcher_rank() == 0:
        print(json.dumps(summary))
    return EXIT_PREEMPTED if summary["stopped_by"] else 0


def _generate(args) -> None:
    from hpc_llm.api import model_from_file, open_checkpoint, tokenizer_of
    from hpc_llm.infer.generate import check_options, generate_prompts, read_prompts, tp_from_sets
    from hpc_llm.parallel.comm import world_comm
    from hpc_llm.parallel.grid import world_grid

    # every check before the checkpoint is read; under mpiexec all ranks make them alike
    check_options(args.max_new_tokens, args.temperature, args.top_k, args.seed, args.top_p)
    if args.num_samples < 1:
        raise UserError(f"--num-samples: expected a positive integer, got {args.num_samples}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.prompts is not None and args.prompt:
        raise UserError("generate: give --prompt or --prompts, not both")
    world = world_comm()
    tp = tp_from_sets(args.set, world.size)
    if args.out:
        _need_directory_of(args.out, "--out")

    def inputs():
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

    saved, tok, texts, ids = world.agree(inputs, "reading the prompts and the checkpoint")
    with saved:
        grid = world_grid(tp)
        model = model_from_file(
            saved, args.backend, args.dtype, args.quantize, grid.tp_comm, agree=grid.world
        )
    rows = [(t, i) for t, i in zip(texts, ids) for _ in range(args.num_samples)]
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
        with open(args.out, "w", encoding="utf-8") as f:
            for (text, _), r in zip(rows, results):
                f.write(
                    json.dumps(
                        {
                            "prompt": text,
                            "completion": tok.decode(r["tokens"]),
                            "tokens": r["tokens"],
                            "seconds": r["seconds"],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
        return
    for n, ((_, prompt), r) in enumerate(zip(rows, results)):
        if len(rows) > 1:
            print(
                f"--- sample {n}"
                if args.prompts is None
                else f"--- prompt {n // args.num_samples + 1}"
                + (f", sample {n % args.num_samples}" if args.num_samples > 1 else "")
            )
        print(tok.decode(list(prompt) + r["tokens"]))


def _eval(args) -> None:
    from hpc_llm.api import model_from_file, open_checkpoint
    from hpc_llm.infer.evaluate import check_eval_options, evaluate, open_split
    from hpc_llm.infer.generate import tp_from_sets
    from hpc_llm.parallel.comm import world_comm
    from hpc_llm.parallel.grid import world_grid

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


def _inspect(args) -> None:
    from hpc_llm.tools.inspect import run

    run(args.checkpoints)


def _import_gpt2(args) -> None:
    from hpc_llm.tools.gpt2_import import import_gpt2

    path = import_gpt2(args.model_dir, args.out)
    print(f"wrote {path}")


def _merge_lora(args) -> None:
    from hpc_llm.tools.merge_lora import merge_lora

    path = merge_lora(args.checkpoint, args.out)
    print(
        f"merged the LoRA adapters of {args.checkpoint} into {path} (a plain model: model.lora_rank = 0)"
    )


def _bench_comm(args) -> None:
    from hpc_llm.bench.comm import run_from_args

    if args.json:
        _need_directory_of(args.json, "--json")
    run_from_args(args)


def _bench_calibrate(args) -> None:
    from pathlib import Path

    from hpc_llm.bench.calibrate import calibrate
    from hpc_llm.plan.cluster import cluster_from_dict, to_toml

    out = Path(args.out)
    _need_directory_of(args.out, "--out")
    fig, notes = calibrate(out.parent)
    if launcher_rank() == 0:
        cluster_from_dict(fig, str(out))  # what we write must load
        out.write_text(to_toml(fig, "written by `hpc-llm bench calibrate`: " + notes))
        print(f"wrote {out} ({notes})")


def _plan(args) -> None:
    import math

    from hpc_llm.plan import search as S
    from hpc_llm.plan.cluster import load_cluster

    for flag, value in (
        ("--gpus", args.gpus),
        ("--global-batch", args.global_batch),
        ("--max-micro", args.max_micro),
        ("--top", args.top),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag}: expected a positive integer, got {value}")
    if not (math.isfinite(args.ranks_per_device) and args.ranks_per_device > 0):
        raise UserError(
            f"--ranks-per-device: expected a positive number, got {args.ranks_per_device}"
        )
    if args.timeline:
        _need_directory_of(args.timeline, "--timeline")
    cl = load_cluster(args.cluster)
    if args.compare:
        from hpc_llm.plan.compare import compare, format_compare

        r = compare(args.compare, cl, args.gpus, args.ranks_per_device)
        pred = r.pop("_prediction")
        print(json.dumps(r, indent=2) if args.json else format_compare(r))
    else:
        if not args.config or args.gpus is None:
            raise UserError("plan: give CONFIG and --gpus N (or --compare RUN_DIR)")
        cfg = _plan_config(args)
        batch = args.global_batch or cfg.train.batch_size * cfg.train.grad_accum
        recomputes = ("none", "block")
        precisions = (
            [args.precision]
            if args.precision
            else (["fp32", "bf16"] if cfg.model.dtype == "float32" else None)
        )
        preds, bad = S.search(
            cfg.model,
            cl,
            args.gpus,
            batch,
            precisions,
            args.ranks_per_device,
            cfg.checkpoint.interval,
            cfg.train.max_iters,
            recomputes,
            cfg.parallel.bucket_mb,
            args.max_micro,
            not args.no_checkpoint_memory,
        )
        pred = preds[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "feasible": [p.as_dict() for p in preds],
                        "infeasible": [{"layout": S.asdict(lay), "reason": r} for lay, r in bad],
                    },
                    indent=1,
                )
            )
        else:
            print(
                f"{cfg.model.n_layer} layers x {cfg.model.n_embd} dim, T {cfg.model.block_size}, global batch "
                f"{batch} sequences, {args.gpus} devices of {cl.name}"
            )
            print(S.format_table(preds, bad, args.top))
    if args.timeline:
        from hpc_llm.plan.timeline import draw

        draw(pred, args.timeline, S.describe(pred.layout) if not args.compare else "run layout")
        if not args.json:
            print(f"timeline: {args.timeline}")


def _plan_config(args):
    from hpc_llm.config import load_config

    cfg = load_config(args.config, args.set)
    if cfg.model.vocab_size == 0:
        from hpc_llm.data.prepare import TokenData

        try:
            vocab_size = TokenData(cfg.data.path).vocab_size
        except UserError:
            raise UserError(
                f"model.vocab_size is 0 (from the data) and {cfg.data.path} is not prepared: set "
                "model.vocab_size"
            ) from None
        return cfg.with_vocab(vocab_size)
    return cfg


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an argument missing, an int that is not one, a choice not offered) printed as every user
    error is: one line, exit 2 (argparse's usage block would make it several, on every rank)."""

    def error(self, message):
        self.exit(2, f"hpc-llm: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hpc-llm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "prepare", help="text files/folders -> token files (train.bin, val.bin, meta.json)"
    )
    s.add_argument("inputs", nargs="*", help="text files or folders (recursed)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument(
        "--stdlib",
        action="store_true",
        help="use the Python standard library's sources as the corpus",
    )
    s.add_argument(
        "--max-bytes", type=int, default=8_000_000, help="size cap of the --stdlib corpus"
    )
    s.add_argument(
        "--tokenizer",
        choices=("byte", "char", "bpe", "gpt2"),
        default=None,
        help="byte (default), char, bpe (train a byte-level BPE here: --vocab-size), gpt2 (a Hugging Face "
        "tokenizer: --tokenizer-dir)",
    )
    s.add_argument(
        "--vocab-size", type=int, default=None, help="tokens of the BPE that --tokenizer bpe trains"
    )
    s.add_argument(
        "--tokenizer-dir",
        default=None,
        metavar="DIR",
        help="a Hugging Face tokenizer directory (tokenizer.json, or vocab.json + merges.txt)",
    )
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--pattern", default="*", help="glob for files inside folders, e.g. '*.txt'")
    s.add_argument(
        "--memory-mb",
        type=int,
        default=256,
        help="memory budget per rank in MB, whatever the corpus size (docs/data.md)",
    )
    s.set_defaults(func=_prepare)

    s = sub.add_parser("train", help="train a model from a TOML config")
    s.add_argument("config", help="TOML config file (see inputs/)")
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value",
    )
    s.add_argument(
        "--resume",
        metavar="CKPT|auto",
        help="continue from a checkpoint, or the newest verified one",
    )
    s.set_defaults(func=_train)

    s = sub.add_parser("generate", help="sample text from a checkpoint")
    s.add_argument(
        "checkpoint", help="a checkpoint file, or a run directory (its newest verified checkpoint)"
    )
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling: the smallest set of most likely "
        "tokens holding this much probability, in (0, 1] (after --top-k when both are given)",
    )
    s.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    s.add_argument(
        "--seed", type=int, default=0, help="prompt i (its row) samples from default_rng([seed, i])"
    )
    s.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    s.add_argument(
        "--prompts", metavar="FILE", help="UTF-8 text, one prompt a line, generated in batches"
    )
    s.add_argument("--batch-size", type=int, default=8, help="prompts (rows) decoded together")
    s.add_argument(
        "--out",
        metavar="JSONL",
        help="write one JSON object per row: prompt, completion, tokens (the "
        "new ids), seconds (the wall time of the row's batch)",
    )
    s.add_argument(
        "--quantize",
        choices=("int8",),
        help="int8 weights (per-output-channel scales; float32 models)",
    )
    s.add_argument(
        "--dtype", choices=("float32", "float64"), help="compute dtype (default: the checkpoint's)"
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="parallel.tp=T",
        help="tensor-parallel size (default: the number of ranks; run under mpiexec -n T)",
    )
    s.set_defaults(func=_generate)

    s = sub.add_parser("eval", help="a checkpoint's loss and perplexity on a prepared split")
    s.add_argument(
        "checkpoint", help="a checkpoint file, or a run directory (its newest verified checkpoint)"
    )
    s.add_argument(
        "--data",
        required=True,
        help="a directory written by `hpc-llm prepare` (the same tokenizer)",
    )
    s.add_argument("--split", choices=("train", "val"), default="val")
    s.add_argument(
        "--batch-size", type=int, default=8, help="windows of block_size tokens per forward"
    )
    s.add_argument(
        "--max-batches", type=int, default=None, help="stop after this many batches (default: all)"
    )
    s.add_argument(
        "--dtype", choices=("float32", "float64"), help="compute dtype (default: the checkpoint's)"
    )
    s.add_argument(
        "--quantize", choices=("int8",), help="int8 weights, as generate's (float32 models)"
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="parallel.tp=T",
        help="tensor-parallel size, dividing the number of ranks (default: all of them); the batches "
        "are dealt over dp = ranks / T replicas",
    )
    s.set_defaults(func=_eval)

    s = sub.add_parser(
        "inspect", help="print a checkpoint's contents and tensor statistics, or compare two"
    )
    s.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="one checkpoint (file or run directory) to describe, or two to compare",
    )
    s.set_defaults(func=_inspect)

    s = sub.add_parser(
        "import-gpt2", help="convert a Hugging Face GPT-2 directory (safetensors) to a checkpoint"
    )
    s.add_argument(
        "model_dir",
        help="directory with config.json and model.safetensors (and the tokenizer: "
        "tokenizer.json, or vocab.json + merges.txt, when present)",
    )
    s.add_argument("--out", required=True, help="checkpoint file to write (.h5)")
    s.set_defaults(func=_import_gpt2)

    s = sub.add_parser(
        "merge-lora", help="fold a LoRA checkpoint's adapters into its weights: a plain checkpoint"
    )
    s.add_argument(
        "checkpoint",
        help="a LoRA run's checkpoint file, or its run directory (the newest verified one)",
    )
    s.add_argument(
        "--out", required=True, help="checkpoint file to write (.h5), in an existing directory"
    )
    s.set_defaults(func=_merge_lora)

    s = sub.add_parser(
        "plan", help="predict memory and speed of every layout on a cluster (docs/planning.md)"
    )
    s.add_argument(
        "config", nargs="?", help="TOML config file (the model, batch and checkpoint interval)"
    )
    s.add_argument("--cluster", required=True, help="cluster figures (inputs/clusters/*.toml)")
    s.add_argument("--gpus", type=int, help="devices (ranks) to plan for")
    s.add_argument(
        "--global-batch", type=int, help="sequences per step (default: batch_size x grad_accum)"
    )
    s.add_argument(
        "--precision",
        choices=("fp32", "fp64", "bf16", "fp16", "bf16-tc"),
        help="default: train.precision (fp32 and bf16 searched); bf16-tc: bf16 with tensor-core GEMMs "
        "(not in the code yet)",
    )
    s.add_argument(
        "--ranks-per-device",
        type=float,
        default=1.0,
        help="ranks sharing one device (oversubscribed: compute and collectives slow by this factor)",
    )
    s.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value",
    )
    s.add_argument(
        "--max-micro", type=int, default=4096, help="the most micro-batches per step searched"
    )
    s.add_argument(
        "--no-checkpoint-memory",
        action="store_true",
        help="plan training alone: leave the save's assembled full tensors out of the memory limit",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument(
        "--top", type=int, default=20, help="feasible layouts shown (and infeasible reasons)"
    )
    s.add_argument("--timeline", metavar="PNG", help="draw the best layout's pipeline schedule")
    s.add_argument(
        "--compare",
        metavar="RUN_DIR",
        help="a finished run: its measured step beside the prediction",
    )
    s.set_defaults(func=_plan)

    s = sub.add_parser("bench", help="benchmarks (run under mpiexec): comm, calibrate")
    bench = s.add_subparsers(dest="bench", required=True)
    b = bench.add_parser(
        "comm", help="collectives through our Comm wrappers: time, algbw, busbw, vs plain mpi4py"
    )
    from hpc_llm.bench.comm import add_arguments as add_bench_comm_arguments

    add_bench_comm_arguments(b)
    b.set_defaults(func=_bench_comm)
    b = bench.add_parser(
        "calibrate",
        help="measure this machine's figures for `hpc-llm plan` (run under "
        "`mpiexec -n 2` to measure the links too)",
    )
    b.add_argument(
        "--out", default="inputs/clusters/this_machine.toml", help="cluster file to write"
    )
    b.set_defaults(func=_bench_calibrate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if launcher_rank() == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
    )
    try:
        return args.func(args) or 0
    except UserError as e:
        sys.stderr.write(
            f"hpc-llm: error: {e}\n"
        )  # one write: MPI launchers interleave ranks' partial lines
        sys.stderr.flush()
        return 2
    except JobError as e:  # every rank knows (agreed): each exits 1 by itself, rank 0 says why
        if launcher_rank() == 0:
            sys.stderr.write(f"hpc-llm: {e}\n")
            sys.stderr.flush()
        return 1
    except Exception as e:
        # a bug or a fault on this rank only: its peers may be waiting for it in a collective or a receive, and
        # MPI_Finalize at exit would wait for them in turn; abort the job instead of leaving it hung
        import traceback

        sys.stderr.write(traceback.format_exc() + f"hpc-llm: {failure_line(e)}\n")
        sys.stderr.flush()
        if "mpi4py.MPI" in sys.modules:
            from hpc_llm.runtime.faults import abort_job

            abort_job(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
