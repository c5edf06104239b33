"""The pieces a corpus is cut into for prepare and what the ranks learn about them (Plan, Scanned, Encoded,
Layout), what one piece costs in memory, encoding one piece's text, which pieces a rank takes, and the progress a
phase reports.

A piece is a whole small file or a byte range of a large one ending at a line break, planned by rank 0 before any
text is read, so the cut never depends on the number of ranks. Byte and char tokens do not depend on where a text is
cut (they are per character, and cuts fall on character boundaries). BPE is cut only at a line break between two
visible ASCII characters ("...x\\ny...", tokenizer.SAFE_BREAK), where GPT-2's byte-level pre-tokenizer always splits:
encoding piece by piece is then exactly the whole file's encoding; a text without such a break for a whole piece is
cut at any line break, or at a character boundary (the only cases where pieces can change BPE tokens). That holds for
byte-level BPE only (a Metaspace pre-tokenizer or Prepend normalizer adds "▁" at every cut): --tokenizer-dir accepts
only those (BPETokenizer.streaming_problem).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from hpc_llm.data.tokenizer import SAFE_BREAK, BPETokenizer
from hpc_llm.errors import UserError

log = logging.getLogger(__name__)

_SAFE_BREAK_BYTES = re.compile(SAFE_BREAK.pattern.encode())
_CUT_WINDOW = 1 << 16  # bytes searched past a piece's nominal end for a break


class Piece(NamedTuple):
    """Bytes start..end of the corpus's file number `file`."""

    file: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


class Plan(NamedTuple):
    """Rank 0's decision, broadcast before any text is read: the input files, their pieces, the directories prepare
    created for the output (deepest first) and the tag that names this run's part files."""

    files: list[str]
    pieces: list[Piece]
    created: list[str]
    tag: str


class Scanned(NamedTuple):
    """A piece after the first pass of char and bpe: whether it is text, and (char) its characters."""

    is_text: bool
    chars: str


class Encoded(NamedTuple):
    """A piece after encoding: its token count, whether it is text, its largest id (-1: it has none)."""

    n_tokens: int
    is_text: bool
    max_id: int


class Layout(NamedTuple):
    """Where the ids go, the same on every rank: each included piece's offset in the token stream, the offsets of
    the separators between files, the split, and the largest id written."""

    piece_pos: dict[int, int]
    sep_pos: list[int]
    n_train: int
    n_val: int
    max_id: int


class Budget:
    """Sizes derived from --memory-mb. Peak memory per rank is about the piece's bytes times a factor (measured,
    docs/data.md): raw bytes + the decoded str + the ids (byte: 2 B/char; char: the UTF-32 copy and int64
    searchsorted result, ~20 B/char; BPE: tokenizers' Encoding objects, ~50 B per character of the batch encoded at
    once). A part-file copy moves one piece's worth of ids at a time."""

    def __init__(self, memory_mb: int, tokenizer: str, piece_bytes: int | None = None):
        budget = memory_mb << 20
        self.piece = piece_bytes or max(4096, budget // {"byte": 16, "char": 64}.get(tokenizer, 32))
        self.bpe_batch = max(4096, min(self.piece, budget // 256))  # characters encoded in one call
        # strings in that call (threads share them)
        self.bpe_segment = max(1024, min(1 << 16, self.bpe_batch // 8))
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


def plan_pieces(files: list[Path], piece_bytes: int) -> list[Piece]:
    """Pieces covering every file in order; an empty file is one empty piece."""
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
                    pieces.append(Piece(i, start, end))
                    start = end
                    if start >= size:
                        break
        except OSError as e:
            raise UserError(f"prepare: cannot read input {str(f)!r} ({e.strerror or e})") from None
    return pieces


def segments(text: str, size: int):
    """Consecutive substrings of about `size` characters, cut where SAFE_BREAK allows (else at a line break, else
    anywhere at 2 x size): the strings one BPE call encodes side by side."""
    i, n = 0, len(text)
    while n - i > size:
        limit = min(n, i + 2 * size)
        m = SAFE_BREAK.search(text, i + size, limit)
        if m:
            j = m.end()
        else:
            k = text.find("\n", i + size, limit)
            j = k + 1 if k >= 0 else limit
        yield text[i:j]
        i = j
    if i < n or n == 0:
        yield text[i:]


def encode_text(tok, text: str, budget: Budget):
    """The ids of one piece's text, in chunks (BPE: a batch of segments per call, so memory follows the batch)."""
    if not isinstance(tok, BPETokenizer):
        yield tok.encode(text)
        return
    batch, chars = [], 0
    for seg in segments(text, budget.bpe_segment):
        batch.append(seg)
        chars += len(seg)
        if chars >= budget.bpe_batch:
            yield from tok.encode_batch(batch)
            batch, chars = [], 0
    if batch:
        yield from tok.encode_batch(batch)


def my_pieces(pieces: list[Piece], comm) -> range:
    """This rank's contiguous run of pieces, the runs balanced by bytes."""
    sizes = [p.size for p in pieces]
    total = sum(sizes)
    if comm.size == 1 or total == 0:
        return range(len(pieces)) if comm.rank == 0 else range(0)
    owner, before = [], 0
    for s in sizes:
        owner.append(min(comm.size - 1, before * comm.size // total))
        before += s
    idx = [j for j, r in enumerate(owner) if r == comm.rank]
    return range(idx[0], idx[-1] + 1) if idx else range(0)


class Progress:
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
