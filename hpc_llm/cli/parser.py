"""The command line's argparse tables: one function per verb adds its parser, its flags and help, and the function
of hpc_llm.cli.commands (plan: hpc_llm.cli.plan_command) that runs it."""

from __future__ import annotations

import argparse
import math

from hpc_llm.bench.comm import add_arguments as add_bench_comm_arguments
from hpc_llm.cli import commands, plan_command
from hpc_llm.runtime.faults import DEFAULT_COMM_TIMEOUT_S
from hpc_llm.tools.hf_export import DTYPES

DESCRIPTION = (
    "hpc-llm: prepare, train, generate, eval, inspect, import-gpt2, export-hf, merge-lora, prune, plan, "
    "bench (comm, calibrate)."
)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an argument missing, an int that is not one, a choice not offered) printed as every user
    error is: one line, exit 2 (argparse's usage block would make it several, on every rank)."""

    def error(self, message):
        self.exit(2, f"hpc-llm: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hpc-llm", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _add_prepare,
        _add_train,
        _add_generate,
        _add_eval,
        _add_inspect,
        _add_import_gpt2,
        _add_export_hf,
        _add_merge_lora,
        _add_prune,
        _add_plan,
        _add_bench,
    ):
        add(sub)
    return p


def _timeout_seconds(text: str) -> float:
    """--comm-timeout-s's value: a finite number of seconds >= 0 (argparse turns the error into one line, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"expected a non-negative number of seconds (0: off), got {text!r}"
        )
    return value


def _add_comm_timeout(s, train: bool = False) -> None:
    """The watchdog's timeout for a verb that talks to other ranks (cli.main arms it before the verb runs)."""
    s.add_argument(
        "--comm-timeout-s",
        type=_timeout_seconds,
        default=DEFAULT_COMM_TIMEOUT_S,
        metavar="SECONDS",
        help="abort the whole job when a rank waits longer than this in one MPI operation (a peer dead, hung "
        f"or stuck), naming the operation; 0: never (default {DEFAULT_COMM_TIMEOUT_S:g})"
        + ("; until the config is read, then parallel.comm_timeout_s holds" if train else ""),
    )


def _add_prepare(sub) -> None:
    s = sub.add_parser(
        "prepare", help="text files/folders -> token files (train.bin, val.bin, meta.json)"
    )
    s.add_argument("inputs", nargs="*", help="text files or folders (recursed)")
    s.add_argument(
        "--out",
        required=True,
        help="output directory (made if missing; one already holding train.bin, val.bin or meta.json needs "
        "--force)",
    )
    s.add_argument(
        "--force",
        action="store_true",
        help="replace the token files of an earlier preparation in --out (refused without it)",
    )
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
    _add_comm_timeout(s)
    s.set_defaults(func=commands.run_prepare)


def _add_train(sub) -> None:
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
    s.add_argument(
        "--cluster",
        metavar="FILE",
        help='with parallel.layout = "auto": the machine\'s cluster file (hpc-llm bench calibrate writes one)',
    )
    _add_comm_timeout(s, train=True)
    s.set_defaults(func=commands.run_train)


def _add_generate(sub) -> None:
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
        "--force", action="store_true", help="replace an existing --out file (never an input)"
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
    _add_comm_timeout(s)
    s.set_defaults(func=commands.run_generate)


def _add_eval(sub) -> None:
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
    _add_comm_timeout(s)
    s.set_defaults(func=commands.run_eval)


def _add_inspect(sub) -> None:
    s = sub.add_parser(
        "inspect", help="print a checkpoint's contents and tensor statistics, or compare two"
    )
    s.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="one checkpoint (file or run directory) to describe, or two to compare",
    )
    s.set_defaults(func=commands.run_inspect)


def _add_import_gpt2(sub) -> None:
    s = sub.add_parser(
        "import-gpt2", help="convert a Hugging Face GPT-2 directory (safetensors) to a checkpoint"
    )
    s.add_argument(
        "model_dir",
        help="directory with config.json and model.safetensors (and the tokenizer: "
        "tokenizer.json, or vocab.json + merges.txt, when present)",
    )
    s.add_argument(
        "--out", required=True, help="checkpoint file to write (.h5; an existing one needs --force)"
    )
    s.add_argument("--force", action="store_true", help="replace an existing --out file")
    s.set_defaults(func=commands.run_import_gpt2)


def _add_export_hf(sub) -> None:
    s = sub.add_parser(
        "export-hf", help="write a checkpoint as a Hugging Face GPT-2 directory (docs/export.md)"
    )
    s.add_argument(
        "checkpoint", help="a checkpoint file, or a run directory (its newest verified one)"
    )
    s.add_argument(
        "--out",
        required=True,
        help="directory to write (made; an existing non-empty one needs --force)",
    )
    s.add_argument(
        "--dtype",
        default="fp32",
        choices=sorted(DTYPES),
        help="the tensors' format in model.safetensors (default fp32; bf16/fp16 rounded to nearest even)",
    )
    s.add_argument(
        "--force", action="store_true", help="replace an existing --out directory (never an input)"
    )
    s.set_defaults(func=commands.run_export_hf)


def _add_merge_lora(sub) -> None:
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
    s.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file (never the input checkpoint)",
    )
    s.set_defaults(func=commands.run_merge_lora)


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected block indices separated by commas (e.g. 0,1,3), got {text!r}"
        ) from None


def _add_prune(sub) -> None:
    s = sub.add_parser(
        "prune",
        help="remove attention heads, MLP neurons and blocks by weight magnitude: a smaller checkpoint "
        "(docs/compression.md)",
    )
    s.add_argument(
        "checkpoint", help="a checkpoint file, or a run directory (the newest verified one)"
    )
    s.add_argument(
        "--heads",
        type=_fraction,
        help="the fraction of each block's attention heads to remove, in (0, 1)",
    )
    s.add_argument(
        "--mlp",
        type=_fraction,
        help="the fraction of each block's MLP neurons to remove, in (0, 1)",
    )
    s.add_argument(
        "--layers",
        type=_layer_list,
        help="the blocks to keep, increasing (e.g. 0,1,3; default: all)",
    )
    s.add_argument(
        "--out", required=True, help="checkpoint file to write (.h5), in an existing directory"
    )
    s.add_argument(
        "--force", action="store_true", help="replace an existing --out file (never the input)"
    )
    s.set_defaults(func=commands.run_prune)


def _add_plan(sub) -> None:
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
    s.add_argument(
        "--layout",
        metavar="KEY=VALUE,...",
        help="price this one layout, no search: the config's with these keys replaced (pp, tp, dp, zero, sp, "
        "schedule, virtual, micro, mbs, recompute, precision, act_comm, send_depth; docs/planning.md), e.g. "
        "pp=8,tp=8,dp=1,schedule=interleaved,virtual=3,micro=64,mbs=1,sp=1,recompute=selective,act_comm=bf16",
    )
    s.add_argument("--timeline", metavar="PNG", help="draw the best layout's pipeline schedule")
    s.add_argument("--force", action="store_true", help="replace an existing --timeline file")
    s.add_argument(
        "--compare",
        metavar="RUN_DIR",
        help="a finished run: its measured step beside the prediction",
    )
    s.set_defaults(func=plan_command.run_plan)


def _add_bench(sub) -> None:
    s = sub.add_parser("bench", help="benchmarks (run under mpiexec): comm, calibrate")
    bench = s.add_subparsers(dest="bench", required=True)
    b = bench.add_parser(
        "comm", help="collectives through our Comm wrappers: time, algbw, busbw, vs plain mpi4py"
    )
    add_bench_comm_arguments(b)
    _add_comm_timeout(b)
    b.add_argument("--force", action="store_true", help="replace an existing --json file")
    b.set_defaults(func=commands.run_bench_comm)
    b = bench.add_parser(
        "calibrate",
        help="measure this machine's figures for `hpc-llm plan` (run under "
        "`mpiexec -n 2` to measure the links too)",
    )
    b.add_argument(
        "--out",
        default="inputs/clusters/this_machine.toml",
        help="cluster file to write (an existing one needs --force)",
    )
    _add_comm_timeout(b)
    b.add_argument("--force", action="store_true", help="replace an existing --out file")
    b.set_defaults(func=commands.run_bench_calibrate)
