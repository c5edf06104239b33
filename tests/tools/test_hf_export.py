"""Exporting a checkpoint to the Hugging Face GPT-2 format: import-gpt2(export-hf(CKPT)) is CKPT (its parameters
bitwise, its tokenizer); the tensors have GPT-2's names, shapes and formats; the committed export (made by
scripts/dev/make_hf_fixture.py) gives transformers' logits and token ids. Bad input: tests/cli/test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from helpers import FIXTURES, tiny_config, train

safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import load_file  # noqa: E402

import hpc_llm  # noqa: E402
from hpc_llm.checkpoint import load_checkpoint  # noqa: E402
from hpc_llm.checkpoint.serial import save_fresh_checkpoint  # noqa: E402
from hpc_llm.cli import main as cli_main  # noqa: E402
from hpc_llm.config import Config, ModelConfig  # noqa: E402
from hpc_llm.config.checks import validated  # noqa: E402
from hpc_llm.data.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer  # noqa: E402
from hpc_llm.errors import UserError  # noqa: E402
from hpc_llm.model.layout import param_specs  # noqa: E402
from hpc_llm.parallel.grid import single_process_grid  # noqa: E402
from hpc_llm.tools import hf_export  # noqa: E402
from hpc_llm.tools.gpt2_import import import_gpt2  # noqa: E402
from hpc_llm.tools.merge_lora import merge_lora  # noqa: E402

EXPORT_DIR = FIXTURES / "hf_export_tiny"
EXPORT_REFERENCE = FIXTURES / "hf_export_tiny_reference.safetensors"
FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
TEXT = "To be, or not to be: that is\nthe question, é"
C, L, H, T = 8, 2, 2, 16


def gpt2_shapes(V: int, C: int = C, L: int = L, T: int = T) -> dict[str, tuple]:
    """GPT-2's tensor names and shapes as transformers' save_pretrained writes them (Conv1D weights (in, out))."""
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes |= {p + ln + ".weight": (C,), p + ln + ".bias": (C,)}
        for layer, n_in, n_out in (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C)):
            shapes |= {p + layer + ".weight": (n_in, n_out), p + layer + ".bias": (n_out,)}
        for layer, n_in, n_out in (("mlp.c_fc", C, 4 * C), ("mlp.c_proj", 4 * C, C)):
            shapes |= {p + layer + ".weight": (n_in, n_out), p + layer + ".bias": (n_out,)}
    return shapes | {"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}


def make_checkpoint(path: Path, tok, seed: int = 0, **model) -> Path:
    """A checkpoint of seeded random weights (wte's padding rows too: the export must drop them)."""
    cfg = Config()
    cfg.model = ModelConfig(
        n_layer=L, n_head=H, n_embd=C, block_size=T, vocab_size=tok.vocab_size, **model
    )
    cfg = validated(cfg)
    rng = np.random.default_rng(seed)
    params = {
        s.name: rng.normal(0.0, 0.3, s.shape).astype(np.float32) for s in param_specs(cfg.model)
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_fresh_checkpoint(path, params, {"tokenizer": tok.meta(), "data_path": ""}, cfg.to_dict())
    return path


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([TEXT, "Whether 'tis nobler in the mind to suffer"], vocab_size=280)


def test_round_trip_is_bitwise(tmp_path, bpe):
    """A run directory exported and imported again: every parameter bitwise (wte without its padding rows, which no
    logit reads), the tokenizer's JSON byte for byte; the tensors have GPT-2's names and shapes."""
    older = make_checkpoint(tmp_path / "run" / "ckpt_00000001.h5", bpe, seed=1)
    ckpt = make_checkpoint(tmp_path / "run" / "ckpt_00000002.h5", bpe, seed=2)
    done = hpc_llm.export_hf(tmp_path / "run", tmp_path / "hf")
    assert done.out == tmp_path / "hf" and done.files == FILES and done.notes == []
    V = bpe.vocab_size
    assert V % 64 and json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == V
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == gpt2_shapes(V)
    assert all(v.dtype == np.float32 for v in tensors.values())

    back = load_checkpoint(import_gpt2(tmp_path / "hf", tmp_path / "back.h5"), optimizer=False)
    orig = load_checkpoint(ckpt, optimizer=False)
    assert not np.array_equal(
        orig.params["wte.weight"], load_checkpoint(older).params["wte.weight"]
    )
    assert sorted(back.params) == sorted(orig.params)
    for name, want in orig.params.items():
        got = back.params[name]
        if name == "wte.weight":
            assert not got[V:].any()
            got, want = got[:V], want[:V]
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    theirs, mine = back.state["tokenizer"], orig.state["tokenizer"]
    assert theirs["tokenizer_json"] == mine["tokenizer_json"]
    assert theirs["tokenizer_sha256"] == mine["tokenizer_sha256"] and theirs["vocab_size"] == V


def test_a_trained_run_saved_by_the_parts_writer(tmp_path, data_dir):
    """A real run's checkpoint, its tensors virtual datasets over part files: the export holds its parameters."""
    import h5py

    cfg = tiny_config(
        data_dir, tmp_path / "run", **{"train.max_iters": 2, "checkpoint.writer": "parts"}
    )
    ckpt = train(cfg, single_process_grid()).summary["checkpoint"]
    with h5py.File(ckpt, "r") as f:
        assert f["params/wte.weight"].is_virtual
    hpc_llm.export_hf(tmp_path / "run", tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    want = load_checkpoint(ckpt, optimizer=False).params
    assert sorted(tensors) == sorted("transformer." + n for n in want)
    for name, value in want.items():
        value = value[:256] if name == "wte.weight" else value
        assert np.array_equal(tensors["transformer." + name], value), name


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_formats_are_the_fp32_tensors_rounded(tmp_path, bpe, dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ckpt = make_checkpoint(tmp_path / "ck.h5", bpe)
    hpc_llm.export_hf(ckpt, tmp_path / "hf32")
    argv = ["export-hf", str(ckpt), "--out", str(tmp_path / "hf16"), "--dtype", dtype]
    assert cli_main(argv) == 0
    low = ml_dtypes.bfloat16 if dtype == "bf16" else np.float16
    fp32 = load_file(str(tmp_path / "hf32" / "model.safetensors"))
    half = load_file(str(tmp_path / "hf16" / "model.safetensors"))
    assert sorted(half) == sorted(fp32)
    for name, x in fp32.items():
        assert half[name].dtype == np.dtype(low), name
        assert half[name].view(np.uint16).tobytes() == x.astype(low).view(np.uint16).tobytes(), name
    config = json.loads((tmp_path / "hf16" / "config.json").read_text())
    assert config["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]


def test_bf16_rounds_ties_to_even_and_fp16_overflow_is_refused(tmp_path):
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-20), 3.0e38], dtype=np.float32)
    words = np.frombuffer(hf_export._encoded("x", x, "bf16"), dtype="<u2")
    assert words.tolist() == [0x3F80, 0x3F82, 0xBF81, 0x7F62]
    with pytest.raises(
        UserError, match=r"tensor x has values beyond fp16's range \(largest magnitude 3e\+38\)"
    ):
        hf_export._encoded("x", x, "fp16")


def test_lora_is_merged_as_merge_lora_merges(tmp_path, bpe):
    ckpt = make_checkpoint(
        tmp_path / "lora.h5", bpe, lora_rank=2, lora_targets=["attn.c_attn", "mlp.c_fc"]
    )
    done = hpc_llm.export_hf(ckpt, tmp_path / "hf")
    assert done.notes == ["LoRA adapters merged (rank 2, scale 4)"]
    hpc_llm.export_hf(merge_lora(ckpt, tmp_path / "merged.h5"), tmp_path / "hf_merged")
    for name in FILES:
        assert (tmp_path / "hf" / name).read_bytes() == (
            tmp_path / "hf_merged" / name
        ).read_bytes(), name


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_byte_and_char_tokenizers_encode_as_ours(tmp_path, kind):
    """Their tokenizer.json, which AutoTokenizer wraps as it is, gives our ids and text back; model.bias = false is
    written as zero biases and computes our logits."""
    tok = ByteTokenizer() if kind == "byte" else CharTokenizer(TEXT)
    ckpt = make_checkpoint(tmp_path / "ck.h5", tok, bias=False)
    done = hpc_llm.export_hf(ckpt, tmp_path / "hf")
    assert done.files == FILES and "model.bias = false: written with zero biases" in done.notes[0]
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    ids = theirs.encode(TEXT).ids
    assert ids == tok.encode(TEXT).tolist() and theirs.decode(ids) == TEXT
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == gpt2_shapes(tok.vocab_size)
    assert not any(v.any() for k, v in tensors.items() if k.endswith(".bias"))
    idx = np.asarray(ids[:T])[None]
    want = hpc_llm.load_model(ckpt).logits(idx)
    got = hpc_llm.load_model(import_gpt2(tmp_path / "hf", tmp_path / "back.h5")).logits(idx)
    assert np.array_equal(got, want)


def test_force_replaces_and_a_model_gpt2_cannot_express_is_refused(tmp_path, bpe, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "ck.h5", bpe)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("an earlier export")
    hpc_llm.export_hf(ckpt, tmp_path / "hf", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.h5", "hf"]  # no temporary left
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == FILES
    # a [model] field the exporter does not know (here: bias, as if it did not) refuses a model away from its default
    monkeypatch.setattr(hf_export, "_EXPRESSED", hf_export._EXPRESSED - {"bias"})
    plain = make_checkpoint(tmp_path / "plain.h5", bpe, bias=False)
    with pytest.raises(
        UserError, match=r"plain.h5: model.bias = False: GPT-2's format .* cannot express it"
    ):
        hpc_llm.export_hf(plain, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------------------------------
# the committed export, run by transformers


@pytest.fixture(scope="module")
def reference() -> dict:
    """transformers' logits and token ids for the committed export; a missing fixture is a failure, never a skip."""
    for name in FILES:
        assert (EXPORT_DIR / name).is_file(), (
            f"{EXPORT_DIR / name}: missing; scripts/dev/make_hf_fixture.py"
        )
    with safetensors.safe_open(str(EXPORT_REFERENCE), framework="np") as f:
        meta = f.metadata()
    assert meta["transformers"] and meta["text"]
    return {**load_file(str(EXPORT_REFERENCE)), "text": meta["text"]}


def test_committed_export_matches_transformers(reference, tmp_path):
    ckpt = import_gpt2(EXPORT_DIR, tmp_path / "tiny.h5")
    idx = reference["idx"]
    assert (
        reference["logits_fp64"].std() > 1.0
    )  # a non-trivial model: the comparison means something
    got64 = hpc_llm.load_model(ckpt, dtype="float64").logits(idx)
    rel = np.abs(got64 - reference["logits_fp64"]).max() / np.abs(reference["logits_fp64"]).max()
    assert rel < 1e-10  # the import test's bounds: float64 roundoff ...
    got32 = hpc_llm.load_model(ckpt).logits(idx)
    rel = np.abs(got32 - reference["logits_fp32"]).max() / np.abs(reference["logits_fp32"]).max()
    assert rel < 1e-5  # ... and float32's
    ours = hpc_llm.load_tokenizer(ckpt)
    assert ours.encode(reference["text"]).tolist() == reference["text_ids"].tolist()
    # and today's exporter writes the committed files again, byte for byte
    hpc_llm.export_hf(ckpt, tmp_path / "again")
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (EXPORT_DIR / name).read_bytes(), name
