"""Preparing token files (hpc_llm/data/tokens.py) from a corpus at any size: streaming, in bounded memory, on any
number of ranks.

Rank 0 plans the pieces (hpc_llm/data/pieces.py) before any text is read. Ranks encode contiguous runs of pieces into
part files; the per-piece token counts are allgathered, every rank computes the same layout, each writes its pieces
at their offsets into train.bin/val.bin (temporary names), and rank 0 renames them and writes meta.json last. The
token stream is what the whole-corpus encoding gives: files in order, each followed (but the last) by the tokens of
"\\n"; a file that is not UTF-8 is skipped. Every step runs under comm.agree, so a failure on one rank is the same
failure on all, and a refused prepare leaves the disk as it was.

Temporary files carry the run's tag (agreed: rank 0 draws it, the plan broadcasts it): `.prepare.TAG.partR.tmp`
(rank R's ids) and `.prepare.TAG.train.bin.XXXXXXXX.tmp` (the outputs before their rename). A run killed mid-way (a
rank SIGKILLed, the OOM killer, a time limit) leaves them, possibly hundreds of MB; the next prepare into the same
output directory removes them (rank 0, holding `.prepare.lock` there: one live prepare per output directory, so what
it removes is a dead run's; the lock file goes at the end), with one log line naming how many and how large. Only
those name patterns are removed (and `.train.bin.XXXXXXXX.tmp` / `.val.bin...` of versions before the tag), never
anything else. An output directory inside an input folder is never read as input (one log line says so).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from hpc_llm.data.corpus import expand_inputs, stdlib_corpus_files, stdlib_root
from hpc_llm.data.pieces import Budget, Plan, plan_pieces
from hpc_llm.data.preparation import Preparation
from hpc_llm.data.prepare_dir import (
    LOCK_NAME,
    check_out_dir,
    remove_created,
    remove_stale_temporaries,
)
from hpc_llm.data.tokenizer import check_bpe_vocab_size, make_tokenizer
from hpc_llm.errors import UserError
from hpc_llm.parallel.comm import Comm
from hpc_llm.runtime.fsio import DirectoryLock, check_writable

# prepare's names; gpt2: a Hugging Face tokenizer directory
TOKENIZERS = ("byte", "char", "bpe", "gpt2")
DEFAULT_MEMORY_MB = 256
MIN_MEMORY_MB = 4


@dataclass(frozen=True)
class Options:
    """What prepare was asked for, beyond the inputs and the output directory."""

    tokenizer: str
    val_fraction: float
    pattern: str
    vocab_size: int | None
    tokenizer_dir: object
    memory_mb: int

    def check(self) -> None:
        vf, mb = self.val_fraction, self.memory_mb
        if not isinstance(vf, (int, float)) or isinstance(vf, bool) or not 0 < vf < 1:
            raise UserError(
                f"prepare: val_fraction is {vf!r}, expected a number strictly between 0 and 1"
            )
        if self.tokenizer not in TOKENIZERS:
            raise UserError(
                f"prepare: tokenizer is {self.tokenizer!r}, expected one of {', '.join(TOKENIZERS)}"
            )
        if self.tokenizer == "bpe":
            if self.vocab_size is None:
                raise UserError(
                    "prepare: --tokenizer bpe trains a BPE and needs --vocab-size N (e.g. 8192)"
                )
            check_bpe_vocab_size(self.vocab_size)
        elif self.vocab_size is not None:
            raise UserError(
                f"prepare: --vocab-size is for --tokenizer bpe (training), not {self.tokenizer}"
            )
        if (self.tokenizer == "gpt2") != (self.tokenizer_dir is not None):
            raise UserError(
                "prepare: --tokenizer gpt2 goes with --tokenizer-dir DIR (a Hugging Face tokenizer "
                "directory), and --tokenizer-dir with --tokenizer gpt2"
            )
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < MIN_MEMORY_MB:
            raise UserError(
                f"prepare: memory_mb is {mb!r}, expected an integer of at least {MIN_MEMORY_MB} (MB)"
            )


def _plan(out: Path, inputs: list, pattern: str, budget: Budget, force: bool):
    """Rank 0: the files and their pieces, then the output directory (nothing is written before it), checked against
    the inputs, locked, and cleared of a dead run's temporary files. (the plan, the lock)"""
    if out.exists() and not out.is_dir():
        raise UserError(f"prepare: output directory {str(out)!r} is a file, expected a directory")
    files = expand_inputs(inputs, pattern, exclude=out)
    check_out_dir(out, inputs, files, force)
    check_writable(out, f"prepare --out {out}")
    pieces = plan_pieces(files, budget.piece)
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"prepare: cannot create output directory {str(out)!r} ({e.strerror or e})"
        ) from None
    had_lock = (out / LOCK_NAME).exists()
    try:
        lock = DirectoryLock.lock(out, "prepare: output directory", name=LOCK_NAME)
    except UserError:
        remove_created([str(p) for p in created])
        raise
    lock.created = not had_lock
    lock.claim()
    remove_stale_temporaries(out)
    plan = Plan([str(f) for f in files], pieces, [str(p) for p in created], secrets.token_hex(4))
    return plan, lock


def prepare(
    inputs: list,
    out_dir,
    tokenizer: str = "byte",
    val_fraction: float = 0.1,
    pattern: str = "*",
    vocab_size: int | None = None,
    tokenizer_dir=None,
    memory_mb: int = DEFAULT_MEMORY_MB,
    comm=None,
    piece_bytes: int | None = None,
    force: bool = True,
) -> dict:
    """Tokenize text files into out_dir/{train.bin,val.bin,meta.json}, streaming in about `memory_mb` MB per rank;
    returns the metadata written. tokenizer: "byte", "char", "bpe" (trained here, `vocab_size` tokens) or "gpt2" (the
    Hugging Face tokenizer in `tokenizer_dir`). comm=world_comm(): every rank of the job calls it and they share the
    work (`mpiexec hpc-llm prepare`); the files are the single-process ones, byte for byte. comm=None: this process
    alone (the Python API: a script under mpiexec must not make it collective by accident). piece_bytes overrides
    the piece size (tests). force=False: an out_dir already holding token files is refused (the command line's
    default; --force); the output is never one of the inputs."""
    comm = comm if comm is not None else Comm(None)
    options = Options(tokenizer, val_fraction, pattern, vocab_size, tokenizer_dir, memory_mb)
    options.check()
    input_list = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not input_list:
        raise UserError("prepare: no inputs given (expected at least one file or folder)")
    out = Path(out_dir)
    budget = Budget(memory_mb, tokenizer, piece_bytes)
    tok = None
    # every rank reads the directory (agreed: a bad one is the same error on all)
    if tokenizer == "gpt2":
        tok = comm.agree(lambda: make_tokenizer("gpt2", tokenizer_dir=tokenizer_dir))
    planned = comm.agree(
        lambda: _plan(out, input_list, pattern, budget, force) if comm.rank == 0 else (None, None)
    )
    plan, lock = comm.bcast_object(planned[0]), planned[1]
    sources = [str(p) for p in input_list[:5]]
    return Preparation(plan, out, options, budget, comm, tok, sources, lock).run()


def prepare_stdlib(
    out_dir,
    max_bytes: int = 8_000_000,
    tokenizer: str = "byte",
    val_fraction: float = 0.1,
    **kwargs,
) -> dict:
    """prepare() of the embedded corpus; kwargs: prepare's (vocab_size, tokenizer_dir, memory_mb, comm)."""
    files = stdlib_corpus_files(max_bytes)
    if not files:
        raise UserError(
            f"stdlib corpus: no .py files of at most {max_bytes} bytes found under {stdlib_root()}"
        )
    return prepare(files, out_dir, tokenizer=tokenizer, val_fraction=val_fraction, **kwargs)
