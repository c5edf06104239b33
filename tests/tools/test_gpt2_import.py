"""Importing a Hugging Face GPT-2 directory: our logits equal a float64 reference written from HF's GPT-2 definition;
the checkpoint is one the trainer resumes; bad directories are one-line UserErrors (exit 2 from the CLI).

The reference forward below is deliberately naive and independent of hpc_llm.model: it works on the HF tensors by
their HF names, loops over heads, builds the causal mask with np.tril, and writes gelu_new and LayerNorm out.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    FIXTURES,
    N_EMBD,
    N_HEAD,
    N_LAYER,
    N_POSITIONS,
    REPO,
    VOCAB,
    hf_config,
    hf_tensors,
)

safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import load_file, save_file  # noqa: E402

import hpc_llm  # noqa: E402
from hpc_llm import checkpoint as ckpt  # noqa: E402
from hpc_llm.config import ModelConfig, config_from_dict  # noqa: E402
from hpc_llm.errors import UserError  # noqa: E402
from hpc_llm.tools.gpt2_import import (  # noqa: E402
    gpt2_tensors_to_params,
    import_gpt2,
    read_gpt2_dir,
)

# ---------------------------------------------------------------------------------------------------------------------
# a tiny random GPT-2 directory, in Hugging Face's format


def write_dir(path: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(hf_config() if config is None else config, indent=2)
    )
    save_file(hf_tensors() if tensors is None else tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture()
def gpt2_dir(tmp_path) -> Path:
    return write_dir(tmp_path / "gpt2-tiny")


# ---------------------------------------------------------------------------------------------------------------------
# the independent reference: HF's GPT2LMHeadModel forward (eval mode), in float64


def ref_layernorm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased, as torch.nn.LayerNorm
    return (x - mu) / np.sqrt(var + eps) * w + b


def ref_gelu_new(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * np.power(x, 3.0))))


def ref_logits(tensors: dict, idx: np.ndarray, n_head: int = N_HEAD) -> np.ndarray:
    g = {
        k.removeprefix("transformer."): np.asarray(v, dtype=np.float64) for k, v in tensors.items()
    }
    B, T = idx.shape
    C = g["wte.weight"].shape[1]
    hd = C // n_head
    n_layer = len({k.split(".")[1] for k in g if k.startswith("h.")})
    causal = np.tril(np.ones((T, T), dtype=bool))
    h = g["wte.weight"][idx] + g["wpe.weight"][np.arange(T)][None]
    for i in range(n_layer):
        p = f"h.{i}."
        a_in = ref_layernorm(h, g[p + "ln_1.weight"], g[p + "ln_1.bias"])
        # Conv1D: x @ W + b, W (in, out)
        qkv = a_in @ g[p + "attn.c_attn.weight"] + g[p + "attn.c_attn.bias"]
        # split(split_size=n_embd, dim=2)
        q, k, v = (qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :])
        heads = []
        for hh in range(n_head):
            sl = slice(hh * hd, (hh + 1) * hd)
            scores = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / math.sqrt(hd)
            scores = np.where(causal, scores, -np.inf)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append((scores / scores.sum(-1, keepdims=True)) @ v[..., sl])
        attn = (
            np.concatenate(heads, axis=-1) @ g[p + "attn.c_proj.weight"] + g[p + "attn.c_proj.bias"]
        )
        h = h + attn
        m_in = ref_layernorm(h, g[p + "ln_2.weight"], g[p + "ln_2.bias"])
        m = ref_gelu_new(m_in @ g[p + "mlp.c_fc.weight"] + g[p + "mlp.c_fc.bias"])
        h = h + (m @ g[p + "mlp.c_proj.weight"] + g[p + "mlp.c_proj.bias"])
    h = ref_layernorm(h, g["ln_f.weight"], g["ln_f.bias"])
    return h @ g["wte.weight"].T  # lm_head tied to wte


def token_ids(seed: int = 1, batch: int = 3, T: int = N_POSITIONS) -> np.ndarray:
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(batch, T))
    ids[0, :3] = [0, VOCAB - 1, VOCAB - 1]  # the edges of the vocabulary
    return ids


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# ---------------------------------------------------------------------------------------------------------------------
# logits


def test_logits_equal_reference(gpt2_dir, tmp_path):
    out = import_gpt2(gpt2_dir, tmp_path / "ckpt" / "gpt2.h5")  # parent directory made
    assert out == tmp_path / "ckpt" / "gpt2.h5" and out.is_file()
    tensors = load_file(str(gpt2_dir / "model.safetensors"))
    idx = token_ids()
    ref = ref_logits(tensors, idx)
    assert ref.shape == (3, N_POSITIONS, VOCAB)
    assert ref.std() > 1.0  # a non-trivial model: the comparison below means something

    m64 = hpc_llm.load_model(out, dtype="float64")
    got64 = m64.logits(idx)
    assert got64.shape == ref.shape and got64.dtype == np.float64
    assert rel_err(got64, ref) < 1e-10

    m32 = hpc_llm.load_model(out)
    got32 = m32.logits(idx)
    assert got32.dtype == np.float32
    assert rel_err(got32, ref) < 1e-5

    # a shorter sequence (positions 0..T-1 only) and a single token
    assert rel_err(m64.logits(idx[:, :5]), ref_logits(tensors, idx[:, :5])) < 1e-10
    assert rel_err(m64.logits(idx[:1, :1]), ref_logits(tensors, idx[:1, :1])) < 1e-10


def test_keys_without_prefix_and_without_buffers_or_head(tmp_path):
    """The hub's gpt2 files store GPT2Model names (no `transformer.`); newer transformers save no mask buffers and
    drop the tied lm_head.weight."""
    tensors = hf_tensors(seed=3, prefix="", buffers=False, head=False)
    d = write_dir(tmp_path / "plain", tensors=tensors)
    out = import_gpt2(d, tmp_path / "plain.h5")
    idx = token_ids(seed=4, batch=2)
    assert (
        rel_err(hpc_llm.load_model(out, dtype="float64").logits(idx), ref_logits(tensors, idx))
        < 1e-10
    )


def test_mapping_pads_wte_and_renames(gpt2_dir):
    tensors = load_file(str(gpt2_dir / "model.safetensors"))
    mcfg = ModelConfig(
        n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=N_POSITIONS, vocab_size=VOCAB
    )
    params = gpt2_tensors_to_params(tensors, mcfg)
    from hpc_llm.model.layout import param_specs

    specs = param_specs(mcfg)
    assert list(params) == [s.name for s in specs]
    assert all(
        params[s.name].shape == s.shape and params[s.name].dtype == np.float32 for s in specs
    )
    wte = params["wte.weight"]
    assert wte.shape == (128, N_EMBD) and mcfg.padded_vocab == 128
    np.testing.assert_array_equal(wte[:VOCAB], tensors["transformer.wte.weight"])
    assert not wte[VOCAB:].any()
    np.testing.assert_array_equal(
        params["h.1.mlp.c_fc.weight"], tensors["transformer.h.1.mlp.c_fc.weight"]
    )

    cfg, params2 = read_gpt2_dir(gpt2_dir)
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.dropout, m.dtype) == (
        N_LAYER,
        N_HEAD,
        N_EMBD,
        N_POSITIONS,
        VOCAB,
        0.0,
        "float32",
    )
    assert all(np.array_equal(params[k], params2[k]) for k in params)


def _write_bf16_and_f16(path: Path, tensors: dict) -> dict:
    """float16 for the biases, bfloat16 (which NumPy lacks) for the weights; returns what the file holds, as float32."""
    from safetensors import serialize_file

    specs, keep, exact = {}, [], {}
    for k, v in tensors.items():
        if v.ndim >= 2:
            bits = np.ascontiguousarray((v.astype("<f4").view("<u4") >> 16).astype("<u2"))
            exact[k] = (bits.astype("<u4") << 16).view("<f4")
            dtype, data = "bfloat16", bits
        else:
            data = np.ascontiguousarray(v.astype("<f2"))
            exact[k] = data.astype(np.float32)
            dtype = "float16"
        keep.append(data)
        if hasattr(safetensors, "TensorSpec"):
            specs[k] = safetensors.TensorSpec(
                dtype=dtype, shape=list(data.shape), data_ptr=data.ctypes.data, data_len=data.nbytes
            )
        else:  # older safetensors take plain dicts
            specs[k] = {"dtype": dtype, "shape": list(data.shape), "data": data.tobytes()}
    serialize_file(specs, str(path))
    return exact


def _half_precision_dir_read_exactly(tmp_path):
    """A directory of bf16 and fp16 tensors; read_gpt2_dir gives their float32 values exactly. -> (dir, exact)."""
    tensors = hf_tensors(seed=5, buffers=False, head=False)
    d = tmp_path / "half"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config()))
    exact = _write_bf16_and_f16(d / "model.safetensors", tensors)
    _, params = read_gpt2_dir(d)
    np.testing.assert_array_equal(params["wte.weight"][:VOCAB], exact["transformer.wte.weight"])
    np.testing.assert_array_equal(params["h.0.ln_1.bias"], exact["transformer.h.0.ln_1.bias"])
    return d, exact


def test_half_precision_tensors_are_converted(tmp_path):
    d, exact = _half_precision_dir_read_exactly(tmp_path)
    out = import_gpt2(d, tmp_path / "half.h5")
    idx = token_ids(seed=6, batch=2)
    assert (
        rel_err(hpc_llm.load_model(out, dtype="float64").logits(idx), ref_logits(exact, idx))
        < 1e-10
    )


def test_bf16_tensors_when_ml_dtypes_is_loaded(tmp_path):
    """Once ml_dtypes is imported (bf16 training, gradient compression), safetensors hands bfloat16 tensors over as
    ml_dtypes arrays (dtype kind V, not f) instead of failing: they are converted to float32 exactly all the same."""
    import ml_dtypes  # noqa: F401

    _half_precision_dir_read_exactly(tmp_path)


def test_sharded_safetensors(tmp_path):
    tensors = hf_tensors(seed=7)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config()))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / fname))
    weight_map = {k: fname for fname, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    out = import_gpt2(d, tmp_path / "sharded.h5")
    idx = token_ids(seed=8, batch=2)
    assert (
        rel_err(hpc_llm.load_model(out, dtype="float64").logits(idx), ref_logits(tensors, idx))
        < 1e-10
    )


# ---------------------------------------------------------------------------------------------------------------------
# the checkpoint is a step-0 training checkpoint


def test_checkpoint_mirrors_trainer_save(gpt2_dir, tmp_path):
    out = import_gpt2(gpt2_dir, tmp_path / "gpt2.h5")
    saved = ckpt.load_checkpoint(out)
    assert set(saved.optimizer) == {"m", "v"}
    for slot in ("m", "v"):
        assert list(saved.optimizer[slot]) == list(saved.params)
        assert all(
            not a.any() and a.shape == saved.params[n].shape and a.dtype == np.float32
            for n, a in saved.optimizer[slot].items()
        )
    st = saved.state
    assert set(st) == {"step", "tokens_seen", "adam_t", "tokenizer", "data_path"}
    assert (st["step"], st["tokens_seen"], st["adam_t"], st["data_path"]) == (0, 0, 0, "")
    assert st["tokenizer"] == {"tokenizer": "gpt2-bpe", "vocab_size": VOCAB}
    from hpc_llm.train.metrics import Metrics

    assert {t: sorted(c) for t, c in saved.metrics.items()} == {
        t: sorted(c) for t, c in Metrics().as_dict().items()
    }
    assert all(len(col) == 0 for cols in saved.metrics.values() for col in cols.values())
    cfg = config_from_dict(saved.config)
    assert (
        cfg.model.vocab_size == VOCAB
        and cfg.model.block_size == N_POSITIONS
        and cfg.model.dtype == "float32"
    )
    assert cfg.to_dict() == saved.config  # a complete Config, defaults elsewhere

    # A directory without tokenizer files gives ids only: asking for the tokenizer is a clear UserError, not a crash.
    with pytest.raises(UserError, match="gpt2-bpe.*had no tokenizer.json"):
        hpc_llm.load_tokenizer(out)


def test_trainer_resumes_from_import(gpt2_dir, tmp_path):
    """`hpc-llm train --resume` accepts the file: the first step's loss is the imported model's loss on that batch."""
    from hpc_llm.config import Config
    from hpc_llm.data.prepare import prepare
    from hpc_llm.train.trainer import Trainer, train

    out = import_gpt2(gpt2_dir, tmp_path / "gpt2.h5")
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    # ~29 characters: fits in the 77-token vocabulary
    prepare([text], tmp_path / "data", tokenizer="char")
    cfg = Config()
    cfg.model = config_from_dict(ckpt.load_checkpoint(out).config).model
    cfg.data.path = str(tmp_path / "data")
    t = cfg.train
    t.batch_size, t.max_iters, t.eval_iters, t.warmup_iters, t.lr_decay_iters = 2, 2, 0, 0, 2
    t.out_dir, t.peak_tflops = str(tmp_path / "run"), 1.0
    trainer = Trainer(cfg, resume=str(out))
    x, y = trainer.batch(trainer.train_tokens, 0, 0, 0)
    expected = hpc_llm.load_model(out).loss(x, y)
    summary = train(cfg, resume=str(out))
    assert summary["step"] == 2
    first = ckpt.load_checkpoint(summary["checkpoint"]).metrics["train"]["loss"][0]
    assert first == pytest.approx(expected, rel=1e-6)


def _bpe_gpt2_dir(path: Path, vocab: int, tokenizer) -> Path:
    """A tiny GPT-2 of `vocab` tokens with a byte-level BPE tokenizer.json beside it."""
    t = hf_tensors()
    t["transformer.wte.weight"] = (
        np.random.default_rng(3).standard_normal((vocab, N_EMBD)) * 0.5
    ).astype(np.float32)
    t["lm_head.weight"] = t["transformer.wte.weight"].copy()
    d = write_dir(
        path, config=hf_config(vocab_size=vocab, bos_token_id=0, eos_token_id=0), tensors=t
    )
    (d / "tokenizer.json").write_text(tokenizer.json)
    return d


def test_resume_checks_the_tokenizer(tmp_path):
    """Fine-tuning an import: data prepared with the checkpoint's own tokenizer resumes; data of another tokenizer
    (same name and size would not do either: they compare by sha256) is a one-line UserError naming both."""
    from hpc_llm.config import Config
    from hpc_llm.data.prepare import prepare
    from hpc_llm.data.tokenizer import BPETokenizer
    from hpc_llm.train.trainer import Trainer

    text = tmp_path / "corpus.txt"
    text.write_text(
        "the quick brown fox jumps over the lazy dog.\nGrüße aus München\n" * 40, encoding="utf-8"
    )
    tok = BPETokenizer.train(iter(text.read_text().splitlines(keepends=True)), 300)
    d = _bpe_gpt2_dir(tmp_path / "gpt2", 300, tok)
    out = import_gpt2(d, tmp_path / "gpt2.h5")
    prepare([text], tmp_path / "same", tokenizer="gpt2", tokenizer_dir=d)
    other = tmp_path / "other"
    # trained anew: its own JSON, another hash
    prepare([text], other, tokenizer="bpe", vocab_size=tok.vocab_size)
    cfg = Config()
    cfg.model = config_from_dict(ckpt.load_checkpoint(out).config).model
    t = cfg.train
    t.batch_size, t.max_iters, t.eval_iters, t.warmup_iters, t.lr_decay_iters = 2, 2, 0, 0, 2
    t.out_dir, t.peak_tflops = str(tmp_path / "run"), 1.0
    cfg.data.path = str(tmp_path / "same")
    trainer = Trainer(cfg, resume=str(out))
    recorded = ckpt.load_checkpoint(out).state["tokenizer"]
    assert trainer.data.tokenizer.sha256 == tok.sha256 == recorded["tokenizer_sha256"]
    cfg.data.path = str(other)
    with pytest.raises(
        UserError,
        match=rf"gpt2-bpe tokenizer, vocab {tok.vocab_size}, sha256 {tok.sha256[:12]}, but "
        rf"data.path={other} has the bpe tokenizer",
    ) as e:
        Trainer(cfg, resume=str(out))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------------
# errors: one line, naming the file or key and what was expected


def _err(model_dir, match: str, out=None) -> str:
    with pytest.raises(UserError, match=match) as info:
        import_gpt2(model_dir, out or Path(model_dir).parent / "out.h5")
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_directory_and_files(tmp_path, gpt2_dir):
    _err(tmp_path / "nope", "does not exist")
    (gpt2_dir / "model.safetensors").unlink()
    msg = _err(gpt2_dir, "model.safetensors: not found")
    assert str(gpt2_dir) in msg
    (gpt2_dir / "config.json").unlink()
    _err(gpt2_dir, "config.json: not found")
    assert not (tmp_path / "out.h5").exists()


def test_pytorch_bin_only_gets_a_hint(gpt2_dir):
    (gpt2_dir / "model.safetensors").rename(gpt2_dir / "pytorch_model.bin")
    _err(gpt2_dir, "safe_serialization=True")


def test_not_gpt2_config(tmp_path):
    d = write_dir(tmp_path / "llama", config=hf_config(model_type="llama"))
    msg = _err(d, "model_type is 'llama', expected \"gpt2\"")
    assert "config.json" in msg
    cfg = hf_config()
    del cfg["n_head"]
    _err(write_dir(tmp_path / "nohead", config=cfg), "missing n_head")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    _err(tmp_path / "bad", "config.json: not readable JSON")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("activation_function", "gelu", "activation_function is 'gelu'"),
        ("activation_function", "relu", "gelu_new"),
        ("layer_norm_epsilon", 1e-6, "layer_norm_epsilon is 1e-06"),
        ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx is True"),
        ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn is True"),
        ("scale_attn_weights", False, "scale_attn_weights is False"),
        ("add_cross_attention", True, "add_cross_attention is True"),
        ("tie_word_embeddings", False, "untied LM heads are unsupported"),
        ("n_inner", 64, "n_inner is 64"),
        ("n_embd", 30, "not a multiple of n_head"),
        ("vocab_size", 0, "vocab_size is 0, expected a positive integer"),
    ],
)
def test_unsupported_options(tmp_path, key, value, match):
    d = write_dir(tmp_path / "m", config=hf_config(**{key: value}))
    assert "config.json" in _err(d, match)


def test_supported_option_variants(tmp_path):
    cfg = hf_config(activation_function="gelu_pytorch_tanh", n_inner=4 * N_EMBD)
    for k in ("layer_norm_epsilon", "scale_attn_weights", "tie_word_embeddings", "n_inner"):
        del cfg[k]  # absent: transformers' GPT2Config defaults, which are ours
    d = write_dir(tmp_path / "m", config=cfg)
    import_gpt2(d, tmp_path / "ok.h5")


def test_bad_tensors(tmp_path):
    t = hf_tensors()
    t["transformer.h.1.mlp.c_fc.weight"] = t[
        "transformer.h.1.mlp.c_fc.weight"
    ].T.copy()  # (out, in): nn.Linear
    msg = _err(write_dir(tmp_path / "shape", tensors=t), r"\(128, 32\), expected \(32, 128\)")
    assert "transformer.h.1.mlp.c_fc.weight" in msg and "model.safetensors" in msg

    t = hf_tensors()
    t["transformer.wte.weight"] = t["transformer.wte.weight"][:50].copy()
    t["lm_head.weight"] = t["transformer.wte.weight"]
    _err(
        write_dir(tmp_path / "vocab", tensors=t),
        r"transformer.wte.weight has shape \(50, 32\), expected \(77, 32\)",
    )

    t = hf_tensors()
    del t["transformer.h.1.ln_2.bias"]
    _err(write_dir(tmp_path / "missing", tensors=t), "missing tensor transformer.h.1.ln_2.bias")

    t = hf_tensors()
    t["lm_head.weight"] = t["lm_head.weight"] + 1
    _err(write_dir(tmp_path / "untied", tensors=t), "lm_head.weight differs .* untied")

    t = hf_tensors()
    t["score.weight"] = np.zeros((2, N_EMBD), np.float32)
    _err(write_dir(tmp_path / "extra", tensors=t), "unexpected tensor score.weight")

    t = hf_tensors()
    t["transformer.h.0.ln_1.bias"][3] = np.nan
    _err(write_dir(tmp_path / "nan", tensors=t), "h.0.ln_1.bias contains NaN")

    d = write_dir(tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _err(d, "model.safetensors: not a readable safetensors file")


def test_out_is_a_directory(gpt2_dir, tmp_path):
    _err(gpt2_dir, "is a directory", out=tmp_path)


def test_missing_safetensors_names_the_extra(gpt2_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors` raises ImportError
    _err(gpt2_dir, r"pip install hpc_llm\[import\]")


# ---------------------------------------------------------------------------------------------------------------------
# the CLI


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "hpc_llm", "import-gpt2", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_cli_import(gpt2_dir, tmp_path):
    out = tmp_path / "cli.h5"
    r = _cli(gpt2_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    idx = token_ids(batch=1)
    ref = ref_logits(load_file(str(gpt2_dir / "model.safetensors")), idx)
    assert rel_err(hpc_llm.load_model(out, dtype="float64").logits(idx), ref) < 1e-10


@pytest.mark.parametrize("case", ["no-weights", "not-gpt2", "bad-shape"])
def test_cli_errors(tmp_path, case):
    t = hf_tensors()
    if case == "bad-shape":
        t["transformer.wpe.weight"] = np.zeros((N_POSITIONS + 1, N_EMBD), np.float32)
    d = write_dir(
        tmp_path / "m",
        config=hf_config(model_type="bert") if case == "not-gpt2" else None,
        tensors=t,
    )
    if case == "no-weights":
        (d / "model.safetensors").unlink()
    r = _cli(d, "--out", tmp_path / "x.h5")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpc-llm: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert {
        "no-weights": "model.safetensors",
        "not-gpt2": "config.json",
        "bad-shape": "wpe.weight",
    }[case] in lines[0]
    assert not (tmp_path / "x.h5").exists()


# ---------------------------------------------------------------------------------------------------------------------
# against transformers' own GPT2LMHeadModel: a committed reference that scripts/dev/make_hf_fixture.py wrote with torch
# and transformers (which CI does not install), so this comparison always runs


# save_pretrained(safe_serialization=True) of a tiny random GPT2LMHeadModel
HF_DIR = FIXTURES / "hf_gpt2_tiny"
# its logits, loss and gradients on (idx, targets)
HF_REFERENCE = FIXTURES / "hf_gpt2_tiny_reference.safetensors"


@pytest.fixture(scope="module")
def hf_reference() -> dict:
    """The reference tensors; a missing fixture is a failure, never a skip."""
    for path in (HF_DIR / "config.json", HF_DIR / "model.safetensors", HF_REFERENCE):
        assert path.is_file(), (
            f"{path}: missing test fixture; regenerate it with scripts/dev/make_hf_fixture.py "
            "(its docstring says how: it needs torch and transformers)"
        )
    with safetensors.safe_open(str(HF_REFERENCE), framework="np") as f:
        meta = f.metadata() or {}
    assert meta.get("transformers") and meta.get("torch"), (
        f"{HF_REFERENCE}: no version metadata ({meta})"
    )
    ref = load_file(str(HF_REFERENCE))
    assert (
        ref["idx"].shape == ref["targets"].shape == (2, N_POSITIONS)
        and ref["idx"].dtype == np.int64
    )
    assert ref["logits_fp64"].shape == ref["logits_fp32"].shape == (2, N_POSITIONS, VOCAB)
    # a non-trivial model: the comparisons below mean something
    assert ref["logits_fp64"].std() > 1.0
    return ref


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory) -> Path:
    return import_gpt2(HF_DIR, tmp_path_factory.mktemp("hf") / "hf_gpt2_tiny.h5")


def test_logits_match_transformers(hf_reference, hf_checkpoint):
    idx = hf_reference["idx"]
    got64 = hpc_llm.load_model(hf_checkpoint, dtype="float64").logits(idx)
    assert got64.dtype == np.float64 and got64.shape == hf_reference["logits_fp64"].shape
    # Both sides compute the same function in float64 from the same float32 weights, in different orders (BLAS
    # blocking, fused vs separate ops, torch's SDPA attention): what differs is float64 roundoff through 2 layers,
    # ~1e-15 relative, far below anything a wrong mapping or formula would give.
    assert rel_err(got64, hf_reference["logits_fp64"]) < 1e-10
    got32 = hpc_llm.load_model(hf_checkpoint).logits(idx)
    assert got32.dtype == np.float32
    # float32 roundoff (eps 6e-8) on both sides
    assert rel_err(got32, hf_reference["logits_fp32"]) < 1e-5


def test_loss_and_gradients_match_transformers(hf_reference, hf_checkpoint):
    idx, targets = hf_reference["idx"], hf_reference["targets"]
    model = hpc_llm.load_model(hf_checkpoint, dtype="float64")
    loss_ref = float(hf_reference["loss_fp64"])
    assert abs(model.loss(idx, targets) - loss_ref) <= 1e-12 * abs(loss_ref)

    grads = model.gradients(idx, targets)
    ref = {k.removeprefix("grad."): v for k, v in hf_reference.items() if k.startswith("grad.")}
    assert sorted(grads) == sorted(ref), (
        "parameter names differ: "
        f"only ours {sorted(set(grads) - set(ref))}, only transformers' {sorted(set(ref) - set(grads))}"
    )
    assert len(ref) == 2 + 12 * N_LAYER + 2
    errors = {}
    for name, want in ref.items():
        got = grads[name]
        assert got.dtype == np.float64, name
        assert np.abs(want).max() > 0, (
            f"{name}: zero reference gradient, the comparison would mean nothing"
        )
        # ours is padded to padded_vocab rows; the padding gets no gradient
        if name == "wte.weight":
            assert got.shape == (128, N_EMBD) and want.shape == (VOCAB, N_EMBD)
            assert not got[VOCAB:].any(), "gradient in wte's padding rows"
            got = got[:VOCAB]
        assert got.shape == want.shape, name
        errors[name] = rel_err(got, want)
    bad = {k: e for k, e in errors.items() if not e < 1e-9}
    assert not bad, f"gradients differ from transformers' (relative error per tensor): {bad}"
