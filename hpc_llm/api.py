"""The Python API for scripts and notebooks: a checkpoint in, a model (and its tokenizer) out.

import hpc_llm
model = hpc_llm.load_model("runs/default/ckpt_00002000.h5")
tok = hpc_llm.load_tokenizer("runs/default/ckpt_00002000.h5")
logits = model.logits(tok.encode("To be")[None])          # (1, T, vocab)
grads = model.gradients(x, y)                            # {"h.0.attn.c_attn.weight": array, ...}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hpc_llm.backend import get_backend
from hpc_llm.checkpoint import Checkpoint, CheckpointFile, find_latest, open_latest
from hpc_llm.config import config_from_dict
from hpc_llm.data.tokenizer import tokenizer_from_meta
from hpc_llm.errors import UserError
from hpc_llm.infer.quantize import check_quantize, quantize_model
from hpc_llm.model.gpt import GPT
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.grid import check_layout


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a run directory meaning its newest verified checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = find_latest(path)
        if found is None:
            raise UserError(f"{path}: no verified checkpoint in this directory")
        return found
    return path


def load_model(
    path,
    backend: str = "numpy",
    dtype: str | None = None,
    quantize: str | None = None,
    tp_comm: Comm | None = None,
) -> GPT:
    """The model stored in a checkpoint (its parameters checksum-verified) or a run directory's newest one;
    dtype="float64" gives a float64 copy for analysis; quantize="int8" int8 weights (hpc_llm/infer/quantize.py: a
    float32 model for inference only). tp_comm: a tensor-parallel group (hpc_llm.parallel.grid), each of whose ranks
    calls this and reads only its shards."""
    with open_checkpoint(path) as saved:
        return model_from_file(saved, backend, dtype, quantize, tp_comm)


def open_checkpoint(path) -> CheckpointFile:
    """A checkpoint (or a run directory's newest) open for reading in pieces: its header, config and state read.
    A run directory's is held open from before its verification (rundir.open_latest): a live run pruning it
    meanwhile cannot take it away."""
    path = Path(path)
    if not path.is_dir():
        return CheckpointFile(path)
    found = open_latest(path)
    if found is None:
        raise UserError(f"{path}: no verified checkpoint in this directory")
    return found


def model_config(saved, dtype: str | None = None):
    """The model section of a checkpoint's config (a Checkpoint or a CheckpointFile), dtype overridden if given."""
    cfg = config_from_dict(saved.config).model
    if dtype is not None:
        if dtype not in ("float32", "float64"):
            raise UserError(f"--dtype: expected float32 or float64, got {dtype!r}")
        cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg


def model_from_file(
    saved: CheckpointFile,
    backend: str = "numpy",
    dtype: str | None = None,
    quantize: str | None = None,
    tp_comm: Comm | None = None,
    agree: Comm | None = None,
) -> GPT:
    """Build the model of an open checkpoint on this rank of `tp_comm` (none: one process): each rank reads only
    the hyperslabs of its shards and checksums its share of the file's datasets (as a resumed trainer does), the
    ranks agreeing on the verdict over `agree` (default: tp_comm); then int8-quantized if asked (each rank its
    shards). Every rank of tp_comm must call it."""
    tp = tp_comm if tp_comm is not None else Comm(None)
    group = agree if agree is not None else tp

    def build():
        cfg = model_config(saved, dtype)
        check_quantize(quantize, cfg.dtype, backend)
        check_layout(tp.size, tp.size, 1, cfg.n_head, cfg.padded_vocab, cfg.mlp_width)
        return GPT(cfg, get_backend(backend), seed=None, tp_comm=tp)

    model = group.agree(build, "building the model")

    def read():
        saved.share(group.rank, group.size)
        model.read_flat(
            model.flat,
            lambda name, index, out=None: saved.read("params", name, index, out),
            saved.shapes["params"],
            f"{saved.path} parameters",
        )
        saved.verify_share()
        model.refresh_compute()

    group.agree(read, "reading the checkpoint")
    if quantize is not None:
        quantize_model(model, quantize)
    return model


def load_tokenizer(path):
    """The tokenizer the checkpoint's model was trained with."""
    with open_checkpoint(path) as saved:
        return tokenizer_of(saved)


def tokenizer_of(saved: Checkpoint):
    meta = saved.state.get("tokenizer")
    # hpc_llm/tools/gpt2_import.py from a directory without tokenizer files: ids only
    if (
        isinstance(meta, dict)
        and meta.get("tokenizer") == "gpt2-bpe"
        and "tokenizer_json" not in meta
    ):
        raise UserError(
            f"{saved.path}: imported GPT-2 weights, whose tokenizer (gpt2-bpe) hpc_llm does not "
            "include: the import directory had no tokenizer.json (or vocab.json + merges.txt); re-import "
            "with them, or tokenize with your own tool and use the Python API on token ids"
        )
    try:
        return tokenizer_from_meta(meta if isinstance(meta, dict) else {})
    except UserError as e:  # its messages name meta.json, whose copy the checkpoint's state holds
        raise UserError(
            f"{saved.path}: the tokenizer recorded in the checkpoint: "
            f"{str(e).removeprefix('meta.json: ')}"
        ) from None
