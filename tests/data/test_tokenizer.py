"""Byte-level BPE (hpc_llm/data/tokenizer.py over the `tokenizers` package): encodings equal tokenizers' own reference
on multilingual text, GPT-2-format directories (vocab.json + merges.txt, tokenizer.json) load, the tokenizer travels in
meta.json and the checkpoint, `prepare --tokenizer bpe|gpt2` equals the whole-file encoding, uint32 token files for a
vocabulary beyond 65536, and an imported GPT-2 with its tokenizer generates text end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers  # a required dependency (setup.cfg): missing, these tests fail rather than skip
from helpers import N_EMBD, N_POSITIONS, REPO, hf_config, hf_tensors

from hpc_llm.data.pieces import plan_pieces
from hpc_llm.data.prepare import prepare
from hpc_llm.data.sampler import get_batch
from hpc_llm.data.tokenizer import BPETokenizer, check_same_tokenizer, tokenizer_from_meta
from hpc_llm.data.tokens import TokenData
from hpc_llm.errors import UserError

MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?\n"
    "Deutsch: Grüße aus München! Über die Straße, Ärger mit Öl, übermäßig schön.\n"
    "中文：你好，世界。机器学习很有趣。日本語も少し。\n"
    "Emoji: 🙂🎉👍🏽 family 👨‍👩‍👧 flags 🇩🇪🇨🇳\n"
    "code:\n    def f(x):\n\treturn {'a': x ** 2}  # comment\n\n\n   trailing spaces   \r\nCRLF line\n"
)
WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are have had not but his "
    "her they you we all one their there been has more when will would who so no she if out up into than them "
    "Grüße Straße 你好 世界 🙂 def return x+1 {a: b}"
).split()


def word_text(n_lines: int, seed: int = 0) -> str:
    """Deterministic text of short lines (visible ASCII at most line ends, so BPE pieces cut exactly)."""
    rng = np.random.default_rng(seed)
    lines = [
        " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=rng.integers(3, 14)))
        for _ in range(n_lines)
    ]
    return "\n".join(lines) + "\n"


def reference_bpe(texts, vocab_size: int):
    """tokenizers' own byte-level BPE recipe, written out here independently of hpc_llm."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return word_text(400) + MULTILINGUAL * 20


@pytest.fixture(scope="module")
def bpe(corpus_text) -> BPETokenizer:
    return BPETokenizer.train(iter(corpus_text.splitlines(keepends=True)), 400)


def write_gpt2_tokenizer(path: Path, tok: BPETokenizer, kind: str) -> Path:
    """A GPT-2-format tokenizer directory: vocab.json + merges.txt (as GPT-2's hub snapshot has them) or
    tokenizer.json (as transformers' fast tokenizer saves it)."""
    path.mkdir(parents=True, exist_ok=True)
    if kind == "json":
        (path / "tokenizer.json").write_text(tok.json, encoding="utf-8")
    else:
        tokenizers.Tokenizer.from_str(tok.json).model.save(str(path))  # vocab.json, merges.txt
    return path


# ---------------------------------------------------------------------------------------------------- encoding


def test_bpe_round_trip_and_reference_encoding(bpe, corpus_text):
    ref = tokenizers.Tokenizer.from_str(bpe.json)
    for text in (MULTILINGUAL, corpus_text[:5000], "", " ", "\n\n", "🙂"):
        ids = bpe.encode(text)
        assert (
            ids.dtype == np.uint16
            and ids.tolist() == ref.encode(text, add_special_tokens=False).ids
        )
        assert bpe.decode(ids) == text
    ids = bpe.encode(MULTILINGUAL)
    assert len(ids) < len(MULTILINGUAL.encode("utf-8"))  # merges happened
    assert bpe.decode(ids.tolist()) == MULTILINGUAL
    with pytest.raises(
        UserError, match="token id 400 is outside the bpe tokenizer's vocabulary 0..399"
    ):
        bpe.decode([1, 400])


def test_bpe_training_matches_reference_and_is_deterministic(bpe, corpus_text):
    again = BPETokenizer.train(iter(corpus_text.splitlines(keepends=True)), 400)
    assert again.json == bpe.json and again.sha256 == bpe.sha256 and bpe.vocab_size == 400
    ref = reference_bpe(iter(corpus_text.splitlines(keepends=True)), 400)
    assert ref.encode(MULTILINGUAL).ids == bpe.encode(MULTILINGUAL).tolist()


@pytest.mark.parametrize("kind", ["vocab-merges", "json"])
def test_gpt2_format_directory(bpe, tmp_path, kind):
    d = write_gpt2_tokenizer(tmp_path / "tok", bpe, kind)
    tok = BPETokenizer.from_dir(d)
    assert tok.name == "gpt2-bpe" and tok.vocab_size == bpe.vocab_size
    if kind == "json":
        ref = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    else:  # tokenizers' own GPT-2-style implementation from the two files
        ref = tokenizers.ByteLevelBPETokenizer(
            str(d / "vocab.json"), str(d / "merges.txt"), add_prefix_space=False
        )
    for text in (MULTILINGUAL, word_text(50)):
        assert tok.encode(text).tolist() == ref.encode(text).ids == bpe.encode(text).tolist()
        assert tok.decode(tok.encode(text)) == text
    assert BPETokenizer.from_dir(d).sha256 == tok.sha256  # the same directory: the same identity


def test_tokenizer_directory_without_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        UserError, match=r"'.*empty' has neither tokenizer.json nor vocab.json \+ merges.txt"
    ) as e:
        BPETokenizer.from_dir(tmp_path / "empty")
    assert "\n" not in str(e.value)
    (tmp_path / "empty" / "vocab.json").write_text("{}")  # half of the pair is not enough
    with pytest.raises(UserError, match="has neither"):
        BPETokenizer.from_dir(tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        BPETokenizer.from_dir(tmp_path / "absent")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json: not a readable tokenizers JSON file"):
        BPETokenizer.from_dir(tmp_path / "bad")


def test_bpe_meta_round_trip_and_tampering(bpe):
    meta = bpe.meta()
    assert set(meta) == {"tokenizer", "vocab_size", "tokenizer_sha256", "tokenizer_json"}
    # through JSON, as meta.json and the checkpoint hold it
    tok = tokenizer_from_meta(json.loads(json.dumps(meta)))
    assert (
        tok.encode(MULTILINGUAL).tolist() == bpe.encode(MULTILINGUAL).tolist()
        and tok.sha256 == bpe.sha256
    )
    with pytest.raises(UserError, match="tokenizer_sha256.*does not match"):
        tokenizer_from_meta(
            {**meta, "tokenizer_json": meta["tokenizer_json"].replace('"the"', '"teh"', 1)}
        )
    with pytest.raises(UserError, match="vocab_size.*401.*has 400 tokens"):
        tokenizer_from_meta({**meta, "vocab_size": 401})
    with pytest.raises(UserError, match="tokenizer_json"):
        # an ids-only GPT-2 import
        tokenizer_from_meta({"tokenizer": "gpt2-bpe", "vocab_size": 50257})


# ---------------------------------------------------------------------------------------------------- prepare


def all_ids(out: Path) -> np.ndarray:
    data = TokenData(out)
    return np.concatenate([data.split("train"), data.split("val")]).astype(np.int64)


def test_prepare_bpe_equals_whole_file_encoding(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    texts = [word_text(600, seed=1), MULTILINGUAL * 3, word_text(30, seed=2)]
    for i, t in enumerate(texts):
        (src / f"{i}.txt").write_text(t, encoding="utf-8")
    piece = 1000  # the first file alone is cut into many pieces
    assert len(plan_pieces(sorted(src.iterdir()), piece)) > 20
    meta = prepare([src], tmp_path / "out", tokenizer="bpe", vocab_size=350, piece_bytes=piece)
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 350 and meta["dtype"] == "uint16"
    ref = tokenizers.Tokenizer.from_str(meta["tokenizer_json"])
    sep = ref.encode("\n").ids
    expected = []
    for i, t in enumerate(texts):  # each file encoded whole, "\n" between files (docs/data.md)
        expected += ref.encode(t).ids + (sep if i < len(texts) - 1 else [])
    ids = all_ids(tmp_path / "out")
    assert ids.tolist() == expected and meta["max_id"] == max(expected)
    assert TokenData(tmp_path / "out").tokenizer.decode(ids) == "\n".join(texts)
    # the trained tokenizer does not depend on the piece size either
    again = prepare([src], tmp_path / "again", tokenizer="bpe", vocab_size=350)
    assert again == {**meta, "sources": again["sources"]}
    assert (tmp_path / "again" / "train.bin").read_bytes() == (
        tmp_path / "out" / "train.bin"
    ).read_bytes()


@pytest.mark.parametrize("kind", ["vocab-merges", "json"])
def test_prepare_with_gpt2_tokenizer_dir(bpe, tmp_path, kind):
    d = write_gpt2_tokenizer(tmp_path / "tok", bpe, kind)
    (tmp_path / "in.txt").write_text(MULTILINGUAL * 4, encoding="utf-8")
    meta = prepare(
        [tmp_path / "in.txt"], tmp_path / "out", tokenizer="gpt2", tokenizer_dir=d, piece_bytes=300
    )
    tok = BPETokenizer.from_dir(d)
    assert (meta["tokenizer"], meta["vocab_size"], meta["tokenizer_sha256"]) == (
        "gpt2-bpe",
        tok.vocab_size,
        tok.sha256,
    )
    # MULTILINGUAL's line ends are not all between visible ASCII: pieces cut only where the encoding is unchanged
    assert all_ids(tmp_path / "out").tolist() == tok.encode(MULTILINGUAL * 4).tolist()


# Llama 3's pre-tokenizer regex (a Split before a ByteLevel without its own regex)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_byte_level(regex: str, behavior: str = "isolated"):
    pt = tokenizers.pre_tokenizers
    return pt.Sequence(
        [
            pt.Split(tokenizers.Regex(regex), behavior),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def test_prepare_refuses_a_metaspace_tokenizer(tmp_path):
    """A SentencePiece-style tokenizer.json (Metaspace) adds "▁" at the start of every string it encodes: encoded
    piece by piece, the corpus would get one at every cut. prepare refuses it in one line, before writing anything."""
    vocab = {"<unk>": 0, "▁": 1, "a": 2, "b": 3, "c": 4, "d": 5, "\n": 6}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    whole = tok.encode("ab\ncd", add_special_tokens=False).ids
    pieces = (
        tok.encode("ab\n", add_special_tokens=False).ids
        + tok.encode("cd", add_special_tokens=False).ids
    )
    # the wrong tokens prepare would write
    assert whole == [1, 2, 3, 6, 4, 5] and pieces == [1, 2, 3, 6, 1, 4, 5]
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "in.txt").write_text("ab\ncd\n" * 200)
    expect = (
        r"tok/tokenizer.json: pre-tokenizer Metaspace is not byte-level .*; hpc_llm streams the corpus in "
        r"pieces and supports byte-level BPE tokenizers only$"
    )
    with pytest.raises(UserError, match=expect) as e:
        prepare(
            [tmp_path / "in.txt"],
            tmp_path / "out",
            tokenizer="gpt2",
            tokenizer_dir=tmp_path / "tok",
            piece_bytes=100,
        )
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_streaming_problem_accepts_byte_level_bpe_only(bpe):
    """What --tokenizer-dir accepts: a BPE model, a byte-level pre-tokenizer without a prefix space that splits
    after every "x\\ny", a normalizer that adds no text (none or NFC). Anything else is named."""
    tk, pt, nm = tokenizers, tokenizers.pre_tokenizers, tokenizers.normalizers

    def problem(pre, normalizer=None, model=None):
        tok = tk.Tokenizer(model or tk.models.BPE(vocab={"a": 0}, merges=[]))
        if pre is not None:
            tok.pre_tokenizer = pre
        if normalizer is not None:
            tok.normalizer = normalizer
        return BPETokenizer(tok, "gpt2-bpe").streaming_problem()

    assert bpe.streaming_problem() is None  # GPT-2's recipe (hpc_llm's trained BPE uses it)
    assert problem(_split_then_byte_level(LLAMA3_REGEX), nm.NFC()) is None  # Llama 3 / Qwen 2 style
    for args, match in (
        ((pt.Metaspace(),), "pre-tokenizer Metaspace is not byte-level"),
        ((None,), "pre-tokenizer none is not byte-level"),
        (
            (pt.Sequence([pt.ByteLevel(add_prefix_space=False), pt.Digits()]),),
            r"ByteLevel\+Digits is not",
        ),
        ((pt.ByteLevel(add_prefix_space=True),), "add_prefix_space true"),
        (
            (pt.ByteLevel(add_prefix_space=False), nm.Sequence([nm.Prepend("▁")])),
            "normalizer Prepend is not",
        ),
        (
            (pt.ByteLevel(add_prefix_space=False), nm.Lowercase()),
            "normalizer Lowercase is not supported",
        ),
        ((_split_then_byte_level(" ", "merged_with_next"),), "behavior MergedWithNext"),
        (
            (pt.ByteLevel(add_prefix_space=False, use_regex=False),),
            r"does not split after the line break in",
        ),
        ((_split_then_byte_level(r"[^ ]+"),), r"does not split after the line break in 'a\\na'"),
        (
            (
                pt.ByteLevel(add_prefix_space=False),
                None,
                tk.models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"),
            ),
            "model WordPiece is not BPE",
        ),
    ):
        assert re.search(match, problem(*args) or ""), (args, problem(*args))


def test_prepare_with_a_split_then_byte_level_tokenizer(tmp_path, corpus_text):
    """A Llama-3-style pre-tokenizer (Split regex, then ByteLevel) with an NFC normalizer is accepted, and the
    pieces' encoding is the whole file's."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = _split_then_byte_level(LLAMA3_REGEX)
    tok.normalizer = tokenizers.normalizers.NFC()
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(
        corpus_text.splitlines(keepends=True),
        tokenizers.trainers.BpeTrainer(
            vocab_size=400,
            show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    text = word_text(300, seed=3) + MULTILINGUAL * 4
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    prepare(
        [tmp_path / "in.txt"],
        tmp_path / "out",
        tokenizer="gpt2",
        tokenizer_dir=tmp_path / "tok",
        piece_bytes=300,
    )
    assert len(plan_pieces([tmp_path / "in.txt"], 300)) > 20
    assert all_ids(tmp_path / "out").tolist() == tok.encode(text, add_special_tokens=False).ids


def test_check_same_tokenizer(bpe):
    """The one comparison train (resume, init_from) and eval make: by (name, vocab_size, sha256) for BPE, the whole
    meta otherwise; an ids-only gpt2-bpe import only warns; a checkpoint recording no tokenizer is not checked."""
    byte = {"tokenizer": "byte", "vocab_size": 256}
    char = {"tokenizer": "char", "vocab_size": 3, "chars": "abc"}
    gpt2 = {**bpe.meta(), "tokenizer": "gpt2-bpe"}
    assert check_same_tokenizer(byte, dict(byte), "checkpoint c.h5", "data.path=d") is None
    assert check_same_tokenizer(None, byte, "checkpoint c.h5", "data.path=d") is None
    # the same BPE without its long JSON compares equal: the sha256 identifies it
    assert check_same_tokenizer(bpe.meta(), {**bpe.meta(), "tokenizer_json": "x"}, "c", "d") is None
    for theirs, mine, match in (
        (
            byte,
            char,
            "checkpoint c.h5 was trained on data with the byte tokenizer, vocab 256, but data.path=d "
            "has the char tokenizer, vocab 3, 3 chars 'abc'...",
        ),
        (
            char,
            {**char, "chars": "abd"},
            "the char tokenizer, vocab 3, 3 chars 'abc'..., but data.path=d has the "
            "char tokenizer, vocab 3, 3 chars 'abd'",
        ),
        (
            gpt2,
            bpe.meta(),
            f"the gpt2-bpe tokenizer, vocab 400, sha256 {bpe.sha256[:12]}, but data.path=d has "
            f"the bpe tokenizer, vocab 400, sha256 {bpe.sha256[:12]}",
        ),
    ):
        with pytest.raises(UserError) as e:
            check_same_tokenizer(theirs, mine, "checkpoint c.h5", "data.path=d")
        assert match in str(e.value) and "\n" not in str(e.value)
    warning = check_same_tokenizer(
        {"tokenizer": "gpt2-bpe", "vocab_size": 400}, char, "checkpoint c.h5", "--data d"
    )
    assert warning == (
        "checkpoint c.h5 was trained on gpt2-bpe tokens, which hpc_llm cannot check against --data d "
        "(char tokenizer): its ids must mean the same tokens"
    )


def test_eval_open_split_checks_the_tokenizer_as_train_does(tmp_path, caplog):
    """eval's open_split uses the same check: an ids-only gpt2-bpe import warns and evaluates (it used to be refused:
    its meta differs from any data's), another tokenizer is refused naming both."""
    from types import SimpleNamespace

    from hpc_llm.infer.evaluate import open_split

    (tmp_path / "in.txt").write_text("hello world\n" * 20)
    prepare([tmp_path / "in.txt"], tmp_path / "data")
    ids_only = SimpleNamespace(
        path="g.h5", state={"tokenizer": {"tokenizer": "gpt2-bpe", "vocab_size": 256}}
    )
    with caplog.at_level("WARNING", logger="hpc_llm.infer.evaluate"):
        tokens = open_split(ids_only, tmp_path / "data", "val")
    assert len(tokens) == TokenData(tmp_path / "data").meta["n_val"]
    assert (
        "checkpoint g.h5 was trained on gpt2-bpe tokens, which hpc_llm cannot check against --data"
        in caplog.text
    )
    char = SimpleNamespace(
        path="c.h5", state={"tokenizer": {"tokenizer": "char", "vocab_size": 3, "chars": "abc"}}
    )
    with pytest.raises(
        UserError,
        match=r"checkpoint c.h5 was trained on data with the char tokenizer, vocab 3, .*, "
        r"but --data .*data has the byte tokenizer, vocab 256$",
    ):
        open_split(char, tmp_path / "data", "val")


def test_prepare_bpe_options_checked(tmp_path):
    (tmp_path / "in.txt").write_text("hello world\n" * 50)
    for kwargs, match in (
        ({"tokenizer": "bpe"}, "needs --vocab-size"),
        ({"tokenizer": "bpe", "vocab_size": 256}, r"--vocab-size: expected an integer in 257\.\."),
        ({"tokenizer": "bpe", "vocab_size": 2**32 + 1}, "4294967296"),
        ({"tokenizer": "byte", "vocab_size": 300}, "--vocab-size is for --tokenizer bpe"),
        ({"tokenizer": "gpt2"}, "--tokenizer gpt2 goes with --tokenizer-dir"),
        ({"tokenizer": "char", "tokenizer_dir": tmp_path}, "--tokenizer-dir with --tokenizer gpt2"),
        ({"tokenizer": "gpt2", "tokenizer_dir": tmp_path}, "has neither tokenizer.json"),
        ({"memory_mb": 1}, "memory_mb is 1, expected an integer of at least 4"),
    ):
        with pytest.raises(UserError, match=match):
            prepare([tmp_path / "in.txt"], tmp_path / "out", **kwargs)
        assert not (tmp_path / "out").exists()


def test_uint32_token_files_beyond_65536(tmp_path):
    """A vocabulary of 70256 whose byte symbols sit at ids 70000.. (fillers below them): every id needs uint32."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {f"<filler{i}>": i for i in range(70000)} | {
        ch: 70000 + i for i, ch in enumerate(alphabet)
    }
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    text = MULTILINGUAL * 3
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    meta = prepare(
        [tmp_path / "in.txt"], tmp_path / "out", tokenizer="gpt2", tokenizer_dir=tmp_path / "tok"
    )
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70256 and meta["max_id"] >= 70000
    n = len(text.encode("utf-8"))  # no merges: one id per byte
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * meta["n_train"] and meta[
        "n_train"
    ] + meta["n_val"] == n
    data = TokenData(tmp_path / "out")
    assert data.split("train").dtype == np.dtype("<u4")
    ids = all_ids(tmp_path / "out")
    assert ids.tolist() == tok.encode(text).ids and ids.min() >= 70000
    assert data.tokenizer.decode(ids) == text
    x, y = get_batch(data.split("train"), 16, 2, seed=0, step=0)
    assert x.min() >= 70000 and y.max() < 70256


# ---------------------------------------------------------------------------------------------------- import + generate


def _cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "hpc_llm", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def write_gpt2_model(path: Path, vocab_size: int, seed: int = 0) -> Path:
    """A tiny random GPT-2 in Hugging Face's format (config.json + model.safetensors), made as test_gpt2_import.py
    makes them (helpers.hf_config, helpers.hf_tensors)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = hf_tensors(seed)
    tensors["transformer.wte.weight"] = (rng.standard_normal((vocab_size, N_EMBD)) * 0.5).astype(
        np.float32
    )
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].copy()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(hf_config(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0))
    )
    save_file(tensors, str(path / "model.safetensors"))
    assert N_POSITIONS >= 16
    return path


@pytest.mark.parametrize("kind", ["vocab-merges", "json"])
def test_import_gpt2_with_tokenizer_generates_text(bpe, tmp_path, kind):
    import hpc_llm
    from hpc_llm import checkpoint as ckpt

    d = write_gpt2_tokenizer(write_gpt2_model(tmp_path / "gpt2", bpe.vocab_size), bpe, kind)
    out = tmp_path / "gpt2.h5"
    r = _cli("import-gpt2", d, "--out", out)
    assert r.returncode == 0, r.stderr
    state = ckpt.load_checkpoint(out, optimizer=False).state
    ref_tok = BPETokenizer.from_dir(d)
    assert state["tokenizer"] == ref_tok.meta()  # the whole tokenizer travels in the checkpoint
    prompt = "Grüße 你好 🙂 the"
    tok = hpc_llm.load_tokenizer(out)
    ref = (
        tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        if kind == "json"
        else tokenizers.ByteLevelBPETokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    )
    assert tok.encode(prompt).tolist() == ref.encode(prompt).ids

    r = _cli("generate", out, "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    model = hpc_llm.load_model(out)
    ids = tok.encode(prompt).astype(np.int64)
    for _ in range(6):  # greedy decoding by hand: the CLI's text is the decode of these ids
        ids = np.append(ids, int(np.argmax(model.logits(ids[None])[0, -1])))
    assert r.stdout == tok.decode(ids) + "\n" and r.stdout.startswith(prompt)


def test_import_gpt2_tokenizer_larger_than_model(bpe, tmp_path):
    d = write_gpt2_tokenizer(write_gpt2_model(tmp_path / "gpt2", 300), bpe, "json")
    r = _cli("import-gpt2", d, "--out", tmp_path / "x.h5")
    assert (
        r.returncode == 2
        and "the tokenizer has 400 tokens, more than the model's vocab_size 300" in r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.h5").exists()
