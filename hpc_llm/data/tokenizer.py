"""Tokenizers: bytes, characters, and byte-level BPE (GPT-2's, or one trained on the user's corpus).

Every tokenizer has `name`, `vocab_size`, `encode(text) -> ids`, `decode(ids) -> str` and `meta()`, the dict that
meta.json and a checkpoint's state record; `tokenizer_from_meta` rebuilds any of them from it, so generating text
needs nothing but the checkpoint.

The BPE tokenizer wraps the `tokenizers` package (Hugging Face's Rust implementation): nothing of BPE is written
here. Its meta carries the tokenizer's whole JSON (`Tokenizer.to_str()`) and that JSON's sha256, so two tokenizers
compare by (name, vocab_size, sha256):

    {"tokenizer": "bpe" | "gpt2-bpe", "vocab_size": V, "tokenizer_sha256": "...", "tokenizer_json": "{...}"}

"gpt2-bpe" is a tokenizer read from a Hugging Face directory (`tokenizer.json`, or GPT-2's `vocab.json` +
`merges.txt`); "bpe" one that `hpc-llm prepare --tokenizer bpe --vocab-size N` trained.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import tokenizers

from hpc_llm.errors import UserError

# ids of a vocabulary up to this size fit uint16 token files; larger ones take uint32
UINT16_VOCAB = 1 << 16
MAX_VOCAB = 1 << 32  # uint32 token ids
BPE_MIN_VOCAB = 257  # the 256 byte symbols of the byte-level alphabet and at least one merge
HF_TOKENIZER_JSON = "tokenizer.json"
HF_VOCAB, HF_MERGES = "vocab.json", "merges.txt"
GPT2_EOS = "<|endoftext|>"
NAMES = ("byte", "char", "bpe", "gpt2-bpe")
# prepare cuts BPE text after a "\n" between two visible ASCII characters (hpc_llm/data/pieces.py): GPT-2's
# pre-tokenizer splits there whatever surrounds it (a token that holds "\n" is whitespace only, and neither neighbour
# is whitespace), so both sides encode as in the whole text. A tokenizer qualifies when its pre-tokenizer splits there
# in every one of these contexts (each letter class, digit and punctuation on either side).
SAFE_BREAK = re.compile(r"(?<=[!-~])\n(?=[!-~])")
_BREAK_PROBE = (
    "".join(f"w{a}\n{b}w {a}{a}\n{b}{b} " for a in "aZ0.'$(_-" for b in "aZ0.'$(_-")
    + "x\n's y\n\tz\n"
)
# besides none: composition never joins across "\n" + a visible ASCII character
_STREAM_NORMALIZERS = ("NFC",)


def ids_dtype(vocab_size: int) -> np.dtype:
    """The token-file dtype of a vocabulary: little-endian uint16 while the ids fit, uint32 beyond."""
    return np.dtype("<u2") if vocab_size <= UINT16_VOCAB else np.dtype("<u4")


def _check_ids(ids, vocab_size: int, what: str) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0]
        raise UserError(
            f"token id {bad} is outside the {what} tokenizer's vocabulary 0..{vocab_size - 1}"
        )
    return ids


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, any text encodes, every id sequence decodes."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        ids = _check_ids(ids, 256, "byte")
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
            raise UserError(
                "char tokenizer: the vocabulary is empty (expected at least one character)"
            )
        self.chars = vocab
        self.vocab_size = len(vocab)
        self.dtype = ids_dtype(self.vocab_size)
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
            raise UserError(
                f"char tokenizer: character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the "
                f"vocabulary of {self.vocab_size} characters"
            )
        return ids.astype(self.dtype.newbyteorder("="))

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size, "char")
        return "".join(self._char_array[ids].tolist())

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "chars": self.chars}


class BPETokenizer:
    """A byte-level BPE `tokenizers.Tokenizer`. Text is encoded without special tokens added (no BOS/EOS that a
    post-processor would insert), so encoding pieces of a corpus one by one concatenates like encoding the whole."""

    def __init__(self, tok, name: str, json_str: str | None = None):
        self._tok = tok
        self.name = name
        # the JSON given (from a meta), or the tokenizer's own: its hash identifies the tokenizer
        self.json = json_str if json_str is not None else tok.to_str()
        self.sha256 = hashlib.sha256(self.json.encode("utf-8")).hexdigest()
        vocab = tok.get_vocab(with_added_tokens=True)
        # ids need not be dense: the largest counts
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        if not 1 <= self.vocab_size <= MAX_VOCAB:
            raise UserError(
                f"{name} tokenizer: vocabulary of {self.vocab_size} tokens, expected 1..{MAX_VOCAB}"
            )
        self.dtype = ids_dtype(self.vocab_size)

    # -- making one --------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path, name: str = "gpt2-bpe") -> BPETokenizer:
        """A Hugging Face tokenizer directory: tokenizer.json, or GPT-2's vocab.json + merges.txt."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(
                f"tokenizer directory {str(path)!r} does not exist or is not a directory (expected "
                f"{HF_TOKENIZER_JSON}, or {HF_VOCAB} + {HF_MERGES}, in it)"
            )
        found = find_tokenizer_files(path)
        if found is None:
            raise UserError(
                f"tokenizer directory {str(path)!r} has neither {HF_TOKENIZER_JSON} nor {HF_VOCAB} + "
                f"{HF_MERGES} (a Hugging Face GPT-2 tokenizer)"
            )
        if found[0].name == HF_TOKENIZER_JSON:
            try:
                tok = tokenizers.Tokenizer.from_file(str(found[0]))
            except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception subclasses
                raise UserError(
                    f"{found[0]}: not a readable tokenizers JSON file ({_one_line(e)})"
                ) from None
            return cls(tok, name)
        vocab, merges = found
        try:
            model = tokenizers.models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"{vocab} + {merges}: not a readable GPT-2 BPE vocabulary ({_one_line(e)})"
            ) from None
        tok = tokenizers.Tokenizer(model)
        # GPT-2's exactly (transformers' GPT2Converter): byte-level pre-tokenizer with its regex, no prefix space
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
        if GPT2_EOS in tok.get_vocab():
            tok.add_special_tokens([GPT2_EOS])
        return cls(tok, name)

    @classmethod
    def from_json(cls, json_str: str, name: str) -> BPETokenizer:
        try:
            tok = tokenizers.Tokenizer.from_str(json_str)
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f'field "tokenizer_json" is not a readable tokenizers JSON ({_one_line(e)})'
            ) from None
        return cls(tok, name, json_str)

    @classmethod
    def train(cls, texts, vocab_size: int, length: int | None = None) -> BPETokenizer:
        """Train a byte-level BPE of `vocab_size` tokens (fewer when the corpus has fewer pairs to merge) on an
        iterator of strings, consumed piece by piece: memory grows with the corpus's distinct words, not its size.
        The result is a function of the strings alone (tokenizers' trainer breaks count ties by the pair itself)."""
        check_bpe_vocab_size(vocab_size)
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer, length=length)
        return cls(tok, "bpe")

    # -- using one ---------------------------------------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(
            self._tok.encode(text, add_special_tokens=False).ids, dtype=self.dtype.newbyteorder("=")
        )

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Several strings at once (tokenizers spreads them over its threads); offsets are not computed."""
        dt = self.dtype.newbyteorder("=")
        # _fast: tokenizers >= 0.21
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, dtype=dt) for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = _check_ids(ids, self.vocab_size, self.name)
        # byte-level decoding replaces a multi-byte character cut in half (U+FFFD), as the byte tokenizer does
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def meta(self) -> dict:
        return {
            "tokenizer": self.name,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.sha256,
            "tokenizer_json": self.json,
        }

    def streaming_problem(self) -> str | None:
        """Why encoding a corpus piece by piece (cut after "x\\ny", data.py) could differ from encoding it whole, or
        None: exact for a BPE model whose normalizer adds no text (none, or NFC) and whose pre-tokenizer is byte-level
        without a prefix space (GPT-2's ByteLevel with its regex, or Isolated Split regexes then ByteLevel, as
        Llama 3's) and splits after every such line break (probed). A Metaspace or a Prepend normalizer, for one,
        would add "▁" again at every cut."""
        spec = json.loads(self.json)
        model = (spec.get("model") or {}).get("type")
        if model != "BPE":
            return f"model {model} is not BPE"
        pre = spec.get("pre_tokenizer")
        parts = (
            (pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [pre])
            if pre
            else []
        )
        kinds = [str(p.get("type")) for p in parts]
        if not kinds or kinds[-1] != "ByteLevel" or any(k != "Split" for k in kinds[:-1]):
            return (
                f"pre-tokenizer {'+'.join(kinds) or 'none'} is not byte-level (expected ByteLevel, or Split "
                "parts then ByteLevel)"
            )
        if parts[-1].get("add_prefix_space"):
            return (
                "pre-tokenizer ByteLevel has add_prefix_space true (every piece would get a space)"
            )
        for p in parts[:-1]:
            if p.get("behavior") != "Isolated" or p.get("invert"):
                return (
                    f"pre-tokenizer Split has behavior {p.get('behavior')}{', inverted' if p.get('invert') else ''}"
                    ", which may join text across a line break (expected Isolated)"
                )
        norm = spec.get("normalizer")
        for n in (
            (norm.get("normalizers") or [] if norm.get("type") == "Sequence" else [norm])
            if norm
            else []
        ):
            if n.get("type") not in _STREAM_NORMALIZERS:
                return f"normalizer {n.get('type')} is not supported (none or NFC: others may add text at every cut)"
        bounds = {
            i for _, span in self._tok.pre_tokenizer.pre_tokenize_str(_BREAK_PROBE) for i in span
        }
        for m in SAFE_BREAK.finditer(_BREAK_PROBE):
            if m.end() not in bounds:
                at = _BREAK_PROBE[m.start() - 1 : m.end() + 1]
                return f"pre-tokenizer does not split after the line break in {at!r}"
        return None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_tokenizer_files(path) -> tuple[Path, ...] | None:
    """(tokenizer.json,) or (vocab.json, merges.txt) in a directory, or None when it has neither."""
    path = Path(path)
    if (path / HF_TOKENIZER_JSON).is_file():
        return (path / HF_TOKENIZER_JSON,)
    if (path / HF_VOCAB).is_file() and (path / HF_MERGES).is_file():
        return path / HF_VOCAB, path / HF_MERGES
    return None


def check_bpe_vocab_size(vocab_size) -> None:
    if (
        not isinstance(vocab_size, int)
        or isinstance(vocab_size, bool)
        or not BPE_MIN_VOCAB <= vocab_size <= MAX_VOCAB
    ):
        raise UserError(
            f"--vocab-size: expected an integer in {BPE_MIN_VOCAB}..{MAX_VOCAB} (the 256 bytes plus at "
            f"least one merge), got {vocab_size!r}"
        )


def tokenizer_meta_key(meta: dict) -> tuple:
    """What identifies a tokenizer: (name, vocab_size, sha256 of its JSON) for BPE, the whole meta otherwise."""
    if meta.get("tokenizer") in ("bpe", "gpt2-bpe"):
        return meta.get("tokenizer"), meta.get("vocab_size"), meta.get("tokenizer_sha256")
    return tuple(sorted((k, v) for k, v in meta.items() if isinstance(v, (str, int))))


def _brief(meta: dict) -> str:
    return (
        f"{meta.get('tokenizer')} tokenizer, vocab {meta.get('vocab_size')}"
        + (
            f", {len(meta['chars'])} chars {meta['chars'][:20]!r}..."
            if isinstance(meta.get("chars"), str)
            else ""
        )
        + (f", sha256 {str(meta['tokenizer_sha256'])[:12]}" if "tokenizer_sha256" in meta else "")
    )


def check_same_tokenizer(theirs, mine: dict, checkpoint: str, data: str) -> str | None:
    """The one check that data is tokenized as a checkpoint's training data was (train's resume and init_from,
    eval): the same ids must mean the same text. theirs: the checkpoint's recorded tokenizer meta (not a dict: an
    older checkpoint recording none, not checked); mine: the data's; checkpoint, data: how messages name them.
    Different tokenizers (tokenizer_meta_key): a one-line UserError naming both. An ids-only "gpt2-bpe" import (no
    tokenizer_json, nothing to compare): returns the warning for the caller to log (the user vouches for the ids);
    otherwise None."""
    if not isinstance(theirs, dict):
        return None
    if theirs.get("tokenizer") == "gpt2-bpe" and "tokenizer_json" not in theirs:
        return (
            f"{checkpoint} was trained on gpt2-bpe tokens, which hpc_llm cannot check against {data} "
            f"({mine.get('tokenizer')} tokenizer): its ids must mean the same tokens"
        )
    if tokenizer_meta_key(theirs) != tokenizer_meta_key(mine):
        raise UserError(
            f"{checkpoint} was trained on data with the {_brief(theirs)}, but {data} has the "
            f"{_brief(mine)}"
        )
    return None


def tokenizer_from_meta(meta: dict):
    """Rebuild the tokenizer recorded in a meta.json dict (or a checkpoint's copy of it)."""
    kind = meta.get("tokenizer")
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "char":
        chars = meta.get("chars")
        if not isinstance(chars, str) or not chars:
            raise UserError('meta.json: tokenizer "char" needs a non-empty string field "chars"')
        tok = CharTokenizer(chars)
        # Ids are positions in the sorted vocabulary: an edited "chars" would silently remap every token.
        if tok.chars != chars:
            raise UserError(
                'meta.json: field "chars" must be sorted unique characters (it was modified)'
            )
    elif kind in ("bpe", "gpt2-bpe"):
        text, sha = meta.get("tokenizer_json"), meta.get("tokenizer_sha256")
        if not isinstance(text, str) or not text:
            raise UserError(
                f'meta.json: tokenizer {kind!r} needs a string field "tokenizer_json" (the tokenizer\'s '
                "JSON), which is missing"
            )
        if sha != hashlib.sha256(text.encode("utf-8")).hexdigest():
            raise UserError(
                'meta.json: field "tokenizer_sha256" does not match "tokenizer_json" (one was '
                "modified)"
            )
        tok = BPETokenizer.from_json(text, kind)
    else:
        raise UserError(
            f'meta.json: field "tokenizer" is {kind!r}, expected '
            f"{', '.join(json.dumps(n) for n in NAMES[:-1])} or {json.dumps(NAMES[-1])}"
        )
    if meta.get("vocab_size") != tok.vocab_size:
        raise UserError(
            f'meta.json: field "vocab_size" is {meta.get("vocab_size")!r}, but the {kind} tokenizer '
            f"has {tok.vocab_size} tokens"
        )
    return tok


def make_tokenizer(
    name: str, chars: str = "", vocab_size: int | None = None, tokenizer_dir=None, texts=None
):
    """The tokenizer `prepare` asked for: byte; char (vocabulary `chars`); gpt2 (read from tokenizer_dir); bpe
    (trained on the iterator `texts` to vocab_size tokens)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "char":
        return CharTokenizer(chars)
    if name == "gpt2":
        tok = BPETokenizer.from_dir(tokenizer_dir)
        # prepare encodes the corpus in pieces: only a tokenizer for which that equals the whole encoding will do
        # (import-gpt2 and generate encode whole texts, so from_dir itself accepts any)
        problem = tok.streaming_problem()
        if problem:
            raise UserError(
                f"{find_tokenizer_files(tokenizer_dir)[0]}: {problem}; hpc_llm streams the corpus in "
                "pieces and supports byte-level BPE tokenizers only"
            )
        return tok
    if name == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise UserError(f'prepare: tokenizer is {name!r}, expected "byte", "char", "bpe" or "gpt2"')
