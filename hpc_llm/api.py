"""The Python API for scripts and notebooks: a checkpoint in, a model (and its tokenizer) out.

    import hpc_llm
    model = hpc_llm.load_model("runs/default/ckpt_00002000.h5")
    tok = hpc_llm.load_tokenizer("runs/default/ckpt_00002000.h5")
    logits = model.logits(tok.encode("To be")[None])          # (1, T, vocab)
    grads = model.gradients(x, y)                            # {"h.0.attn.c_attn.weight": array, ...}
"""

from __future__ import annotations

from pathlib import Path

from hpc_llm import checkpoint as ckpt
from hpc_llm.backend import get_backend
from hpc_llm.config import config_from_dict
from hpc_llm.data import tokenizer_from_meta
from hpc_llm.errors import UserError
from hpc_llm.model.gpt import GPT


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a run directory meaning its newest verified checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = ckpt.find_latest(path)
        if found is None:
            raise UserError(f"{path}: no verified checkpoint in this directory")
        return found
    return path


def load_model(path, backend: str = "numpy", dtype: str | None = None) -> GPT:
    """The model stored in a checkpoint (its parameters checksum-verified) or a run directory's newest one;
    dtype="float64" gives a float64 copy for analysis."""
    return model_from_checkpoint(ckpt.load_checkpoint(resolve_checkpoint(path), optimizer=False), backend, dtype)


def model_from_checkpoint(saved: ckpt.Checkpoint, backend: str = "numpy", dtype: str | None = None) -> GPT:
    cfg = config_from_dict(saved.config).model
    if dtype is not None:
        cfg.dtype = dtype
    model = GPT(cfg, get_backend(backend), seed=None)
    model.load_state(saved.params)
    return model


def load_tokenizer(path):
    """The tokenizer the checkpoint's model was trained with."""
    return _tokenizer(ckpt.load_checkpoint(resolve_checkpoint(path), optimizer=False))


def load_model_and_tokenizer(path, backend: str = "numpy"):
    """Both from one read of the checkpoint (what `hpc-llm generate` needs)."""
    saved = ckpt.load_checkpoint(resolve_checkpoint(path), optimizer=False)
    return model_from_checkpoint(saved, backend), _tokenizer(saved)


def _tokenizer(saved: ckpt.Checkpoint):
    meta = saved.state.get("tokenizer")
    if isinstance(meta, dict) and meta.get("tokenizer") == "gpt2-bpe":  # hpc_llm/gpt2_import.py
        raise UserError(f"{saved.path}: imported GPT-2 weights, whose tokenizer (gpt2-bpe) hpc_llm does not "
                        "include: tokenize with your own tool and use the Python API on token ids")
    try:
        return tokenizer_from_meta(meta if isinstance(meta, dict) else {})
    except UserError as e:  # its messages name meta.json, whose copy the checkpoint's state holds
        raise UserError(f"{saved.path}: the tokenizer recorded in the checkpoint: "
                        f"{str(e).removeprefix('meta.json: ')}") from None
