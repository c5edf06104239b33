"""Tokenizers, token files and the deterministic batch sampler.

A prepared data directory holds three files:

    train.bin   raw little-endian uint16 token ids (the first 1 - val_fraction of the corpus)
    val.bin     the same for the rest
    meta.json   {"format": "hpc_llm-tokens", "format_version": 1, "tokenizer": ..., "vocab_size": ..., ...}

Batches are a pure function of (seed, stream, step, micro): no sampler state exists, so a resumed run sees exactly
the batches it would have seen, and data-parallel ranks take disjoint row slices of one global batch.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np

from hpc_llm.errors import UserError
from hpc_llm.fsio import atomic_write_bytes

FORMAT = "hpc_llm-tokens"
FORMAT_VERSION = 1
# Explicit little-endian so token files move between machines unchanged (identical to np.uint16 on x86/ARM).
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 1 << 16  # uint16 token ids
SPLITS = ("train", "val")
# Names of the sampler streams, used only to make error messages name the split.
_STREAM_NAMES = {0: "train", 1: "val"}


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, any text encodes, every id sequence decodes."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= 256):
            bad = ids[(ids < 0) | (ids >= 256)][0]
            raise UserError(f"token id {bad} is outside the byte tokenizer's vocabulary 0..255")
        # A generated sequence may cut a multi-byte character in half: replace rather than fail.
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size}


class CharTokenizer:
    """nanoGPT's shakespeare_char tokenizer: one token per character of the corpus, ids in code-point order.

    `chars` may be the vocabulary or the whole corpus; either way the vocabulary is its sorted unique characters.
    """

    name = "char"

    def __init__(self, chars: str):
        vocab = "".join(sorted(set(chars)))
        if not vocab:
            raise UserError("char tokenizer: the vocabulary is empty (expected at least one character)")
        if len(vocab) > MAX_VOCAB:
            raise UserError(f"char tokenizer: {len(vocab)} distinct characters, more than the {MAX_VOCAB} that "
                            "uint16 token ids can hold (use tokenizer = \"byte\")")
        self.chars = vocab
        self.vocab_size = len(vocab)
        # Sorted code points let encode map a whole string with one searchsorted instead of a per-character dict.
        self._codes = np.array([ord(c) for c in vocab], dtype=np.uint32)
        self._char_array = np.array(list(vocab))

    def encode(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        ids = np.searchsorted(self._codes, codes)
        ok = ids < self.vocab_size
        ok[ok] = self._codes[ids[ok]] == codes[ok]
        if not ok.all():
            pos = int(np.argmin(ok))
            ch = chr(int(codes[pos]))
            raise UserError(f"char tokenizer: character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the "
                            f"vocabulary of {self.vocab_size} characters")
        return ids.astype(np.uint16)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise UserError(f"token id {bad} is outside the char tokenizer's vocabulary 0..{self.vocab_size - 1}")
        return "".join(self._char_array[ids].tolist())

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "chars": self.chars}


def tokenizer_from_meta(meta: dict):
    """Rebuild the tokenizer recorded in a meta.json dict (or a checkpoint's copy of it)."""
    kind = meta.get("tokenizer")
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "char":
        chars = meta.get("chars")
        if not isinstance(chars, str) or not chars:
            raise UserError("meta.json: tokenizer \"char\" needs a non-empty string field \"chars\"")
        tok = CharTokenizer(chars)
        # Ids are positions in the sorted vocabulary: an edited "chars" would silently remap every token.
        if tok.chars != chars:
            raise UserError("meta.json: field \"chars\" must be sorted unique characters (it was modified)")
    else:
        raise UserError(f"meta.json: field \"tokenizer\" is {kind!r}, expected \"byte\" or \"char\"")
    if meta.get("vocab_size") != tok.vocab_size:
        raise UserError(f"meta.json: field \"vocab_size\" is {meta.get('vocab_size')!r}, but the {kind} tokenizer "
                        f"has {tok.vocab_size} tokens")
    return tok


def _make_tokenizer(name: str, text: str):
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        return CharTokenizer(text)
    raise UserError(f"prepare: tokenizer is {name!r}, expected \"byte\" or \"char\"")


# --------------------------------------------------------------------------------------------------------------------
# Preparing token files


def _expand_inputs(inputs, pattern: str) -> list[Path]:
    """Files named directly are always taken; folders contribute their files matching `pattern`, sorted."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted((f for f in p.rglob(pattern) if f.is_file()), key=lambda f: f.relative_to(p).as_posix())
        elif p.is_file():
            found = [p]
        else:
            raise UserError(f"prepare: input {str(p)!r} does not exist (expected a file or a folder)")
        for f in found:
            key = f.resolve()
            if key not in seen:  # a file named both directly and through its folder is read once
                seen.add(key)
                files.append(f)
    return files


def prepare(inputs: list, out_dir, tokenizer: str = "byte", val_fraction: float = 0.1, pattern: str = "*") -> dict:
    """Tokenize text files into out_dir/{train.bin,val.bin,meta.json}; returns the metadata written."""
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 < val_fraction < 1:
        raise UserError(f"prepare: val_fraction is {val_fraction!r}, expected a number strictly between 0 and 1")
    if tokenizer not in ("byte", "char"):
        raise UserError(f"prepare: tokenizer is {tokenizer!r}, expected \"byte\" or \"char\"")
    input_list = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not input_list:
        raise UserError("prepare: no inputs given (expected at least one file or folder)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"prepare: output directory {str(out)!r} is a file, expected a directory")
    files = _expand_inputs(input_list, pattern)

    texts, n_skipped = [], 0
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            n_skipped += 1  # binaries and other encodings: skip rather than corrupt the byte stream
    text = "\n".join(texts)
    if not text:
        raise UserError(f"prepare: the corpus is empty ({len(texts)} readable files, {n_skipped} skipped as not "
                        f"UTF-8, pattern {pattern!r}); expected some text")

    tok = _make_tokenizer(tokenizer, text)
    ids = tok.encode(text).astype(TOKEN_DTYPE, copy=False)
    n_train = int(len(ids) * (1 - val_fraction))
    n_val = len(ids) - n_train
    if n_train == 0 or n_val == 0:
        raise UserError(f"prepare: the corpus has only {len(ids)} tokens, too few to split with val_fraction "
                        f"{val_fraction} (both splits must be non-empty)")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"prepare: cannot create output directory {str(out)!r} ({e.strerror or e})") from None
    meta_path = out / "meta.json"
    # Remove the old meta first: until the new one is written, the directory is visibly unprepared, never a mix.
    meta_path.unlink(missing_ok=True)
    atomic_write_bytes(out / "train.bin", ids[:n_train].tobytes())
    atomic_write_bytes(out / "val.bin", ids[n_train:].tobytes())

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **tok.meta(),
            "n_train": n_train, "n_val": n_val, "n_files": len(texts), "n_skipped": n_skipped,
            "sources": [str(p) for p in input_list[:5]]}
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return meta


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


def prepare_stdlib(out_dir, max_bytes: int = 8_000_000, tokenizer: str = "byte", val_fraction: float = 0.1) -> dict:
    files = stdlib_corpus_files(max_bytes)
    if not files:
        raise UserError(f"stdlib corpus: no .py files of at most {max_bytes} bytes found under "
                        f"{sysconfig.get_paths()['stdlib']}")
    return prepare(files, out_dir, tokenizer=tokenizer, val_fraction=val_fraction)


# --------------------------------------------------------------------------------------------------------------------
# Reading token files


class TokenData:
    """A prepared data directory: metadata, tokenizer, and read-only memmaps of the two splits."""

    def __init__(self, data_dir):
        self.path = Path(data_dir)
        hint = "(run `hpc-llm prepare` to create it)"
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"data directory {str(self.path)!r} is not a directory (expected one written by "
                            "`hpc-llm prepare`)")
        if not self.path.is_dir():
            raise UserError(f"data directory {str(self.path)!r} does not exist {hint}")
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"{meta_path}: missing; {self.path} is not a prepared data directory {hint}")
        self._meta = self._read_meta(meta_path)
        self._tokenizer = tokenizer_from_meta(self._meta)
        self._splits = {name: self._load_split(name) for name in SPLITS}

    @staticmethod
    def _read_meta(meta_path: Path) -> dict:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{meta_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise UserError(f"{meta_path}: \"format\" is {got!r}, expected {FORMAT!r} (not written by "
                            "`hpc-llm prepare`)")
        version = meta.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise UserError(f"{meta_path}: \"format_version\" is {version!r}, expected a positive integer")
        if version > FORMAT_VERSION:
            raise UserError(f"{meta_path}: format_version {version} is newer than this hpc_llm reads "
                            f"({FORMAT_VERSION}); upgrade hpc_llm or re-run `hpc-llm prepare`")
        for key in ("vocab_size", "n_train", "n_val"):
            value = meta.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"{meta_path}: field {key!r} is {value!r}, expected a non-negative integer")
        if not 1 <= meta["vocab_size"] <= MAX_VOCAB:
            raise UserError(f"{meta_path}: vocab_size {meta['vocab_size']} is outside 1..{MAX_VOCAB}")
        return meta

    def _load_split(self, name: str) -> np.ndarray:
        path = self.path / f"{name}.bin"
        n = self._meta[f"n_{name}"]
        if not path.is_file():
            raise UserError(f"{path}: missing (run `hpc-llm prepare` to create it)")
        size = path.stat().st_size
        if size != n * TOKEN_DTYPE.itemsize:
            raise UserError(f"{path}: {size} bytes, expected {n * TOKEN_DTYPE.itemsize} (n_{name} = {n} uint16 "
                            "tokens in meta.json); the file is truncated or from another run")
        if n == 0:
            return np.zeros(0, dtype=TOKEN_DTYPE)  # mmap cannot map an empty file
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")
        # One pass now is cheaper than an out-of-range embedding lookup discovered mid-run.
        top = int(tokens.max())
        if top >= self.vocab_size:
            raise UserError(f"{path}: contains token id {top}, but vocab_size in meta.json is {self.vocab_size}")
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
        raise UserError(f"corpus split {name!r} has {n} tokens, fewer than block_size+1 = {block_size + 1}; "
                        "use a larger corpus or a smaller model.block_size")


def get_batch(tokens, block_size: int, batch_size: int, seed: int, step: int, micro: int = 0, stream: int = 0,
              rows=None, name: str | None = None):
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
    check_split_size(tokens, block_size, name if name is not None else _STREAM_NAMES.get(stream, f"stream {stream}"))

    rng = np.random.default_rng([int(seed), int(stream), int(step), int(micro)])
    offsets = rng.integers(0, len(tokens) - block_size, size=batch_size)
    if rows is not None:
        offsets = offsets[rows]
    # One gather of (rows, T+1) windows serves both: x is its first T columns, y its last T.
    window = offsets[:, None] + np.arange(block_size + 1)
    chunk = np.asarray(tokens)[window].astype(np.int64)
    # Contiguous copies so callers may move them to a GPU or modify them without aliasing each other.
    return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])
