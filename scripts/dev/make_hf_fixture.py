"""Write the Hugging Face GPT-2 reference fixture that tests/tools/test_gpt2_import.py compares hpc_llm against.

This script needs torch and transformers, which neither CI nor the project's .venv installs: run it once, in a
throwaway environment outside the repository, and commit what it writes:

    python3 -m venv /tmp/hfvenv
    /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /tmp/hfvenv/bin/python scripts/dev/make_hf_fixture.py

It writes, under tests/fixtures/ (replacing what is there):

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

Deterministic: one CPU thread, fixed seeds; running it twice writes byte-identical files (check with sha256sum).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import safetensors
import torch
import transformers
from safetensors.numpy import save_file

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


def main() -> None:
    torch.set_num_threads(1)  # reductions in one fixed order: byte-identical output on every run
    torch.use_deterministic_algorithms(True)
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


if __name__ == "__main__":
    main()
