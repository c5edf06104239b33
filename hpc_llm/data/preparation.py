"""One prepare on one rank, step by step (prepare.py plans it and starts it): encoding this rank's run of pieces into
its part file, the per-piece records allgathered, the layout every rank computes, each rank's pieces written at their
offsets, and rank 0's renames and meta.json.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpc_llm.data.corpus import read_text
from hpc_llm.data.pieces import (
    Budget,
    Encoded,
    Layout,
    Plan,
    Progress,
    Scanned,
    encode_text,
    my_pieces,
    segments,
)
from hpc_llm.data.prepare_dir import LOCK_NAME, remove_created, temp_prefix
from hpc_llm.data.tokenizer import BPETokenizer, CharTokenizer, ids_dtype, make_tokenizer
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
from hpc_llm.runtime.faults import inject
from hpc_llm.runtime.fsio import atomic_write_bytes

if TYPE_CHECKING:  # prepare.py imports this module: its Options for annotations only
    from hpc_llm.data.prepare import Options


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
            remove_created(self.plan.created)
