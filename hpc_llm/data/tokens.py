"""The token-file format, and reading it: a prepared data directory holds three files (docs/data.md):

    train.bin   raw little-endian token ids, uint16 (vocabulary <= 65536) or uint32: the first 1 - val_fraction
    val.bin     the same for the rest
    meta.json   {"format": "hpc_llm-tokens", "format_version": 2, "tokenizer": ..., "vocab_size": ..., "dtype":
                "uint16" | "uint32", "max_id": ..., "n_train": ..., "n_val": ..., ...}

Format version 1 (no "dtype", no "max_id") is read as uint16. hpc_llm/data/prepare.py writes these files, through
create_split_files and SplitWriter.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from hpc_llm.data.tokenizer import MAX_VOCAB, tokenizer_from_meta
from hpc_llm.errors import UserError

FORMAT = "hpc_llm-tokens"
FORMAT_VERSION = 2  # 2: "dtype" (uint16 or uint32) and "max_id"; version 1 files are uint16
# Explicit little-endian so token files move between machines unchanged (identical to np.uint16 on x86/ARM).
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SPLITS = ("train", "val")


def split_file(split: str) -> str:
    """A split's token file name."""
    return f"{split}.bin"


def dtype_name(dtype: np.dtype) -> str:
    """The meta.json "dtype" of a token-file dtype."""
    return "uint16" if dtype.itemsize == 2 else "uint32"


def encode_meta(meta: dict) -> bytes:
    """meta.json's bytes: indented one space, non-ASCII characters kept, a final newline."""
    return (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def create_split_files(
    out: Path, sizes, dtype: np.dtype, made: list[str], prefix: str = "."
) -> list[str]:
    """Temporary train and val files in `out`, of their final sizes (`sizes` ids each), named PREFIX + the split's
    file + "." + random + ".tmp"; each name is appended to `made` as soon as the file exists, so that a failure can
    remove it."""
    names = []
    for split, n in zip(SPLITS, sizes):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f"{prefix}{split_file(split)}.", suffix=".tmp")
        made.append(tmp)
        os.ftruncate(fd, n * dtype.itemsize)
        os.close(fd)
        names.append(tmp)
    return names


class SplitWriter:
    """The split files of one token stream, open for writing at any offset: the stream's ids before n_train go to
    the first (train), the rest to the second (val)."""

    def __init__(self, paths: list[str], n_train: int, dtype: np.dtype):
        self.n_train, self.dtype = n_train, dtype
        self.fds = [os.open(p, os.O_WRONLY) for p in paths]

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds:
            os.close(fd)

    def put(self, at: int, ids: np.ndarray) -> None:
        """ids at token offset `at` of the stream."""
        k = max(0, min(len(ids), self.n_train - at))
        for fd, arr, off in (
            (self.fds[0], ids[:k], at),
            (self.fds[1], ids[k:], at + k - self.n_train),
        ):
            data = memoryview(arr.astype(self.dtype, copy=False).tobytes())
            off *= self.dtype.itemsize
            while data:
                w = os.pwrite(fd, data, off)
                data, off = data[w:], off + w

    def sync(self) -> None:
        for fd in self.fds:
            os.fsync(fd)


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
        # format version 1: no recorded max_id, so the ids are checked once here
        if "max_id" not in self._meta:
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
                    f"{self.path / split_file(name)}: contains token id {top}, but vocab_size in meta.json "
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
        # prepare records it: the start-up check that costs no pass over the files
        if "max_id" in meta:
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
        path = self.path / split_file(name)
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
