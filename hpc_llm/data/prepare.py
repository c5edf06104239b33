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

import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_llm.data.corpus import expand_inputs, read_text, stdlib_corpus_files, stdlib_root
from hpc_llm.data.pieces import (
    Budget,
    Encoded,
    Layout,
    Plan,
    Progress,
    Scanned,
    encode_text,
    my_pieces,
    plan_pieces,
    segments,
)
from hpc_llm.data.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    check_bpe_vocab_size,
    ids_dtype,
    make_tokenizer,
)
from hpc_llm.data.tokens import (
    FORMAT,
    FORMAT_VERSION,
    SPLITS,
    SplitWriter,
    create_split_files,
    dtype_name,
    encode_meta,
    split_file,
)
from hpc_llm.errors import UserError
from hpc_llm.parallel.comm import Comm
from hpc_llm.runtime.faults import inject
from hpc_llm.runtime.fsio import DirectoryLock, atomic_write_bytes, check_writable, same_file

log = logging.getLogger(__name__)

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


LOCK_NAME = ".prepare.lock"
# a prepare's temporary files: this version's (the run's tag in the name) and, without a tag, those of earlier ones
_TEMPORARY = re.compile(
    r"\.prepare\.[0-9a-f]{8}\.(part[0-9]+|(train|val)\.bin\.[a-z0-9_]{8})\.tmp|\.(train|val)\.bin\.[a-z0-9_]{8}\.tmp"
)


def temp_prefix(tag: str) -> str:
    """How this run's temporary files begin (the tag: the run's identity, the same on every rank)."""
    return f".prepare.{tag}."


def remove_stale_temporaries(out: Path) -> None:
    """Rank 0, holding the output directory's lock: the temporary files a killed prepare left, and only those."""
    n, size = 0, 0
    for entry in os.scandir(out):
        if _TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                size += entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
                n += 1
            except FileNotFoundError:
                pass
    if n:
        log.info(
            "prepare: removed %d temporary file%s (%.1f MB) left in %s by an interrupted prepare",
            n,
            "" if n == 1 else "s",
            size / 1e6,
            out,
        )


def output_names() -> list[str]:
    """The files prepare writes in its output directory."""
    return [split_file(split) for split in SPLITS] + ["meta.json"]


def check_out_dir(out: Path, inputs: list, files: list, force: bool) -> None:
    """The output directory is never an input, nor holds a file prepare writes that is an input (given by name: an
    output directory inside an input folder is left out of `files`); one holding an earlier preparation's files
    (train.bin, val.bin or meta.json; anything else in it is never touched) is refused unless ``force``."""
    outputs = [out / name for name in output_names()]
    for given in inputs:
        if same_file(out, Path(given)):
            raise UserError(
                f"prepare --out {out}: is the input {given}; choose another output directory"
            )
    for f in [Path(g) for g in inputs] + list(files):
        for o in outputs:
            if same_file(f, o):
                raise UserError(
                    f"prepare --out {out}: its {o.name} is the input {f}; writing it would destroy it: "
                    "choose another output directory"
                )
    held = [o.name for o in outputs if o.exists() or o.is_symlink()]
    if held and not force:
        raise UserError(
            f"prepare --out {out}: holds {', '.join(held)} of an earlier preparation: give --force to "
            "replace them"
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
        _remove_created([str(p) for p in created])
        raise
    lock.created = not had_lock
    lock.claim()
    remove_stale_temporaries(out)
    plan = Plan([str(f) for f in files], pieces, [str(p) for p in created], secrets.token_hex(4))
    return plan, lock


def _remove_created(created: list[str]) -> None:
    for d in created:  # deepest first
        try:
            os.rmdir(d)
        except OSError:
            pass


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


class Preparation:
    """One prepare on one rank, step by step; each step that can fail runs under comm.agree (a failure is every
    rank's). What the steps share is here: the plan, this rank's run of pieces and part file, the tokenizer, the
    per-piece records, the layout and the temporary outputs."""

    def __init__(
        self, plan: Plan, out: Path, options: Options, budget: Budget, comm, tok, sources, lock=None
    ):
        self.plan, self.out, self.options, self.budget, self.comm = plan, out, options, budget, comm
        self.tok, self.sources = tok, sources
        self.lock = lock  # rank 0: the output directory's, until the end
        self.files = [Path(f) for f in plan.files]
        self.pieces = plan.pieces
        self.part = out / f"{temp_prefix(plan.tag)}part{comm.rank}.tmp"
        self.tmp: list[str] = []  # this rank's temporary outputs not yet renamed into place
        self.mine = my_pieces(self.pieces, comm)
        self.my_bytes = sum(self.pieces[j].size for j in self.mine)
        self.show = comm.rank == 0
        self.where = f" (rank 0's share of {comm.size})" if comm.size > 1 else ""
        self.by_file: dict[int, list[int]] = {}  # file index -> its pieces
        for j, piece in enumerate(self.pieces):
            self.by_file.setdefault(piece.file, []).append(j)
        self.valid: list[bool] | None = None  # per piece, once a scan found which are text
        self.dtype: np.dtype | None = None  # the token files' ids, once the tokenizer is known
        self.sep: np.ndarray | None = None  # the tokens between two files
        self.records: list[Encoded] = []
        self.layout: Layout | None = None
        self.included: list[int] = []
        self.tmp_names: list[str] = []

    def run(self) -> dict:
        """Every step; afterwards (whatever happened) this rank's part file and temporary outputs are removed, and
        after an agreed user error the directories prepare created too."""
        try:
            self.choose_tokenizer()
            self.encode()
            self.lay_out()
            self.make_outputs()
            self.write()
            meta = self.metadata()
            self.finish(meta)
        except BaseException as e:
            self.cleanup(refused=isinstance(e, UserError))
            raise
        self.cleanup(refused=False)
        return meta

    def on_rank0(self, fn, what: str):
        """fn() on rank 0 alone, agreed (its failure is every rank's); the others get None."""
        return self.comm.agree(lambda: fn() if self.comm.rank == 0 else None, what)

    # -- the tokenizer ---------------------------------------------------------------------------------------------

    def read(self, j: int) -> str | None:
        piece = self.pieces[j]
        return read_text(self.files[piece.file], piece.start, piece.end)

    def included_files(self, valid: list[bool]) -> list[int]:
        """The files whose pieces are all text."""
        return [i for i in range(len(self.files)) if all(valid[j] for j in self.by_file.get(i, []))]

    def bytes_of(self, included: list[int]) -> int:
        return sum(self.pieces[j].size for i in included for j in self.by_file[i])

    def empty(self, included: list[int]):
        raise UserError(
            f"prepare: the corpus is empty ({len(included)} readable files, "
            f"{len(self.files) - len(included)} skipped as not UTF-8, pattern {self.options.pattern!r}); "
            "expected some text"
        )

    def choose_tokenizer(self) -> None:
        """char and bpe first scan which files are text (char: and their characters), then make the tokenizer (bpe:
        train it); byte and gpt2 have theirs. Then the ids' dtype and the tokens between two files."""
        tokenizer = self.options.tokenizer
        if tokenizer in ("char", "bpe"):
            parts = self.comm.allgather_objects(self.comm.agree(self.scan, "prepare scan"))
            scanned = [r for part in parts for r in part]
            self.valid = [s.is_text for s in scanned]
            included = self.included_files(self.valid)
            if self.bytes_of(included) == 0 and len(included) < 2:
                self.empty(included)
            if tokenizer == "char":
                chars = set("\n") if len(included) > 1 else set()  # the separator between files
                for i in included:
                    for j in self.by_file[i]:
                        chars.update(scanned[j].chars)
                self.tok = make_tokenizer("char", chars="".join(chars))
            else:
                trained = self.on_rank0(lambda: self.train_bpe(included), "prepare train")
                self.tok = BPETokenizer.from_json(self.comm.bcast_object(trained), "bpe")
        elif self.tok is None:
            self.tok = make_tokenizer(tokenizer)
        self.dtype = ids_dtype(self.tok.vocab_size)
        # char: "\n" is in the vocabulary exactly when there are two files to separate
        has_sep = not isinstance(self.tok, CharTokenizer) or "\n" in self.tok.chars
        self.sep = np.asarray(
            self.tok.encode("\n") if has_sep else [], dtype=self.dtype.newbyteorder("=")
        )

    def scan(self) -> list[Scanned]:
        """This rank's pieces: which are text, and (char) the characters of those that are."""
        prog, res = Progress(f"scan{self.where}", self.my_bytes, self.show), []
        for j in self.mine:
            text = self.read(j)
            chars = "".join(sorted(set(text))) if text and self.options.tokenizer == "char" else ""
            res.append(Scanned(text is not None, chars))
            prog.update(self.pieces[j].size)
        prog.close()
        return res

    def train_bpe(self, included: list[int]) -> str:
        """The JSON of a BPE trained on the text files' pieces, read again one by one."""
        return make_tokenizer(
            "bpe", vocab_size=self.options.vocab_size, texts=self.training_texts(included)
        ).json

    def training_texts(self, included: list[int]):
        prog = Progress("train BPE", self.bytes_of(included), True)
        for k, i in enumerate(included):
            for j in self.by_file[i]:
                text = self.read(j)
                yield from segments(text or "", self.budget.bpe_segment)
                prog.update(self.pieces[j].size)
            if k < len(included) - 1:
                yield "\n"
        prog.close()

    # -- the tokens ------------------------------------------------------------------------------------------------

    def encode(self) -> None:
        """Every rank encodes its pieces into its part file; all learn every piece's record."""
        parts = self.comm.allgather_objects(self.comm.agree(self.encode_mine, "prepare encode"))
        self.records = [r for part in parts for r in part]

    def encode_mine(self) -> list[Encoded]:
        # tests: a rank stuck here leaves its peers in the agreement, under the watchdog
        inject("encode")
        records = []
        prog = Progress(f"encode{self.where}", self.my_bytes, self.show)
        with open(self.part, "wb") as f:
            for j in self.mine:
                if self.valid is not None and not self.valid[j]:
                    records.append(Encoded(0, False, -1))
                else:
                    records.append(self.encode_piece(j, f))
                prog.update(self.pieces[j].size)
        prog.close()
        return records

    def encode_piece(self, j: int, f) -> Encoded:
        text = self.read(j)
        n, top = 0, -1
        if text is not None:
            for ids in encode_text(self.tok, text, self.budget):
                if ids.size:
                    f.write(ids.astype(self.dtype, copy=False).tobytes())
                    n += ids.size
                    top = max(top, int(ids.max()))
        return Encoded(n, text is not None, top)

    def lay_out(self) -> None:
        """The layout, computed by every rank from the same records; refuses an empty corpus or split."""
        self.included = included = self.included_files([r.is_text for r in self.records])
        pos, piece_pos, sep_pos = 0, {}, []
        for k, i in enumerate(included):
            for j in self.by_file[i]:
                piece_pos[j] = pos
                pos += self.records[j].n_tokens
            if k < len(included) - 1:
                sep_pos.append(pos)
                pos += len(self.sep)
        total = pos
        if total == 0:
            self.empty(included)
        val_fraction = self.options.val_fraction
        n_train = int(total * (1 - val_fraction))
        n_val = total - n_train
        if n_train == 0 or n_val == 0:
            raise UserError(
                f"prepare: the corpus has only {total} tokens, too few to split with val_fraction "
                f"{val_fraction} (both splits must be non-empty)"
            )
        max_id = max(
            [self.records[j].max_id for i in included for j in self.by_file[i]]
            + ([int(self.sep.max())] if sep_pos else [])
        )
        self.layout = Layout(piece_pos, sep_pos, n_train, n_val, max_id)

    # -- the files -------------------------------------------------------------------------------------------------

    def make_outputs(self) -> None:
        """Rank 0 creates temporary train/val files of their final size; every rank learns their names."""
        sizes = (self.layout.n_train, self.layout.n_val)
        made = self.on_rank0(
            lambda: create_split_files(
                self.out, sizes, self.dtype, self.tmp, temp_prefix(self.plan.tag)
            ),
            "prepare outputs",
        )
        self.tmp_names = self.comm.bcast_object(made)

    def write(self) -> None:
        self.comm.agree(self.write_mine, "prepare write")

    def write_mine(self) -> None:
        """Every rank: its pieces' ids (and rank 0 the separators) at their offsets, synced."""
        inject("prepare")  # tests: a rank killed with every temporary file on disk
        with SplitWriter(self.tmp_names, self.layout.n_train, self.dtype) as out:
            self.copy_part(out)
            if self.comm.rank == 0:
                for at in self.layout.sep_pos:
                    out.put(at, self.sep)
            out.sync()

    def copy_part(self, out: SplitWriter) -> None:
        """This rank's part file into the outputs, a bounded chunk at a time."""
        dtype, records, piece_pos = self.dtype, self.records, self.layout.piece_pos
        total = sum(records[j].n_tokens for j in self.mine if j in piece_pos) * dtype.itemsize
        prog = Progress(f"write{self.where}", total, self.show)
        with open(self.part, "rb") as f:
            chunk = max(1, self.budget.copy_bytes // dtype.itemsize)
            for j in self.mine:
                n = records[j].n_tokens
                if j not in piece_pos:  # a piece of a skipped file: its ids are passed over
                    f.seek(n * dtype.itemsize, os.SEEK_CUR)
                    continue
                done = 0
                while done < n:
                    ids = np.frombuffer(f.read(min(chunk, n - done) * dtype.itemsize), dtype=dtype)
                    out.put(piece_pos[j] + done, ids)
                    done += len(ids)
                    prog.update(ids.nbytes)
        prog.close()

    def metadata(self) -> dict:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.tok.meta(),
            "dtype": dtype_name(self.dtype),
            "max_id": self.layout.max_id,
            "n_train": self.layout.n_train,
            "n_val": self.layout.n_val,
            "n_files": len(self.included),
            "n_skipped": len(self.files) - len(self.included),
            "sources": self.sources,
        }
        if "tokenizer_json" in meta:  # the long field last: meta.json stays readable at a glance
            meta["tokenizer_json"] = meta.pop("tokenizer_json")
        return meta

    def finish(self, meta: dict) -> None:
        self.on_rank0(lambda: self.publish(meta), "prepare finish")

    def publish(self, meta: dict) -> None:
        """Rank 0: the old meta goes first (until the new one is written the directory is visibly unprepared, never
        a mix), then the token files are renamed into place and meta.json written last."""
        meta_path = self.out / "meta.json"
        meta_path.unlink(missing_ok=True)
        for tmp, split in zip(self.tmp_names, SPLITS):
            os.replace(tmp, self.out / split_file(split))
        self.tmp.clear()
        atomic_write_bytes(meta_path, encode_meta(meta))

    def cleanup(self, refused: bool) -> None:
        """Remove this rank's part file and temporary outputs; after an agreed user error (`refused`), also the
        directories that prepare created (rank 0, once every rank removed its part): the disk is as it was."""
        for p in [self.part, *self.tmp]:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if refused and self.plan.created:
            self.comm.wait_idle("prepare cleanup")
        if self.lock is not None:
            # a prepared directory holds its three files only; a refused prepare leaves the disk as it was
            if self.lock.created or not refused:
                (self.out / LOCK_NAME).unlink(missing_ok=True)
            self.lock.release()
            self.lock = None
        if refused and self.plan.created and self.comm.rank == 0:
            _remove_created(self.plan.created)


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
