"""Tokenizers, prepare/TokenData round trips and their error paths, and the deterministic sampler."""

import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, run_mpi, write_run_config

from hpc_llm.data.corpus import expand_inputs, stdlib_corpus_files
from hpc_llm.data.pieces import Progress, plan_pieces
from hpc_llm.data.prepare import prepare, prepare_stdlib
from hpc_llm.data.sampler import check_split_size, get_batch
from hpc_llm.data.tokenizer import ByteTokenizer, CharTokenizer, ids_dtype, tokenizer_from_meta
from hpc_llm.data.tokens import TokenData, TokenFileCorrupt
from hpc_llm.errors import UserError

TEXT = "Hello, wörld! ✓ naïve café — 日本語 🙂\nsecond line"


# ---------------------------------------------------------------------------------------------------- tokenizers


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16
    # multi-byte characters really became several ids
    assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)
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


def test_char_character_between_vocabulary_entries_named():
    """A character whose code point lies between two of the vocabulary's (not past its end) is refused too."""
    tok = CharTokenizer("ac")
    with pytest.raises(UserError, match="'b'"):
        tok.encode("abc")


def test_ids_dtype_at_the_uint16_boundary():
    """uint16 token files while every id fits (vocab_size 65536: ids 0..65535), uint32 from 65537 on."""
    assert ids_dtype(256) == ids_dtype(65536) == np.dtype("<u2")
    assert ids_dtype(65537) == np.dtype("<u4")


def test_decode_refuses_the_id_past_the_vocabulary():
    """vocab_size itself is one past the last id: refused by decode, as any id beyond it."""
    with pytest.raises(UserError, match="256"):
        ByteTokenizer().decode([65, 256])
    with pytest.raises(UserError, match="token id 3 "):
        CharTokenizer("abc").decode([0, 3])


def test_tokenizer_from_meta():
    assert isinstance(tokenizer_from_meta({"tokenizer": "byte", "vocab_size": 256}), ByteTokenizer)
    tok = tokenizer_from_meta(CharTokenizer(TEXT).meta())
    assert tok.decode(tok.encode(TEXT)) == TEXT
    with pytest.raises(UserError, match="tokenizer"):
        tokenizer_from_meta({"tokenizer": "wordpiece", "vocab_size": 50257})
    with pytest.raises(UserError, match="tokenizer_json"):
        # a BPE's meta carries its JSON
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
    assert meta["format"] == "hpc_llm-tokens" and meta["format_version"] == 2
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and "chars" not in meta
    assert meta["dtype"] == "uint16" and meta["max_id"] == max(expected)
    assert (meta["n_train"], meta["n_val"]) == (n_train, n - n_train)
    assert (meta["n_files"], meta["n_skipped"]) == (4, 0)
    assert meta["sources"] == [str(src)]
    # no temp files left
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_pattern_and_explicit_file(tmp_path):
    src = tmp_path / "src"
    make_tree(src)
    extra = tmp_path / "extra.dat"
    extra.write_text("echo", encoding="utf-8")
    meta = prepare([src, extra], tmp_path / "out", val_fraction=0.5, pattern="*.txt")
    # a, b, c from the folder (d.md excluded by the pattern) + the explicit file
    assert meta["n_files"] == 4
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
    (src / "t.txt").write_text(
        "the quick brown fox jumps over the lazy dog " * 20, encoding="utf-8"
    )
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


@pytest.mark.parametrize("change", ["truncated", "longer"])
def test_tokendata_train_file_of_another_size(prepared, change):
    """A train.bin shorter or longer than meta.json's n_train tokens: refused at start-up, naming the file."""
    path = prepared / "train.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-2] if change == "truncated" else data + data[:2])
    with pytest.raises(UserError, match="train.bin.*expected"):
        TokenData(prepared)


def test_tokendata_max_id_beyond_vocab(prepared):
    """The start-up check reads meta.json's max_id (recorded by prepare), never the whole token file."""
    meta = json.loads((prepared / "meta.json").read_text())
    meta["max_id"] = 256
    (prepared / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match="max_id is 256: the token files contain token id 256, but vocab_size"
    ):
        TokenData(prepared)


def test_tokendata_does_not_scan_the_file(prepared):
    """Opening the data maps the files and reads none of their ids (the old start-up scan read all of train.bin on
    every rank): an id beyond the vocabulary that meta.json does not declare goes unnoticed until a batch meets it."""
    path = prepared / "train.bin"
    ids = np.fromfile(path, dtype=np.uint16)
    ids[-1] = 300
    ids.tofile(path)
    data = TokenData(prepared)
    assert len(data.split("train")) == data.meta["n_train"] and data.split("train").source == str(
        path
    )


def test_token_out_of_vocab_found_by_the_batch(prepared):
    """A token file edited after prepare (meta's max_id no longer true): the batch that gathers the bad id fails,
    naming the file; it is a fault (only ranks whose rows hold it see it), not a UserError."""
    path = prepared / "val.bin"
    ids = np.fromfile(path, dtype=np.uint16)
    ids[:] = 256  # every window holds it
    ids.tofile(path)
    data = TokenData(prepared)  # meta.json is unchanged: start-up cannot know
    with pytest.raises(
        TokenFileCorrupt, match="val.bin: contains token id 256, but vocab_size in meta.json is 256"
    ):
        get_batch(data.split("val"), 8, 2, seed=0, step=0, stream=1)
    assert not issubclass(TokenFileCorrupt, UserError)
    get_batch(data.split("train"), 8, 2, seed=0, step=0)  # the intact split still samples


def test_train_on_a_corrupted_token_file_ends_the_job(prepared, tmp_path):
    """Under `mpiexec -n 2 hpc-llm train`, ids edited into train.bin after prepare: the first batch finds them on the
    ranks whose rows hold them, and the job ends (exit 1, the line naming rank, phase and file), hanging nowhere."""

    ids = np.fromfile(prepared / "train.bin", dtype=np.uint16)
    ids[:] = 300
    ids.tofile(prepared / "train.bin")
    cfg = write_run_config(tmp_path / "cfg.toml", prepared, tmp_path / "run")
    rc, out, err, _ = run_mpi(2, ["train", str(cfg)])
    assert rc != 0 and rc != 2, (rc, err)
    assert (
        "failed in step 0: TokenFileCorrupt: " in err and "train.bin: contains token id 300" in err
    ), err


def test_tokendata_version_1_reads_as_uint16(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    meta["format_version"] = 1
    del meta["dtype"], meta["max_id"]
    (prepared / "meta.json").write_text(json.dumps(meta))
    data = TokenData(prepared)
    assert data.split("train").dtype == np.dtype("<u2")
    np.testing.assert_array_equal(
        data.split("train"), np.fromfile(prepared / "train.bin", dtype="<u2")
    )


@pytest.mark.parametrize("split", ["train", "val"])
def test_tokendata_version_1_ids_checked_at_start_up(prepared, monkeypatch, split):
    """Version 1 records no max_id: opening one reads each split once, in chunks (here 7 ids, so the bad id sits in
    a later chunk than the first), and an id beyond the vocabulary is a UserError naming the file."""
    meta = json.loads((prepared / "meta.json").read_text())
    meta["format_version"] = 1
    del meta["dtype"], meta["max_id"]
    (prepared / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setattr(TokenData, "SCAN_CHUNK", 7)
    TokenData(prepared)  # the intact files pass
    path = prepared / f"{split}.bin"
    ids = np.fromfile(path, dtype="<u2")
    assert len(ids) > 3 * 7
    ids[-2] = 300
    ids.tofile(path)
    with pytest.raises(
        UserError,
        match=rf"{split}.bin: contains token id 300, but vocab_size in meta.json is 256 "
        r"\(a format version 1 directory",
    ):
        TokenData(prepared)
    # version 2 trusts its max_id and reads nothing (test_tokendata_does_not_scan_the_file)
    (prepared / "meta.json").write_text(json.dumps({**meta, "format_version": 2, "max_id": 255}))
    assert len(TokenData(prepared).split(split)) == len(ids)


def test_tokendata_max_id_negative(prepared):
    """prepare refuses a corpus with an empty split, so it never writes a max_id below 0."""
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps({**meta, "max_id": -1}))
    with pytest.raises(UserError, match="field 'max_id' is -1, expected a non-negative integer"):
        TokenData(prepared)


def test_tokendata_dtype_checked(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    for dtype, match in (
        ("int8", "field \"dtype\" is 'int8'"),
        ("uint32", "train.bin: .* bytes, expected"),
    ):
        (prepared / "meta.json").write_text(json.dumps({**meta, "dtype": dtype}))
        with pytest.raises(UserError, match=match):
            TokenData(prepared)
    big = {
        **meta,
        "tokenizer": "char",
        "chars": "".join(chr(0x100 + i) for i in range(70000)),
        "vocab_size": 70000,
    }
    (prepared / "meta.json").write_text(json.dumps(big))
    with pytest.raises(UserError, match="dtype uint16 cannot hold the ids of vocab_size 70000"):
        TokenData(prepared)


# ---------------------------------------------------------------------------------------------------- sampling


# token value == position, so offsets can be read back from x
TOKENS = np.arange(1000, dtype=np.uint16)


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
        np.testing.assert_array_equal(xr, TOKENS[o : o + 16])
        np.testing.assert_array_equal(yr, TOKENS[o + 1 : o + 17])
    assert (offsets + 16 < len(TOKENS)).all()


def test_get_batch_matches_documented_rng():
    x, _ = get_batch(TOKENS, 16, 8, seed=5, step=2, micro=3, stream=1)
    expected = np.random.default_rng([5, 1, 2, 3]).integers(0, len(TOKENS) - 16, size=8)
    np.testing.assert_array_equal(x[:, 0], expected)


def test_get_batch_rank_slices_union_is_global():
    gx, gy = get_batch(TOKENS, 10, 12, seed=1, step=4)
    for world in (2, 3, 4):
        b = 12 // world
        parts = [
            get_batch(TOKENS, 10, 12, seed=1, step=4, rows=slice(r * b, (r + 1) * b))
            for r in range(world)
        ]
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
    assert stdlib_corpus_files(max_bytes // 2) == files[: len(stdlib_corpus_files(max_bytes // 2))]


def test_prepare_stdlib(tmp_path):
    meta = prepare_stdlib(tmp_path / "std", max_bytes=50_000, tokenizer="char")
    files = stdlib_corpus_files(50_000)
    assert meta["n_files"] == len(files) and meta["n_skipped"] == 0
    data = TokenData(tmp_path / "std")
    text = data.tokenizer.decode(np.concatenate([data.split("train"), data.split("val")]))
    assert text == "\n".join(f.read_text(encoding="utf-8") for f in files)


# ---------------------------------------------------------------------------------------------------- streaming


def write_corpus(src: Path, big_bytes: int = 600_000) -> Path:
    """Files of every kind prepare meets: a large one (many pieces), multilingual text, an empty file, a binary, and
    a large file whose non-UTF-8 byte comes only at its end (a later piece, maybe another rank's, must skip it all)."""
    src.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = "the of and to in is was for on that with as by at from Grüße Straße 你好 世界 🙂 def return x+1".split()
    lines, size = [], 0
    while size < big_bytes:
        lines.append(
            " ".join(words[i] for i in rng.integers(0, len(words), size=rng.integers(2, 12))) + "\n"
        )
        size += len(lines[-1].encode("utf-8"))
    big = "".join(lines)
    (src / "a_big.txt").write_text(big, encoding="utf-8")
    (src / "b_multi.txt").write_text(TEXT * 50, encoding="utf-8")
    (src / "c_empty.txt").write_text("")
    (src / "d_binary.bin").write_bytes(b"\xff\xfe\x00\x80" * 64)
    (src / "e_bad_tail.txt").write_bytes(big[: big_bytes // 2].encode("utf-8") + b"\xff")
    # cut at character starts only
    (src / "f_no_newlines.txt").write_text("日本語🙂" * 20_000, encoding="utf-8")
    return src


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_prepare_pieces_equal_whole_file_encoding(tmp_path, tokenizer):
    """Cut into ~3 KB pieces (line breaks, or character starts in the file without any), byte and char tokens are
    those of the whole corpus encoded at once, as the pre-streaming prepare read it."""
    from hpc_llm.data.tokenizer import make_tokenizer

    src = write_corpus(tmp_path / "src", 100_000)
    files = expand_inputs([src], "*")
    assert len(plan_pieces(files, 3000)) > 100
    meta = prepare([src], tmp_path / "out", tokenizer=tokenizer, piece_bytes=3000)
    texts = []
    for f in files:
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            pass
    text = "\n".join(texts)
    whole = make_tokenizer(tokenizer, chars=text).encode(text)
    data = TokenData(tmp_path / "out")
    np.testing.assert_array_equal(np.concatenate([data.split("train"), data.split("val")]), whole)
    assert (meta["n_files"], meta["n_skipped"], meta["max_id"]) == (len(texts), 2, int(whole.max()))
    assert meta["n_train"] == int(len(whole) * 0.9)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("tokenizer", ["byte", "char", "bpe"])
def test_parallel_prepare_equals_single_process(tmp_path, tokenizer, ranks):
    """`mpiexec -n N hpc-llm prepare`: every rank encodes its run of pieces; train.bin, val.bin and meta.json are the
    single-process files byte for byte (pieces from --memory-mb 4: ~128-256 KB, so each rank has several)."""

    src = write_corpus(tmp_path / "src")
    opts = ["--tokenizer", tokenizer, "--memory-mb", "4"] + (
        ["--vocab-size", "300"] if tokenizer == "bpe" else []
    )
    prepare(
        [src],
        tmp_path / "one",
        tokenizer=tokenizer,
        memory_mb=4,
        vocab_size=300 if tokenizer == "bpe" else None,
    )
    rc, out, err, _ = run_mpi(ranks, ["prepare", str(src), "--out", str(tmp_path / "par"), *opts])
    assert rc == 0, err
    assert out.count("prepared ") == 1  # one summary line, from rank 0
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "par" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), (
            name
        )
    assert sorted(p.name for p in (tmp_path / "par").iterdir()) == [
        "meta.json",
        "train.bin",
        "val.bin",
    ]
    # the ranks' records, beside the output while it ran (runtime/records.py), are gone with the job
    assert not list(tmp_path.glob(".hpc-llm-ranks*"))


SPLIT_FILES = ("train.bin", "val.bin", "meta.json")


@pytest.mark.timeout(300)
def test_a_prepare_killed_mid_way_leaves_temporaries_that_the_next_prepare_removes(
    tmp_path, monkeypatch
):
    """Rank 1 SIGKILLed while writing (mpiexec then kills rank 0): the part files and the temporary outputs stay, named
    with the run's tag. The next prepare into the same directory removes them, and only them (files of other names
    stay), and writes what an uninterrupted prepare writes, byte for byte."""
    src = write_corpus(tmp_path / "src")
    prepare([src], tmp_path / "one", memory_mb=4)
    par = tmp_path / "par"
    par.mkdir()
    keep = [".prepare.notes", "keep.tmp", ".train.bin.tmp", ".prepare.lock.old"]
    for name in keep:
        (par / name).write_text("not prepare's")
    cmd = ["prepare", str(src), "--out", str(par), "--memory-mb", "4"]
    monkeypatch.setenv("HPC_LLM_FAULT", "kill:prepare:1")
    rc, out, err, _ = run_mpi(2, cmd, timeout=150)
    assert rc != 0 and "signal 9" in err, err[-3000:]
    left = sorted(p.name for p in par.iterdir() if p.name not in keep)
    assert any(".part1." in n for n in left) and any(".train.bin." in n for n in left), left
    tags = {n.split(".")[2] for n in left if n.startswith(".prepare.") and n != ".prepare.lock"}
    assert len(tags) == 1, left  # one run, one tag, on every rank's files
    monkeypatch.delenv("HPC_LLM_FAULT")
    rc, out, err, _ = run_mpi(2, cmd, timeout=150)
    assert rc == 0, err[-3000:]
    assert "temporary files" in out and "left in" in out, out
    assert sorted(p.name for p in par.iterdir()) == sorted([*SPLIT_FILES, *keep])
    for name in SPLIT_FILES:
        assert (par / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


@pytest.mark.timeout(300)
def test_prepare_of_a_folder_into_a_subfolder_of_it_never_reads_its_own_output(tmp_path, caplog):
    """`prepare src --out src/tokens` twice: the second run does not read the first's token files as text; both
    write what a prepare into a directory outside src writes, and a log line says the directory was skipped."""
    src = write_corpus(tmp_path / "src", big_bytes=100_000)
    prepare([src], tmp_path / "outside", memory_mb=4)
    expected = {n: (tmp_path / "outside" / n).read_bytes() for n in SPLIT_FILES}
    for _ in range(2):
        with caplog.at_level("INFO"):
            prepare([src], src / "tokens", memory_mb=4)
        got = {n: (src / "tokens" / n).read_bytes() for n in SPLIT_FILES}
        assert got == expected
    assert "skipping the output directory" in caplog.text


def test_prepare_refused_leaves_no_trace(tmp_path):
    """A corpus found too small only after encoding: the output directory prepare made is removed again."""
    (tmp_path / "in.txt").write_text("a")
    with pytest.raises(UserError, match="only 1 tokens"):
        prepare([tmp_path / "in.txt"], tmp_path / "new" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


# VmHWM (the peak RSS of this process image; ru_maxrss would carry the forking pytest process's peak across exec)
_MEASURE = """
import sys
from hpc_llm.data.prepare import prepare
kw = {"tokenizer_dir": sys.argv[4]} if sys.argv[2] == "gpt2" else {}
prepare([sys.argv[1]], sys.argv[3], tokenizer=sys.argv[2], memory_mb=8, **kw)
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.skipif(
    not Path("/proc/self/status").is_file(), reason="VmHWM is read from Linux's /proc"
)
@pytest.mark.parametrize("tokenizer,mb", [("byte", 40), ("char", 40), ("gpt2", 12)])
def test_prepare_memory_bounded(tmp_path, tokenizer, mb):
    """--memory-mb 8 on a corpus of 40 MB (BPE: 12 MB, its encoder is slower): the peak RSS exceeds that of the same
    command on a 200 KB corpus by less than 2 x 8 MB (the budget plus allocator slack; measured: byte 5, char 1.4, BPE
    2 MB), where reading the corpus whole takes >= 4 bytes per byte (the bytes, the str, the uint16 ids): byte with a
    single 1 GB piece measured 288 MB.
    The tokens are the whole file's (byte: its bytes; char: the whole-text encoding)."""
    import subprocess

    from hpc_llm.data.tokenizer import BPETokenizer, CharTokenizer

    rng = np.random.default_rng(1)
    words = np.array("the of and to in is was for on that with Grüße 你好 🙂 def return".split())
    line_words = words[rng.integers(0, len(words), size=(mb * 1_000_000 // 50, 8))]
    text = "\n".join(" ".join(row) for row in line_words) + "\n"
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text(text, encoding="utf-8")
    small.write_text(text[:200_000], encoding="utf-8")
    extra = []
    if tokenizer == "gpt2":
        tok = BPETokenizer.train(iter(text[:300_000].splitlines(keepends=True)), 300)
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / "tokenizer.json").write_text(tok.json)
        extra = [str(tmp_path / "tok")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    peaks = {}
    for name, path in (("small", small), ("big", big)):
        r = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(path), tokenizer, str(tmp_path / name), *extra],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        peaks[name] = int(r.stdout.split()[-1])
    assert peaks["big"] - peaks["small"] < 2 * 8 * 2**20, peaks
    ids = np.concatenate([TokenData(tmp_path / "big").split(s) for s in ("train", "val")])
    if tokenizer == "byte":
        np.testing.assert_array_equal(ids, np.frombuffer(big.read_bytes(), dtype=np.uint8))
    elif tokenizer == "char":
        np.testing.assert_array_equal(ids, CharTokenizer(text).encode(text))
    else:
        assert (
            len(ids) < len(text.encode("utf-8"))
            and TokenData(tmp_path / "big").tokenizer.decode(ids) == text
        )


def test_progress_lines_in_a_batch_log(tmp_path, caplog, monkeypatch):
    """Not a terminal (a batch log): plain lines through logging, every 10% of each phase, ending at 100%."""
    import logging

    # the real threshold (32 MB) keeps small runs quiet
    monkeypatch.setattr(Progress, "LOG_MIN_BYTES", 0)
    caplog.set_level(logging.INFO, logger="hpc_llm.data.pieces")
    prepare(
        [write_corpus(tmp_path / "src", 50_000)],
        tmp_path / "out",
        tokenizer="char",
        piece_bytes=2000,
    )
    lines = [r.getMessage() for r in caplog.records]
    for phase in ("scan", "encode", "write"):
        mine = [m for m in lines if m.startswith(f"prepare: {phase} ")]
        assert len(mine) >= 10 and "100%" in mine[-1] and "MB/s" in mine[-1], (phase, mine)
