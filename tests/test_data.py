"""Tokenizers, prepare/TokenData round trips and their error paths, and the deterministic sampler."""

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from hpc_llm.data import (ByteTokenizer, CharTokenizer, TokenData, check_split_size, get_batch, prepare,
                          prepare_stdlib, stdlib_corpus_files, tokenizer_from_meta)
from hpc_llm.errors import UserError

TEXT = "Hello, wörld! ✓ naïve café — 日本語 🙂\nsecond line"


# ---------------------------------------------------------------------------------------------------- tokenizers


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16
    assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)  # multi-byte characters really became several ids
    assert ids.max() < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids.tolist()) == TEXT


def test_byte_decode_replaces_split_character():
    tok = ByteTokenizer()
    ids = tok.encode("é")  # two bytes; keep only the first
    assert tok.decode(ids[:1]) == "\ufffd"


def test_char_round_trip_and_vocab():
    tok = CharTokenizer(TEXT)
    assert tok.chars == "".join(sorted(set(TEXT)))
    assert tok.vocab_size == len(set(TEXT))
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16
    assert len(ids) == len(TEXT)
    assert [tok.chars[i] for i in ids] == list(TEXT)
    assert tok.decode(ids) == TEXT


def test_char_unknown_character_named():
    tok = CharTokenizer("abc")
    with pytest.raises(UserError, match="'z'"):
        tok.encode("abz")


def test_tokenizer_from_meta():
    assert isinstance(tokenizer_from_meta({"tokenizer": "byte", "vocab_size": 256}), ByteTokenizer)
    tok = tokenizer_from_meta(CharTokenizer(TEXT).meta())
    assert tok.decode(tok.encode(TEXT)) == TEXT
    with pytest.raises(UserError, match="tokenizer"):
        tokenizer_from_meta({"tokenizer": "bpe", "vocab_size": 50257})
    with pytest.raises(UserError, match="vocab_size"):
        tokenizer_from_meta({"tokenizer": "char", "chars": "abc", "vocab_size": 4})


# ---------------------------------------------------------------------------------------------------- prepare


def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_text("bravo ✓\n", encoding="utf-8")
    (root / "a.txt").write_text("alpha", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("charlie", encoding="utf-8")
    (root / "sub" / "deeper" / "d.md").write_text("delta", encoding="utf-8")


def test_prepare_byte_concatenation_split_and_meta(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    out = tmp_path / "out"
    meta = prepare([src], out, tokenizer="byte", val_fraction=0.25)

    # Sorted by path inside the folder, joined by newlines.
    expected = "\n".join(["alpha", "bravo ✓\n", "charlie", "delta"]).encode("utf-8")
    n = len(expected)
    n_train = int(n * 0.75)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert len(train) == n_train and len(val) == n - n_train
    assert bytes(np.concatenate([train, val]).astype(np.uint8)) == expected

    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert meta["format"] == "hpc_llm-tokens" and meta["format_version"] == 1
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and "chars" not in meta
    assert (meta["n_train"], meta["n_val"]) == (n_train, n - n_train)
    assert (meta["n_files"], meta["n_skipped"]) == (4, 0)
    assert meta["sources"] == [str(src)]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no temp files left


def test_prepare_pattern_and_explicit_file(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    extra = tmp_path / "extra.dat"
    extra.write_text("echo", encoding="utf-8")
    meta = prepare([src, extra], tmp_path / "out", val_fraction=0.5, pattern="*.txt")
    assert meta["n_files"] == 4  # a, b, c from the folder (d.md excluded by the pattern) + the explicit file
    data = TokenData(tmp_path / "out")
    text = data.tokenizer.decode(np.concatenate([data.split("train"), data.split("val")]))
    assert text == "alpha\nbravo ✓\n\ncharlie\necho"


def test_prepare_char_tokenizer(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    meta = prepare([src], tmp_path / "out", tokenizer="char")
    text = "\n".join(["alpha", "bravo ✓\n", "charlie", "delta"])
    assert meta["chars"] == "".join(sorted(set(text)))
    assert meta["vocab_size"] == len(set(text))
    data = TokenData(tmp_path / "out")
    assert isinstance(data.tokenizer, CharTokenizer)
    assert data.tokenizer.decode(np.concatenate([data.split("train"), data.split("val")])) == text


def test_prepare_skips_non_utf8(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("good text here", encoding="utf-8")
    (src / "bad.bin").write_bytes(b"\xff\xfe\x00binary\x80")
    meta = prepare([src], tmp_path / "out")
    assert (meta["n_files"], meta["n_skipped"]) == (1, 1)
    assert meta["n_train"] + meta["n_val"] == len("good text here")


def test_prepare_errors(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    with pytest.raises(UserError, match="nope"):
        prepare([tmp_path / "nope"], tmp_path / "out")
    for bad in (0, 1, -0.1, 1.5):
        with pytest.raises(UserError, match="val_fraction"):
            prepare([src], tmp_path / "out", val_fraction=bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty"):
        prepare([tmp_path / "empty"], tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- TokenData


@pytest.fixture
def prepared(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 20, encoding="utf-8")
    out = tmp_path / "data"
    prepare([src], out)
    return out


def test_tokendata_loads(prepared):
    data = TokenData(prepared)
    assert data.vocab_size == 256
    assert isinstance(data.split("train"), np.memmap)
    assert len(data.split("train")) == data.meta["n_train"]
    assert len(data.split("val")) == data.meta["n_val"]
    with pytest.raises(UserError):
        data.split("test")


def test_tokendata_missing_dir(tmp_path):
    with pytest.raises(UserError, match="hpc-llm prepare"):
        TokenData(tmp_path / "absent")
    with pytest.raises(UserError, match="meta.json"):
        TokenData(tmp_path)  # exists, but not prepared


def test_tokendata_foreign_meta(prepared):
    (prepared / "meta.json").write_text(json.dumps({"vocab_size": 256, "n_train": 1}))
    with pytest.raises(UserError, match="format"):
        TokenData(prepared)


def test_tokendata_future_version(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    meta["format_version"] = 99
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format_version 99"):
        TokenData(prepared)


def test_tokendata_truncated_train(prepared):
    path = prepared / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(UserError, match="train.bin"):
        TokenData(prepared)


def test_tokendata_token_out_of_vocab(prepared):
    path = prepared / "val.bin"
    ids = np.fromfile(path, dtype=np.uint16)
    ids[3] = 256
    ids.tofile(path)
    with pytest.raises(UserError, match="val.bin.*256"):
        TokenData(prepared)


# ---------------------------------------------------------------------------------------------------- sampling


TOKENS = np.arange(1000, dtype=np.uint16)  # token value == position, so offsets can be read back from x


def test_get_batch_deterministic_and_shifted():
    x1, y1 = get_batch(TOKENS, 16, 8, seed=7, step=3, micro=1)
    x2, y2 = get_batch(TOKENS, 16, 8, seed=7, step=3, micro=1)
    assert x1.dtype == np.int64 and y1.dtype == np.int64
    assert x1.shape == y1.shape == (8, 16)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
    offsets = x1[:, 0]
    for o, xr, yr in zip(offsets, x1, y1):
        np.testing.assert_array_equal(xr, TOKENS[o:o + 16])
        np.testing.assert_array_equal(yr, TOKENS[o + 1:o + 17])
    assert (offsets + 16 < len(TOKENS)).all()


def test_get_batch_matches_documented_rng():
    x, _ = get_batch(TOKENS, 16, 8, seed=5, step=2, micro=3, stream=1)
    expected = np.random.default_rng([5, 1, 2, 3]).integers(0, len(TOKENS) - 16, size=8)
    np.testing.assert_array_equal(x[:, 0], expected)


def test_get_batch_rank_slices_union_is_global():
    gx, gy = get_batch(TOKENS, 10, 12, seed=1, step=4)
    for world in (2, 3, 4):
        b = 12 // world
        parts = [get_batch(TOKENS, 10, 12, seed=1, step=4, rows=slice(r * b, (r + 1) * b)) for r in range(world)]
        assert all(p[0].shape == (b, 10) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), gx)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), gy)


def test_get_batch_varies_with_step_micro_stream_seed():
    base, _ = get_batch(TOKENS, 16, 8, seed=7, step=3)
    for kwargs in ({"step": 4}, {"micro": 1}, {"stream": 1}, {"seed": 8}):
        args = {"seed": 7, "step": 3, **kwargs}
        other, _ = get_batch(TOKENS, 16, 8, **args)
        assert not np.array_equal(base, other), kwargs


def test_get_batch_on_memmap(prepared):
    data = TokenData(prepared)
    train = data.split("train")
    x, y = get_batch(train, 8, 4, seed=0, step=0)
    o = np.random.default_rng([0, 0, 0, 0]).integers(0, len(train) - 8, size=4)
    np.testing.assert_array_equal(x, np.asarray(train)[o[:, None] + np.arange(8)])
    np.testing.assert_array_equal(y, np.asarray(train)[o[:, None] + np.arange(1, 9)])


def test_corpus_smaller_than_block():
    tokens = np.arange(10, dtype=np.uint16)
    with pytest.raises(UserError, match=r"'train' has 10 tokens, fewer than block_size\+1 = 11"):
        get_batch(tokens, 10, 2, seed=0, step=0)
    with pytest.raises(UserError, match=r"'val' has 10 tokens.*= 33"):
        get_batch(tokens, 32, 2, seed=0, step=0, stream=1)
    with pytest.raises(UserError, match=r"'val' has 10 tokens"):
        check_split_size(tokens, 10, "val")
    check_split_size(tokens, 9, "train")  # exactly block_size + 1 is enough
    x, y = get_batch(tokens, 9, 3, seed=0, step=0)
    np.testing.assert_array_equal(x, np.tile(np.arange(9), (3, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 10), (3, 1)))


# ---------------------------------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus_files():
    max_bytes = 300_000
    files = stdlib_corpus_files(max_bytes)
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert files, "the standard library should provide some .py files"
    assert sum(f.stat().st_size for f in files) <= max_bytes
    for f in files:
        assert f.suffix == ".py"
        rel = f.resolve().relative_to(root)  # raises if outside the stdlib
        assert not {"site-packages", "test", "tests", "idlelib"} & set(rel.parts[:-1])
    assert files == stdlib_corpus_files(max_bytes)  # deterministic
    assert stdlib_corpus_files(max_bytes // 2) == files[:len(stdlib_corpus_files(max_bytes // 2))]


def test_prepare_stdlib(tmp_path):
    meta = prepare_stdlib(tmp_path / "std", max_bytes=50_000, tokenizer="char")
    files = stdlib_corpus_files(50_000)
    assert meta["n_files"] == len(files) and meta["n_skipped"] == 0
    data = TokenData(tmp_path / "std")
    text = data.tokenizer.decode(np.concatenate([data.split("train"), data.split("val")]))
    assert text == "\n".join(f.read_text(encoding="utf-8") for f in files)
