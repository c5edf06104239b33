"""Token files, preparing them from a corpus at any size (streaming, in bounded memory, on any number of ranks), and
the deterministic batch sampler. The tokenizers are in hpc_llm/data/tokenizer.py.

A prepared data directory holds three files (docs/data.md):

    train.bin   raw little-endian token ids, uint16 (vocabulary <= 65536) or uint32: the first 1 - val_fraction
    val.bin     the same for the rest
    meta.json   {"format": "hpc_llm-tokens", "format_version": 2, "tokenizer": ..., "vocab_size": ..., "dtype":
                "uint16" | "uint32", "max_id": ..., "n_train": ..., "n_val": ..., ...}

Format version 1 (no "dtype", no "max_id") is read as uint16.

Batches are a pure function of (seed, stream, step, micro): no sampler state exists, so a resumed run sees exactly
the batches it would have seen, and data-parallel ranks take disjoint row slices of one global batch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from hpc_llm.errors import UserError
from hpc_llm.runtime.fsio import atomic_write_bytes
from hpc_llm.data.tokenizer import (
    MAX_VOCAB,
    BPETokenizer,
    CharTokenizer,
    check_bpe_vocab_size,
    ids_dtype,
    make_tokenizer,
    tokenizer_from_meta,
)

log = logging.getLogger(__name__)

FORMAT = "hpc_llm-tokens"
FORMAT_VERSION = 2  # 2: "dtype" (uint16 or uint32) and "max_id"; version 1 files are uint16
# Explicit little-endian so token files move between machines unchanged (identical to np.uint16 on x86/ARM).
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SPLITS = ("train", "val")
TOKENIZERS = (
    "byte",
    "char",
    "bpe",
    "gpt2",
)  # prepare's names; gpt2: a Hugging Face tokenizer directory
DEFAULT_MEMORY_MB = 256
MIN_MEMORY_MB = 4
# Names of the sampler streams, used only to make error messages name the split.
_STREAM_NAMES = {0: "train", 1: "val"}


# --------------------------------------------------------------------------------------------------------------------
# Preparing token files
#
# The corpus is cut into pieces (a whole small file, or a byte range of a large one ending at a line break), planned
# by rank 0 before any text is read, so the cut never depends on the number of ranks. Ranks encode contiguous runs of
# pieces into part files; the per-piece token counts are allgathered, every rank computes the same layout, each writes
# its pieces at their offsets into train.bin/val.bin (temporary names), and rank 0 renames them and writes meta.json
# last. The token stream is what the whole-corpus encoding gives: files in order, each followed (but the last) by the
# tokens of "\n"; a file that is not UTF-8 is skipped. Byte and char tokens do not depend on where a text is cut (they
# are per character, and cuts fall on character boundaries). BPE is cut only at a line break between two visible
# ASCII characters ("...x\ny..."), where GPT-2's byte-level pre-tokenizer always splits: encoding piece by piece is
# then exactly the whole file's encoding; a text without such a break for a whole piece is cut at any line break,
# or at a character boundary (the only cases where pieces can change BPE tokens). That holds for byte-level BPE only
# (a Metaspace pre-tokenizer or Prepend normalizer adds "▁" at every cut): --tokenizer-dir accepts only those
# (BPETokenizer.streaming_problem).


def _expand_inputs(inputs, pattern: str) -> list[Path]:
    """Files named directly are always taken; folders contribute their files matching `pattern`, sorted."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                (f for f in p.rglob(pattern) if f.is_file()),
                key=lambda f: f.relative_to(p).as_posix(),
            )
        elif p.is_file():
            found = [p]
        else:
            raise UserError(
                f"prepare: input {str(p)!r} does not exist (expected a file or a folder)"
            )
        for f in found:
            key = f.resolve()
            if key not in seen:  # a file named both directly and through its folder is read once
                seen.add(key)
                files.append(f)
    return files


# "\n" between two visible ASCII characters: GPT-2's pre-tokenizer splits there whatever surrounds it (a token that
# holds "\n" is whitespace only, and neither neighbour is whitespace), so both sides encode as in the whole text
_SAFE_BREAK_BYTES = re.compile(rb"(?<=[!-~])\n(?=[!-~])")
_SAFE_BREAK_STR = re.compile(r"(?<=[!-~])\n(?=[!-~])")
_CUT_WINDOW = 1 << 16  # bytes searched past a piece's nominal end for a break


class _Budget:
    """Sizes derived from --memory-mb. Peak memory per rank is about the piece's bytes times a factor (measured,
    docs/data.md): raw bytes + the decoded str + the ids (byte: 2 B/char; char: the UTF-32 copy and int64
    searchsorted result, ~20 B/char; BPE: tokenizers' Encoding objects, ~50 B per character of the batch encoded at
    once). A part-file copy moves one piece's worth of ids at a time."""

    def __init__(self, memory_mb: int, tokenizer: str, piece_bytes: int | None = None):
        budget = memory_mb << 20
        self.piece = piece_bytes or max(4096, budget // {"byte": 16, "char": 64}.get(tokenizer, 32))
        self.bpe_batch = max(4096, min(self.piece, budget // 256))  # characters encoded in one call
        self.bpe_segment = max(
            1024, min(1 << 16, self.bpe_batch // 8)
        )  # strings in that call (threads share them)
        self.copy_bytes = max(4096, budget // 8)


def _cut(fh, target: int, size: int) -> int:
    """A piece boundary at or after byte `target` of an open file: the first safe line break in the window after it,
    else the first line break, else the first UTF-8 character start (never inside a character)."""
    fh.seek(target - 1)
    window = fh.read(_CUT_WINDOW + 2)
    for pattern in (_SAFE_BREAK_BYTES, re.compile(rb"\n")):
        m = pattern.search(window, 1)
        if m:
            return min(size, target - 1 + m.end())
    for i in range(1, len(window)):
        if window[i] & 0xC0 != 0x80:
            return min(size, target - 1 + i)
    return min(size, target - 1 + len(window))


def _plan(files: list[Path], piece_bytes: int) -> list[tuple[int, int, int]]:
    """(file index, start, end) byte ranges covering every file in order; an empty file is one empty piece."""
    pieces = []
    for i, f in enumerate(files):
        try:
            size = f.stat().st_size
            with open(f, "rb") as fh:
                start = 0
                while True:
                    end = (
                        size if size - start <= piece_bytes else _cut(fh, start + piece_bytes, size)
                    )
                    pieces.append((i, start, end))
                    start = end
                    if start >= size:
                        break
        except OSError as e:
            raise UserError(f"prepare: cannot read input {str(f)!r} ({e.strerror or e})") from None
    return pieces


def _read(files: list[Path], piece) -> str | None:
    """A piece's text, or None when its bytes are not UTF-8."""
    i, start, end = piece
    try:
        with open(files[i], "rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start)
    except OSError as e:
        raise UserError(
            f"prepare: cannot read input {str(files[i])!r} ({e.strerror or e})"
        ) from None
    if len(raw) != end - start:
        raise UserError(
            f"prepare: input {str(files[i])!r} changed while it was read (expected {end} bytes)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binaries and other encodings: skip rather than corrupt the token stream


def _segments(text: str, size: int):
    """Consecutive substrings of about `size` characters, cut where _SAFE_BREAK_STR allows (else at a line break,
    else anywhere at 2 x size): the strings one BPE call encodes side by side."""
    i, n = 0, len(text)
    while n - i > size:
        limit = min(n, i + 2 * size)
        m = _SAFE_BREAK_STR.search(text, i + size, limit)
        if m:
            j = m.end()
        else:
            k = text.find("\n", i + size, limit)
            j = k + 1 if k >= 0 else limit
        yield text[i:j]
        i = j
    if i < n or n == 0:
        yield text[i:]


def _encode_text(tok, text: str, budget: _Budget):
    """The ids of one piece's text, in chunks (BPE: a batch of segments per call, so memory follows the batch)."""
    if not isinstance(tok, BPETokenizer):
        yield tok.encode(text)
        return
    batch, chars = [], 0
    for seg in _segments(text, budget.bpe_segment):
        batch.append(seg)
        chars += len(seg)
        if chars >= budget.bpe_batch:
            yield from tok.encode_batch(batch)
            batch, chars = [], 0
    if batch:
        yield from tok.encode_batch(batch)


class _Progress:
    """A tqdm bar on a terminal (stderr a tty), else (a batch log) a line at every 10% or 30 s of a phase of at least
    LOG_MIN_BYTES: for rank 0's share only."""

    LOG_MIN_BYTES = 32 << 20

    def __init__(self, what: str, total: int, show: bool):
        self.what, self.total = what, max(total, 1)
        self.show = show and (total >= self.LOG_MIN_BYTES or sys.stderr.isatty())
        self.done, self.next_frac, self.t0 = 0, 0.1, time.monotonic()
        self.t_last = self.t0
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, desc=f"prepare: {what}", unit="B", unit_scale=True, file=sys.stderr
            )

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.show:
            now, frac = time.monotonic(), self.done / self.total
            if frac >= self.next_frac or now - self.t_last >= 30:
                log.info(
                    "prepare: %s %3.0f%% (%.1f of %.1f MB, %.1f MB/s)",
                    self.what,
                    100 * frac,
                    self.done / 1e6,
                    self.total / 1e6,
                    self.done / 1e6 / max(now - self.t0, 1e-9),
                )
                while self.next_frac <= frac:
                    self.next_frac += 0.1
                self.t_last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _my_pieces(pieces, comm) -> range:
    """This rank's contiguous run of pieces, the runs balanced by bytes."""
    sizes = [end - start for _, start, end in pieces]
    total = sum(sizes)
    if comm.size == 1 or total == 0:
        return range(len(pieces)) if comm.rank == 0 else range(0)
    owner, before = [], 0
    for s in sizes:
        owner.append(min(comm.size - 1, before * comm.size // total))
        before += s
    idx = [j for j, r in enumerate(owner) if r == comm.rank]
    return range(idx[0], idx[-1] + 1) if idx else range(0)


def _check_options(tokenizer, val_fraction, vocab_size, tokenizer_dir, memory_mb):
    if (
        not isinstance(val_fraction, (int, float))
        or isinstance(val_fraction, bool)
        or not 0 < val_fraction < 1
    ):
        raise UserError(
            f"prepare: val_fraction is {val_fraction!r}, expected a number strictly between 0 and 1"
        )
    if tokenizer not in TOKENIZERS:
        raise UserError(
            f"prepare: tokenizer is {tokenizer!r}, expected one of {', '.join(TOKENIZERS)}"
        )
    if tokenizer == "bpe":
        if vocab_size is None:
            raise UserError(
                "prepare: --tokenizer bpe trains a BPE and needs --vocab-size N (e.g. 8192)"
            )
        check_bpe_vocab_size(vocab_size)
    elif vocab_size is not None:
        raise UserError(f"prepare: --vocab-size is for --tokenizer bpe (training), not {tokenizer}")
    if (tokenizer == "gpt2") != (tokenizer_dir is not None):
        raise UserError(
            "prepare: --tokenizer gpt2 goes with --tokenizer-dir DIR (a Hugging Face tokenizer "
            "directory), and --tokenizer-dir with --tokenizer gpt2"
        )
    if not isinstance(memory_mb, int) or isinstance(memory_mb, bool) or memory_mb < MIN_MEMORY_MB:
        raise UserError(
            f"prepare: memory_mb is {memory_mb!r}, expected an integer of at least {MIN_MEMORY_MB} (MB)"
        )


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
) -> dict:
    """Tokenize text files into out_dir/{train.bin,val.bin,meta.json}, streaming in about `memory_mb` MB per rank;
    returns the metadata written. tokenizer: "byte", "char", "bpe" (trained here, `vocab_size` tokens) or "gpt2" (the
    Hugging Face tokenizer in `tokenizer_dir`). comm=world_comm(): every rank of the job calls it and they share the
    work (`mpiexec hpc-llm prepare`); the files are the single-process ones, byte for byte. comm=None: this process
    alone (the Python API: a script under mpiexec must not make it collective by accident). piece_bytes overrides
    the piece size (tests)."""
    from hpc_llm.parallel.comm import Comm

    comm = comm if comm is not None else Comm(None)
    _check_options(tokenizer, val_fraction, vocab_size, tokenizer_dir, memory_mb)
    input_list = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not input_list:
        raise UserError("prepare: no inputs given (expected at least one file or folder)")
    out = Path(out_dir)
    budget = _Budget(memory_mb, tokenizer, piece_bytes)
    # every rank reads the tokenizer directory (agreed: a bad one is the same error on all)
    tok = (
        comm.agree(lambda: make_tokenizer("gpt2", tokenizer_dir=tokenizer_dir))
        if tokenizer == "gpt2"
        else None
    )

    def plan():  # rank 0: the files and their pieces, then the output directory (nothing written before it)
        if out.exists() and not out.is_dir():
            raise UserError(
                f"prepare: output directory {str(out)!r} is a file, expected a directory"
            )
        files = _expand_inputs(input_list, pattern)
        pieces = _plan(files, budget.piece)
        created = [p for p in (out, *out.parents) if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(
                f"prepare: cannot create output directory {str(out)!r} ({e.strerror or e})"
            ) from None
        return [str(f) for f in files], pieces, [str(p) for p in created], secrets.token_hex(4)

    names, pieces, created, tag = comm.bcast_object(
        comm.agree(lambda: plan() if comm.rank == 0 else None)
    )
    files = [Path(f) for f in names]
    state = {"part": out / f".prepare.{tag}.part{comm.rank}.tmp", "tmp": []}
    sources = [str(p) for p in input_list[:5]]
    try:
        meta = _prepare_pieces(
            files,
            pieces,
            out,
            tokenizer,
            tok,
            vocab_size,
            val_fraction,
            pattern,
            budget,
            comm,
            state,
            sources,
        )
    except BaseException as e:
        _cleanup(
            state,
            created if isinstance(e, UserError) else [],
            comm,
            uniform=isinstance(e, UserError),
        )
        raise
    _cleanup(state, [], comm, uniform=False)
    return meta


def _cleanup(state: dict, created: list, comm, uniform: bool) -> None:
    """Remove this rank's part file and temporary outputs; after an agreed user error, also the directories that
    prepare created (rank 0, once every rank removed its part): a refused prepare leaves the disk as it was."""
    for p in [state["part"], *state["tmp"]]:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    if uniform and created:
        comm.wait_idle("prepare cleanup")
        if comm.rank == 0:
            for d in created:  # deepest first
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def _prepare_pieces(
    files,
    pieces,
    out,
    tokenizer,
    tok,
    vocab_size,
    val_fraction,
    pattern,
    budget,
    comm,
    state,
    sources,
) -> dict:
    mine = _my_pieces(pieces, comm)
    my_bytes = sum(pieces[j][2] - pieces[j][1] for j in mine)
    show = comm.rank == 0
    where = f" (rank 0's share of {comm.size})" if comm.size > 1 else ""
    by_file: dict[int, list[int]] = {}
    for j, (i, _, _) in enumerate(pieces):
        by_file.setdefault(i, []).append(j)

    def included_files(valid: list[bool]) -> list[int]:
        return [i for i in range(len(files)) if all(valid[j] for j in by_file.get(i, []))]

    valid = None  # per piece, once known
    if tokenizer in (
        "char",
        "bpe",
    ):  # a first pass: which files are text (and the characters of those that are)

        def scan():
            prog, res = _Progress(f"scan{where}", my_bytes, show), []
            for j in mine:
                text = _read(files, pieces[j])
                res.append(
                    (
                        text is not None,
                        "".join(sorted(set(text))) if text and tokenizer == "char" else "",
                    )
                )
                prog.update(pieces[j][2] - pieces[j][1])
            prog.close()
            return res

        scanned = [
            r for part in comm.allgather_objects(comm.agree(scan, "prepare scan")) for r in part
        ]
        valid = [v for v, _ in scanned]
        included = included_files(valid)
        if (
            sum(pieces[j][2] - pieces[j][1] for i in included for j in by_file[i]) == 0
            and len(included) < 2
        ):
            _empty(len(included), len(files) - len(included), pattern)
        if tokenizer == "char":
            chars = set("\n") if len(included) > 1 else set()  # the separator between files
            for i in included:
                for j in by_file[i]:
                    chars.update(scanned[j][1])
            tok = make_tokenizer("char", chars="".join(chars))
        else:

            def train():  # rank 0 trains on the text files' pieces, read again one by one
                def texts():
                    prog = _Progress(
                        "train BPE",
                        sum(pieces[j][2] - pieces[j][1] for i in included for j in by_file[i]),
                        True,
                    )
                    for k, i in enumerate(included):
                        for j in by_file[i]:
                            text = _read(files, pieces[j])
                            yield from _segments(text or "", budget.bpe_segment)
                            prog.update(pieces[j][2] - pieces[j][1])
                        if k < len(included) - 1:
                            yield "\n"
                    prog.close()

                return (
                    make_tokenizer("bpe", vocab_size=vocab_size, texts=texts()).json
                    if comm.rank == 0
                    else None
                )

            tok = BPETokenizer.from_json(
                comm.bcast_object(comm.agree(train, "prepare train")), "bpe"
            )
    elif tok is None:
        tok = make_tokenizer(tokenizer)
    dtype = ids_dtype(tok.vocab_size)
    native = dtype.newbyteorder("=")
    # the tokens between two files (char: "\n" is in the vocabulary exactly when there are two files to separate)
    sep = np.asarray(
        tok.encode("\n") if not isinstance(tok, CharTokenizer) or "\n" in tok.chars else [],
        dtype=native,
    )

    def encode():  # this rank's pieces -> its part file; per piece (tokens, valid, max id)
        records = []
        prog = _Progress(f"encode{where}", my_bytes, show)
        with open(state["part"], "wb") as f:
            for j in mine:
                if valid is not None and not valid[j]:
                    records.append((0, False, -1))
                else:
                    text = _read(files, pieces[j])
                    n, top = 0, -1
                    if text is not None:
                        for ids in _encode_text(tok, text, budget):
                            if ids.size:
                                f.write(ids.astype(dtype, copy=False).tobytes())
                                n += ids.size
                                top = max(top, int(ids.max()))
                    records.append((n, text is not None, top))
                prog.update(pieces[j][2] - pieces[j][1])
        prog.close()
        return records

    records = [
        r for part in comm.allgather_objects(comm.agree(encode, "prepare encode")) for r in part
    ]
    included = included_files([v for _, v, _ in records])
    # the layout: every rank computes the same one from the same records
    pos, piece_pos, sep_pos = 0, {}, []
    for k, i in enumerate(included):
        for j in by_file[i]:
            piece_pos[j] = pos
            pos += records[j][0]
        if k < len(included) - 1:
            sep_pos.append(pos)
            pos += len(sep)
    total = pos
    if total == 0:
        _empty(len(included), len(files) - len(included), pattern)
    n_train = int(total * (1 - val_fraction))
    n_val = total - n_train
    if n_train == 0 or n_val == 0:
        raise UserError(
            f"prepare: the corpus has only {total} tokens, too few to split with val_fraction "
            f"{val_fraction} (both splits must be non-empty)"
        )
    max_id = max(
        [records[j][2] for i in included for j in by_file[i]]
        + ([int(sep.max())] if sep_pos else [])
    )

    def make_outputs():  # rank 0: temporary train/val files of their final size
        names = []
        for name, n in (("train.bin", n_train), ("val.bin", n_val)):
            fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
            state["tmp"].append(tmp)
            os.ftruncate(fd, n * dtype.itemsize)
            os.close(fd)
            names.append(tmp)
        return names

    tmp_names = comm.bcast_object(
        comm.agree(lambda: make_outputs() if comm.rank == 0 else None, "prepare outputs")
    )

    def write():  # every rank: its pieces' ids (and rank 0 the separators) at their offsets
        fds = [os.open(t, os.O_WRONLY) for t in tmp_names]
        try:

            def put(at: int, ids: np.ndarray) -> None:
                k = max(0, min(len(ids), n_train - at))
                for fd, arr, off in ((fds[0], ids[:k], at), (fds[1], ids[k:], at + k - n_train)):
                    data = memoryview(arr.astype(dtype, copy=False).tobytes())
                    off *= dtype.itemsize
                    while data:
                        w = os.pwrite(fd, data, off)
                        data, off = data[w:], off + w

            prog = _Progress(
                f"write{where}",
                sum(records[j][0] for j in mine if j in piece_pos) * dtype.itemsize,
                show,
            )
            with open(state["part"], "rb") as f:
                chunk = max(1, budget.copy_bytes // dtype.itemsize)
                for j in mine:
                    n = records[j][0]
                    if j not in piece_pos:  # a piece of a skipped file: its ids are passed over
                        f.seek(n * dtype.itemsize, os.SEEK_CUR)
                        continue
                    done = 0
                    while done < n:
                        ids = np.frombuffer(
                            f.read(min(chunk, n - done) * dtype.itemsize), dtype=dtype
                        )
                        put(piece_pos[j] + done, ids)
                        done += len(ids)
                        prog.update(ids.nbytes)
            prog.close()
            if comm.rank == 0:
                for at in sep_pos:
                    put(at, sep)
            for fd in fds:
                os.fsync(fd)
        finally:
            for fd in fds:
                os.close(fd)

    comm.agree(write, "prepare write")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **tok.meta(),
        "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
        "max_id": max_id,
        "n_train": n_train,
        "n_val": n_val,
        "n_files": len(included),
        "n_skipped": len(files) - len(included),
        "sources": sources,
    }
    if "tokenizer_json" in meta:  # the long field last: meta.json stays readable at a glance
        meta["tokenizer_json"] = meta.pop("tokenizer_json")

    def finish():  # rank 0: the old meta goes first (until the new one is written the directory is visibly
        # unprepared, never a mix), then the token files are renamed into place and meta.json written last
        meta_path = out / "meta.json"
        meta_path.unlink(missing_ok=True)
        for tmp, name in zip(tmp_names, ("train.bin", "val.bin")):
            os.replace(tmp, out / name)
        state["tmp"].clear()
        atomic_write_bytes(
            meta_path, (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
        )

    comm.agree(lambda: finish() if comm.rank == 0 else None, "prepare finish")
    return meta


def _empty(n_files: int, n_skipped: int, pattern: str):
    raise UserError(
        f"prepare: the corpus is empty ({n_files} readable files, {n_skipped} skipped as not UTF-8, "
        f"pattern {pattern!r}); expected some text"
    )


# The standard library's tests, IDE and installed packages are excluded: they are big, repetitive or not stdlib.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_corpus_files(max_bytes: int = 8_000_000) -> list[Path]:
    """The embedded default corpus: this Python's own standard-library .py sources, up to max_bytes in total.

    Every machine with Python has it, so a first run needs no download; sorted order makes it the same corpus on
    every rank and every run of the same Python version.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise UserError(f"stdlib corpus: max_bytes is {max_bytes!r}, expected a positive integer")
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath) / name)
    found.sort(key=lambda f: f.relative_to(root).as_posix())

    files, total = [], 0
    for f in found:
        size = f.stat().st_size
        if total + size > max_bytes:
            break  # stop at the first file that does not fit, so the prefix is the same whatever max_bytes is
        files.append(f)
        total += size
    return files


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
            f"stdlib corpus: no .py files of at most {max_bytes} bytes found under "
            f"{sysconfig.get_paths()['stdlib']}"
        )
    return prepare(files, out_dir, tokenizer=tokenizer, val_fraction=val_fraction, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Reading token files


class TokenFile(np.memmap):
    """A split's ids, memory-mapped read-only, that know their file and vocabulary: get_batch checks the few ids a
    batch gathers against the vocabulary (the start-up reads only meta.json, never the whole file)."""

    source: str = ""
    vocab_size: int = 0

    def __array_finalize__(self, obj):
        super().__array_finalize__(obj)
        self.source = getattr(obj, "source", "")
        self.vocab_size = getattr(obj, "vocab_size", 0)


class TokenFileCorrupt(RuntimeError):
    """A token id outside the vocabulary met in a batch: the file changed after prepare wrote it (its meta.json
    max_id was checked at start-up). Only the ranks whose rows hold it can see it, so it is a fault, not a UserError:
    the job ends with one line naming the rank and the file (docs/reliability.md)."""


class TokenData:
    """A prepared data directory: metadata, tokenizer, and read-only memmaps of the two splits."""

    SCAN_CHUNK = 1 << 24  # ids per read of a version-1 directory's start-up check (32-64 MB)

    def __init__(self, data_dir):
        self.path = Path(data_dir)
        hint = "(run `hpc-llm prepare` to create it)"
        if self.path.exists() and not self.path.is_dir():
            raise UserError(
                f"data directory {str(self.path)!r} is not a directory (expected one written by "
                "`hpc-llm prepare`)"
            )
        if not self.path.is_dir():
            raise UserError(f"data directory {str(self.path)!r} does not exist {hint}")
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise UserError(
                f"{meta_path}: missing; {self.path} is not a prepared data directory {hint}"
            )
        self._meta = self._read_meta(meta_path)
        self._tokenizer = tokenizer_from_meta(self._meta)
        self.dtype = DTYPES[self._meta.get("dtype", "uint16")]
        self._splits = {name: self._load_split(name) for name in SPLITS}
        if (
            "max_id" not in self._meta
        ):  # format version 1: no recorded max_id, so the ids are checked once here
            self._scan_ids()

    def _scan_ids(self) -> None:
        """The start-up id check of a version-1 directory: each split read once, SCAN_CHUNK ids at a time (bounded
        memory). Version 2 records max_id and skips this."""
        for name in SPLITS:
            tokens, top = self._splits[name], -1
            for start in range(0, len(tokens), self.SCAN_CHUNK):
                top = max(top, int(np.asarray(tokens[start : start + self.SCAN_CHUNK]).max()))
            if top >= self.vocab_size:
                raise UserError(
                    f"{self.path / f'{name}.bin'}: contains token id {top}, but vocab_size in meta.json "
                    f"is {self.vocab_size} (a format version 1 directory: run `hpc-llm prepare` again)"
                )

    @staticmethod
    def _read_meta(meta_path: Path) -> dict:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{meta_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise UserError(
                f'{meta_path}: "format" is {got!r}, expected {FORMAT!r} (not written by '
                "`hpc-llm prepare`)"
            )
        version = meta.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise UserError(
                f'{meta_path}: "format_version" is {version!r}, expected a positive integer'
            )
        if version > FORMAT_VERSION:
            raise UserError(
                f"{meta_path}: format_version {version} is newer than this hpc_llm reads "
                f"({FORMAT_VERSION}); upgrade hpc_llm or re-run `hpc-llm prepare`"
            )
        for key in ("vocab_size", "n_train", "n_val"):
            value = meta.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(
                    f"{meta_path}: field {key!r} is {value!r}, expected a non-negative integer"
                )
        vocab = meta["vocab_size"]
        if not 1 <= vocab <= MAX_VOCAB:
            raise UserError(f"{meta_path}: vocab_size {vocab} is outside 1..{MAX_VOCAB}")
        dtype = meta.get("dtype", "uint16")  # version 1 has none: uint16
        if dtype not in DTYPES:
            raise UserError(
                f'{meta_path}: field "dtype" is {dtype!r}, expected "uint16" or "uint32"'
            )
        if vocab > np.iinfo(DTYPES[dtype]).max + 1:
            raise UserError(
                f"{meta_path}: dtype {dtype} cannot hold the ids of vocab_size {vocab} (expected "
                '"uint32")'
            )
        if (
            "max_id" in meta
        ):  # prepare records it: the start-up check that costs no pass over the files
            top = meta["max_id"]
            # prepare refuses a corpus with an empty split, so a written max_id is some id: never -1
            if not isinstance(top, int) or isinstance(top, bool) or top < 0:
                raise UserError(
                    f"{meta_path}: field 'max_id' is {top!r}, expected a non-negative integer"
                )
            if top >= vocab:
                raise UserError(
                    f"{meta_path}: max_id is {top}: the token files contain token id {top}, but "
                    f"vocab_size in meta.json is {vocab}"
                )
        return meta

    def _load_split(self, name: str) -> np.ndarray:
        path = self.path / f"{name}.bin"
        n = self._meta[f"n_{name}"]
        if not path.is_file():
            raise UserError(f"{path}: missing (run `hpc-llm prepare` to create it)")
        size, item = path.stat().st_size, self.dtype.itemsize
        if size != n * item:
            raise UserError(
                f"{path}: {size} bytes, expected {n * item} (n_{name} = {n} {self.dtype.name} "
                "tokens in meta.json); the file is truncated or from another run"
            )
        if n == 0:
            return np.zeros(0, dtype=self.dtype)  # mmap cannot map an empty file
        tokens = TokenFile(path, dtype=self.dtype, mode="r")
        tokens.source, tokens.vocab_size = str(path), self.vocab_size
        return tokens

    @property
    def vocab_size(self) -> int:
        return self._meta["vocab_size"]

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def meta(self) -> dict:
        return dict(self._meta)

    def split(self, name: str) -> np.ndarray:
        if name not in self._splits:
            raise UserError(f"data split {name!r} is unknown, expected one of {', '.join(SPLITS)}")
        return self._splits[name]


# --------------------------------------------------------------------------------------------------------------------
# Sampling


def check_split_size(tokens, block_size: int, name: str = "train") -> None:
    """Raise UserError unless the split holds at least one (block_size + 1)-token window."""
    n = len(tokens)
    if n < block_size + 1:
        raise UserError(
            f"corpus split {name!r} has {n} tokens, fewer than block_size+1 = {block_size + 1}; "
            "use a larger corpus or a smaller model.block_size"
        )


def get_batch(
    tokens,
    block_size: int,
    batch_size: int,
    seed: int,
    step: int,
    micro: int = 0,
    stream: int = 0,
    rows=None,
    name: str | None = None,
):
    """The (x, y) int64 arrays of one batch, a pure function of (seed, stream, step, micro).

    The offsets of the whole GLOBAL batch (batch_size rows) are always drawn, then `rows` (e.g. a rank's
    slice(r*b, (r+1)*b)) selects this caller's share: the union over ranks is the global batch whatever the
    data-parallel size. stream 0 = training batches, stream 1 = eval batches (eval batch i uses step=i).
    """
    for key, value in (("block_size", block_size), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"get_batch: {key} is {value!r}, expected a positive integer")
    for key, value in (("seed", seed), ("step", step), ("micro", micro), ("stream", stream)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise UserError(f"get_batch: {key} is {value!r}, expected a non-negative integer")
    check_split_size(
        tokens,
        block_size,
        name if name is not None else _STREAM_NAMES.get(stream, f"stream {stream}"),
    )

    rng = np.random.default_rng([int(seed), int(stream), int(step), int(micro)])
    offsets = rng.integers(0, len(tokens) - block_size, size=batch_size)
    if rows is not None:
        offsets = offsets[rows]
    # One gather of (rows, T+1) windows serves both: x is its first T columns, y its last T.
    window = offsets[:, None] + np.arange(block_size + 1)
    chunk = np.asarray(tokens)[window].astype(np.int64)
    vocab = getattr(tokens, "vocab_size", 0)
    if (
        vocab and chunk.size and int(chunk.max()) >= vocab
    ):  # a TokenFile: (rows, T+1) ids checked, not the file
        raise TokenFileCorrupt(
            f"{tokens.source}: contains token id {int(chunk.max())}, but vocab_size in meta.json is "
            f"{vocab} (the file changed after `hpc-llm prepare` wrote it: prepare it again)"
        )
    # Contiguous copies so callers may move them to a GPU or modify them without aliasing each other.
    return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])
