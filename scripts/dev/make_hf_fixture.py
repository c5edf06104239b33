"""Write the Hugging Face GPT-2 reference fixture that tests/tools/test_gpt2_import.py compares hpc_llm against.

This script needs torch and transformers, which neither CI nor the project's .venv installs: run it once, in a
throwaway environment outside the repository, and commit what it writes:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/hfvenv/bin/python scripts/dev/make_hf_fixture.py [import] [export] --hpc-python .venv/bin/python

(both parts when none is named). The export part runs hpc_llm itself (`hpc-llm export-hf`) with --hpc-python, the
project's own environment, in a subprocess. It writes, under tests/fixtures/ (replacing what is there):

import:

    hf_gpt2_tiny/config.json, hf_gpt2_tiny/model.safetensors
        a tiny random GPT2LMHeadModel (n_embd 32, 2 layers, 4 heads, 16 positions, vocab 77: not a multiple of 64,
        so our import pads wte), saved by save_pretrained(safe_serialization=True); nothing else is kept (our importer
        reads only these two files)
    hf_gpt2_tiny_reference.safetensors
        idx, targets            (2, 16) int64 token ids and next-token targets, fixed seed
        logits_fp32             transformers' float32 forward (eval mode)
        logits_fp64             the same model after model.double()
        loss_fp64               cross_entropy(logits_fp64, targets), the mean over all positions (what GPT.loss is)
        grad.<name>             float64 gradients of loss_fp64 for every parameter, under our names (HF's without
                                `transformer.`); lm_head is tied to wte, so grad.wte.weight includes the head's share
        metadata                the transformers, torch, safetensors and numpy versions and the attention kernel

export (tests/tools/test_hf_export.py):

    hf_export_tiny/
        what `hpc-llm export-hf` wrote from a small checkpoint this script makes with hpc_llm (seeded weights, a
        byte-level BPE of 270 tokens trained on a few lines, n_embd 8, 2 layers, 2 heads, 16 positions): config.json,
        generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    hf_export_tiny_reference.safetensors
        idx                     (2, 8) int64 token ids
        logits_fp32, logits_fp64  GPT2LMHeadModel.from_pretrained(hf_export_tiny)'s forward, float32 and after .double()
        text_ids                AutoTokenizer.from_pretrained(hf_export_tiny).encode(metadata["text"])
        metadata                versions, and the text

Deterministic: one CPU thread, fixed seeds; running it twice writes byte-identical files (check with sha256sum).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import safetensors
from safetensors.numpy import save_file

try:
    import torch
    import transformers
except (
    ImportError
):  # the --make-exported-checkpoint step runs in hpc_llm's environment, which has neither
    torch = transformers = None

N_EMBD, N_LAYER, N_HEAD, N_POSITIONS, VOCAB = 32, 2, 4, 16, 77
BATCH = 2
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
MODEL_DIR = FIXTURES / "hf_gpt2_tiny"
REFERENCE = FIXTURES / "hf_gpt2_tiny_reference.safetensors"
KEEP = ("config.json", "model.safetensors")  # what hpc_llm.tools.gpt2_import.read_gpt2_dir reads
PREFIX = "transformer."


def build_model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_positions=N_POSITIONS,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout
    with torch.no_grad():  # larger than the default init, so every parameter visibly matters
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if p.ndim > 1 else 0.2)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p += 1.0
    assert model.lm_head.weight is model.transformer.wte.weight, "expected lm_head tied to wte"
    return model


def save_model(model) -> None:
    if MODEL_DIR.exists():
        shutil.rmtree(MODEL_DIR)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    for path in MODEL_DIR.iterdir():  # e.g. generation_config.json: not read by our importer
        if path.name not in KEEP:
            path.unlink()
    assert sorted(p.name for p in MODEL_DIR.iterdir()) == sorted(KEEP), list(MODEL_DIR.iterdir())


def token_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(9)
    idx = rng.integers(0, VOCAB, size=(BATCH, N_POSITIONS), dtype=np.int64)
    idx[0, :3] = [0, VOCAB - 1, VOCAB - 1]  # the edges of the vocabulary
    targets = rng.integers(0, VOCAB, size=(BATCH, N_POSITIONS), dtype=np.int64)
    targets[1, -2:] = [0, VOCAB - 1]
    return idx, targets


def sort_metadata(path: Path) -> None:
    """safetensors writes `__metadata__` in a hash map's order, which changes from run to run: rewrite the header
    with its keys sorted (same length, tensors untouched) so the file is byte-identical on every run."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n, (len(new), n)
    data[8 : 8 + n] = new.ljust(n, b" ")  # safetensors pads the header with spaces
    path.write_bytes(bytes(data))


def make_import_fixture() -> None:
    model = build_model()
    save_model(model)
    idx, targets = token_data()
    x, y = torch.from_numpy(idx), torch.from_numpy(targets)

    with torch.no_grad():
        logits32 = model(x).logits
    assert logits32.dtype == torch.float32 and tuple(logits32.shape) == (BATCH, N_POSITIONS, VOCAB)

    model = model.double()
    model.zero_grad(set_to_none=True)
    logits64 = model(x).logits
    assert logits64.dtype == torch.float64
    # mean over B*T
    loss = torch.nn.functional.cross_entropy(logits64.reshape(-1, VOCAB), y.reshape(-1))
    loss.backward()

    out = {
        "idx": idx,
        "targets": targets,
        "logits_fp32": logits32.numpy().copy(),
        "logits_fp64": logits64.detach().numpy().copy(),
        "loss_fp64": np.asarray(loss.item(), dtype=np.float64),
    }
    names = []
    for name, p in model.named_parameters():  # the tied lm_head.weight is wte.weight, listed once
        ours = name.removeprefix(PREFIX)
        assert ours != name and p.grad is not None and p.grad.dtype == torch.float64, name
        out[f"grad.{ours}"] = p.grad.numpy().copy()
        names.append(ours)
    assert "wte.weight" in names and len(names) == len(set(names)) == 2 + 12 * N_LAYER + 2

    metadata = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "attn_implementation": str(model.config._attn_implementation),
        "made_by": "scripts/dev/make_hf_fixture.py",
    }
    save_file(out, str(REFERENCE), metadata=metadata)
    sort_metadata(REFERENCE)
    with safetensors.safe_open(
        str(REFERENCE), framework="np"
    ) as f:  # still a valid file, same contents
        assert f.metadata() == metadata and sorted(f.keys()) == sorted(out)
        assert all(np.array_equal(f.get_tensor(k), v) for k, v in out.items())
    size = sum(p.stat().st_size for p in [REFERENCE, *MODEL_DIR.iterdir()])
    print(json.dumps(metadata))
    print(f"wrote {MODEL_DIR} and {REFERENCE} ({size} bytes); loss {loss.item():.6f}")


# ---------------------------------------------------------------------------------------------------------------------
# the export fixture: a checkpoint made and exported by hpc_llm (in --hpc-python), run by transformers (here)

EXPORT_DIR = FIXTURES / "hf_export_tiny"
EXPORT_REFERENCE = FIXTURES / "hf_export_tiny_reference.safetensors"
EXPORT_TEXT = (
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
)
EXPORT_CORPUS = [
    EXPORT_TEXT,
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea",
]


def make_exported_checkpoint(tmp: str) -> None:
    """Run by --hpc-python: a small checkpoint (seeded weights, a trained BPE) exported by `hpc-llm export-hf`."""
    from hpc_llm.checkpoint.serial import save_fresh_checkpoint
    from hpc_llm.cli import main as hpc_llm_main
    from hpc_llm.config import Config, ModelConfig
    from hpc_llm.config.checks import validated
    from hpc_llm.data.tokenizer import BPETokenizer
    from hpc_llm.model.layout import param_specs

    tok = BPETokenizer.train(EXPORT_CORPUS, vocab_size=270)
    cfg = Config()
    cfg.model = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=16, vocab_size=tok.vocab_size)
    cfg = validated(cfg)
    rng = np.random.default_rng(31)
    params = {}
    for spec in param_specs(
        cfg.model
    ):  # larger than the default init, so every parameter visibly matters
        value = rng.normal(0.0, 0.3 if len(spec.shape) > 1 else 0.2, spec.shape)
        if spec.name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value += 1.0
        if spec.name == "wte.weight":
            value[cfg.model.vocab_size :] = 0.0  # the padding rows, as training leaves them
        params[spec.name] = value.astype(np.float32)
    ckpt = Path(tmp) / "tiny.h5"
    save_fresh_checkpoint(ckpt, params, {"tokenizer": tok.meta(), "data_path": ""}, cfg.to_dict())
    rc = hpc_llm_main(["export-hf", str(ckpt), "--out", str(EXPORT_DIR), "--force"])
    assert not rc, rc


def make_export_fixture(hpc_python: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [hpc_python, __file__, "--make-exported-checkpoint", tmp],
            check=True,
            cwd=FIXTURES.parents[1],
            env={**os.environ, "PYTHONPATH": str(FIXTURES.parents[1])},
        )
    model = transformers.GPT2LMHeadModel.from_pretrained(EXPORT_DIR).eval()
    tok = transformers.AutoTokenizer.from_pretrained(EXPORT_DIR)
    vocab = model.config.vocab_size
    idx = np.random.default_rng(7).integers(0, vocab, size=(2, 8), dtype=np.int64)
    idx[0, :2] = [0, vocab - 1]  # the edges of the vocabulary
    with torch.no_grad():
        logits32 = model(torch.from_numpy(idx)).logits.numpy().copy()
        logits64 = model.double()(torch.from_numpy(idx)).logits.numpy().copy()
    text_ids = np.asarray(tok.encode(EXPORT_TEXT), dtype=np.int64)
    assert tok.decode(text_ids.tolist()) == EXPORT_TEXT
    metadata = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizer_class": type(tok).__name__,
        "text": EXPORT_TEXT,
        "made_by": "scripts/dev/make_hf_fixture.py",
    }
    out = {"idx": idx, "logits_fp32": logits32, "logits_fp64": logits64, "text_ids": text_ids}
    save_file(out, str(EXPORT_REFERENCE), metadata=metadata)
    sort_metadata(EXPORT_REFERENCE)
    size = sum(p.stat().st_size for p in [EXPORT_REFERENCE, *EXPORT_DIR.iterdir()])
    print(f"wrote {EXPORT_DIR} and {EXPORT_REFERENCE} ({size} bytes); {json.dumps(metadata)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="*", metavar="import|export")
    p.add_argument(
        "--hpc-python", help="the Python of an environment with hpc_llm's dependencies (export)"
    )
    p.add_argument("--make-exported-checkpoint", metavar="TMP", help=argparse.SUPPRESS)
    args = p.parse_args()
    parts = args.parts or ["import", "export"]
    if set(parts) - {"import", "export"}:
        p.error(f"parts: expected import and/or export, got {parts}")
    if args.make_exported_checkpoint:
        make_exported_checkpoint(args.make_exported_checkpoint)
        return
    torch.set_num_threads(1)  # reductions in one fixed order: byte-identical output on every run
    torch.use_deterministic_algorithms(True)
    if "import" in parts:
        make_import_fixture()
    if "export" in parts:
        if not args.hpc_python:
            p.error("the export part needs --hpc-python")
        make_export_fixture(args.hpc_python)


if __name__ == "__main__":
    main()
