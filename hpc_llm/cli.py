"""`hpc-llm prepare | train | generate | inspect | import-gpt2 | bench comm` (also `python -m hpc_llm`).

Exit status: 0 done; 2 a user error (UserError: one line, `hpc-llm: error: ...`); 75 `train` stopped by SIGUSR1 or
SIGTERM after writing a checkpoint (resume with `--resume auto`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from hpc_llm.errors import UserError


def _prepare(args) -> None:
    from hpc_llm import data

    if args.stdlib:
        if args.inputs:
            raise UserError("prepare: give input paths or --stdlib, not both")
        meta = data.prepare_stdlib(args.out, max_bytes=args.max_bytes, tokenizer=args.tokenizer,
                                   val_fraction=args.val_fraction)
    else:
        if not args.inputs:
            raise UserError("prepare: expected input files or folders (or --stdlib for the embedded corpus)")
        meta = data.prepare(args.inputs, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                            pattern=args.pattern)
    print(f"prepared {args.out}: {meta['n_train']} train + {meta['n_val']} val tokens, "
          f"{meta['tokenizer']} tokenizer, vocab {meta['vocab_size']}, {meta['n_files']} files")


def _train(args) -> None:
    from hpc_llm.config import load_config
    from hpc_llm.train import EXIT_PREEMPTED, train

    from hpc_llm.parallel.comm import world_comm

    # agreed: under mpiexec a rank that exits at once with a bad config would get its peers killed before they
    # print, so every rank reads and validates the config, then all raise the same error together
    cfg = world_comm().agree(lambda: load_config(args.config, args.set))
    summary = train(cfg, resume=args.resume)
    if _world_rank() == 0:
        print(json.dumps(summary))
    return EXIT_PREEMPTED if summary["stopped_by"] else 0


def _generate(args) -> None:
    import numpy as np

    from hpc_llm.api import load_model_and_tokenizer
    from hpc_llm.generate import generate

    model, tok = load_model_and_tokenizer(args.checkpoint, backend=args.backend)
    prompt = tok.encode(args.prompt or "\n")
    out = generate(model, np.asarray(prompt)[None].repeat(args.num_samples, 0), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    for i, row in enumerate(out):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(tok.decode(row))


def _inspect(args) -> None:
    from hpc_llm.inspect_ckpt import run

    run(args.checkpoints)


def _import_gpt2(args) -> None:
    from hpc_llm.gpt2_import import import_gpt2

    path = import_gpt2(args.model_dir, args.out)
    print(f"wrote {path}")


def _bench_comm(args) -> None:
    from hpc_llm.bench_comm import run_from_args

    run_from_args(args)


def _world_rank() -> int:
    """This process's rank under mpiexec/srun (from the launcher's environment, before MPI is initialised)."""
    for var in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpc-llm", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="text files/folders -> token files (train.bin, val.bin, meta.json)")
    s.add_argument("inputs", nargs="*", help="text files or folders (recursed)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--stdlib", action="store_true", help="use the Python standard library's sources as the corpus")
    s.add_argument("--max-bytes", type=int, default=8_000_000, help="size cap of the --stdlib corpus")
    s.add_argument("--tokenizer", choices=("byte", "char"), default="byte")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--pattern", default="*", help="glob for files inside folders, e.g. '*.txt'")
    s.set_defaults(func=_prepare)

    s = sub.add_parser("train", help="train a model from a TOML config")
    s.add_argument("config", help="TOML config file (see inputs/)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    s.add_argument("--resume", metavar="CKPT|auto", help="continue from a checkpoint, or the newest verified one")
    s.set_defaults(func=_train)

    s = sub.add_parser("generate", help="sample text from a checkpoint")
    s.add_argument("checkpoint", help="a checkpoint file, or a run directory (its newest verified checkpoint)")
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    s.set_defaults(func=_generate)

    s = sub.add_parser("inspect", help="print a checkpoint's contents and tensor statistics, or compare two")
    s.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="one checkpoint (file or run directory) to describe, or two to compare")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("import-gpt2", help="convert a Hugging Face GPT-2 directory (safetensors) to a checkpoint")
    s.add_argument("model_dir", help="directory with config.json and model.safetensors")
    s.add_argument("--out", required=True, help="checkpoint file to write (.h5)")
    s.set_defaults(func=_import_gpt2)

    s = sub.add_parser("bench", help="benchmarks (run under mpiexec): comm")
    bench = s.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("comm", help="collectives through our Comm wrappers: time, algbw, busbw, vs plain mpi4py")
    from hpc_llm.bench_comm import add_arguments as add_bench_comm_arguments

    add_bench_comm_arguments(b)
    b.set_defaults(func=_bench_comm)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if _world_rank() == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    try:
        return args.func(args) or 0
    except UserError as e:
        sys.stderr.write(f"hpc-llm: error: {e}\n")  # one write: MPI launchers interleave ranks' partial lines
        sys.stderr.flush()
        return 2


if __name__ == "__main__":
    sys.exit(main())
