"""Export a checkpoint to the Hugging Face GPT-2 format (`hpc-llm export-hf CKPT|RUN_DIR --out DIR`).

The directory is what `GPT2LMHeadModel.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load:

    config.json             GPT2Config's fields: n_embd, n_layer, n_head, n_positions (block_size), vocab_size (the
                            true vocabulary, not the padded one), the three dropouts (model.dropout), tied head
    model.safetensors       transformer.wte.weight (V rows), transformer.wpe.weight, transformer.h.N.* and
                            transformer.ln_f.*: our names with transformers' prefix, our (in, out) weights as they
                            are (its Conv1D layout); float32, or --dtype bf16 / fp16 (rounded to nearest even)
    generation_config.json  bos/eos token ids (GPT-2's "<|endoftext|>" when the vocabulary has it, else null)
    tokenizer.json          the checkpoint's tokenizer as a `tokenizers` JSON (hf_tokenizer.py), with
    tokenizer_config.json   PreTrainedTokenizerFast as its class, the special tokens, model_max_length

Only the parameters are read (never the Adam moments), one tensor at a time, each checked against its crc32, and each
written as it is read: memory is the largest tensor, whatever layout the checkpoint was saved at (its datasets are
logical). A LoRA checkpoint is merged on the way, as `hpc-llm merge-lora` merges it (W + s A B in float64, rounded
once). model.bias = false is written with zero biases: the same function (x + 0 = x). Anything else GPT-2's format
cannot express (a field of [model] away from its default that this exporter does not know) is refused, one line.
The files go to a temporary directory beside DIR, fsynced, then renamed to DIR.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpc_llm.api import open_checkpoint
from hpc_llm.checkpoint import CheckpointFile
from hpc_llm.config import ModelConfig, config_from_dict
from hpc_llm.errors import UserError
from hpc_llm.model.layout import param_specs
from hpc_llm.parallel.comm import world_comm
from hpc_llm.runtime.fsio import fsync_dir
from hpc_llm.tools.hf_tokenizer import tokenizer_files
from hpc_llm.tools.merge_lora import merged_weight

__all__ = ["DTYPES", "Exported", "export_hf", "hf_config"]

# --dtype -> (safetensors' dtype name, config.json's torch_dtype)
DTYPES = {"fp32": ("F32", "float32"), "bf16": ("BF16", "bfloat16"), "fp16": ("F16", "float16")}
PREFIX = "transformer."
WEIGHTS_FILE = "model.safetensors"
# the [model] fields this exporter writes (or merges, or writes as zero biases); any other must keep its default
_EXPRESSED = {
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "vocab_size",
    "dropout",
    "dtype",
    "bias",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
}
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass
class Exported:
    """What export_hf wrote: the directory, its files, and notes a user should read (one line each)."""

    out: Path
    files: list[str]
    notes: list[str]


# ---------------------------------------------------------------------------------------------------------------------
# checks before anything is read


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"export-hf --dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")


def check_out_dir(out: Path, inputs, force: bool) -> None:
    """--out: a directory path that is neither an input nor holds one; empty or absent (non-empty only with force)."""
    where = out.resolve()
    for given in inputs:
        src = Path(given).resolve()
        if src == where or where in src.parents:
            raise UserError(
                f"export-hf --out {out}: is the input {given}"
                + ("" if src == where else " (or holds it)")
                + "; writing it would destroy it: choose another output path"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"export-hf --out {out}: is a file, expected a directory path")
        if any(out.iterdir()) and not force:
            raise UserError(
                f"export-hf --out {out}: directory exists and is not empty: give --force to replace it"
            )


def check_expressible(m: ModelConfig, source: Path) -> None:
    """Every [model] field GPT-2's config.json cannot say must have its default."""
    plain = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        value = getattr(m, f.name)
        if f.name not in _EXPRESSED and value != getattr(plain, f.name):
            raise UserError(
                f"{source}: model.{f.name} = {value!r}: GPT-2's format (config.json, model.safetensors) "
                "cannot express it, so export-hf does not write this model"
            )


# ---------------------------------------------------------------------------------------------------------------------
# what is written


def hf_config(m: ModelConfig, dtype: str, special_id: int | None) -> dict:
    """config.json: transformers' GPT2Config fields, each set to what our model computes."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.block_size,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": special_id,
        "eos_token_id": special_id,
        "torch_dtype": DTYPES[dtype][1],
        "use_cache": True,
    }


def _encoded(name: str, value: np.ndarray, dtype: str) -> bytes:
    """One tensor's little-endian bytes in the format, rounded to nearest even; UserError if it does not fit."""
    if not np.isfinite(value).all():
        raise UserError(f"checkpoint tensor {name} contains NaN or infinite values")
    x = np.ascontiguousarray(value, dtype="<f4")
    if dtype == "bf16":
        # a bfloat16 is a float32's upper half: add half an ulp of it (ties to even), keep the top 16 bits
        bits = x.view("<u4")
        out = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype("<u2")
        overflow = (out & 0x7FFF) == 0x7F80
    elif dtype == "fp16":
        with np.errstate(over="ignore"):  # an overflow is refused below, naming the tensor
            out = np.asarray(value).astype("<f2")
        overflow = ~np.isfinite(out)
    else:
        return x.tobytes()
    if overflow.any():
        raise UserError(
            f"checkpoint tensor {name} has values beyond {dtype}'s range "
            f"(largest magnitude {float(np.abs(x).max()):.6g}): export it with --dtype fp32"
        )
    return out.tobytes()


def _header(shapes: list[tuple[str, tuple]], dtype: str) -> bytes:
    """The safetensors header: 8 bytes of length, then JSON padded with spaces to a multiple of 8."""
    st, size = DTYPES[dtype][0], 4 if dtype == "fp32" else 2
    head: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        n = int(np.prod(shape, dtype=np.int64)) * size
        head[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write(path: Path, data: bytes | str) -> None:
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------------------------
# reading the checkpoint


class _Params:
    """The checkpoint's parameters under GPT-2's names, one at a time: wte cut to the true vocabulary, LoRA merged,
    the biases of a bias-free model as zeros."""

    def __init__(self, saved: CheckpointFile, m: ModelConfig):
        self.saved, self.m = saved, m
        specs = param_specs(m)
        have = saved.shapes["params"]
        want = {s.name: s.shape for s in specs}
        for name, shape in want.items():
            if name not in have:
                raise UserError(f"{saved.path}: has no tensor params/{name} (its config needs it)")
            if tuple(have[name]) != tuple(shape):
                raise UserError(
                    f"{saved.path}: params/{name} has shape {tuple(have[name])}, expected {shape}"
                )
        extra = sorted(set(have) - set(want))
        if extra:
            raise UserError(f"{saved.path}: params/{extra[0]} is not a tensor of its model")
        gpt2 = dataclasses.replace(m, bias=True, lora_rank=0)
        self.shapes = [
            (s.name, (m.vocab_size, m.n_embd) if s.name == "wte.weight" else s.shape)
            for s in param_specs(gpt2)
        ]
        targets = m.lora_targets if m.lora_rank > 0 else []
        self.lora = {f"h.{i}.{t}.weight" for i in range(m.n_layer) for t in targets}

    def __getitem__(self, name: str) -> np.ndarray:
        if name.endswith(".bias") and not self.m.bias:
            return np.zeros(dict(self.shapes)[name], dtype=np.float32)
        value = self.saved.read_whole("params", name)
        if name in self.lora:
            a, b = (
                self.saved.read_whole("params", name[: -len("weight")] + k)
                for k in ("lora_A", "lora_B")
            )
            value = merged_weight(value, a, b, self.m.lora_scale)
        return value[: self.m.vocab_size] if name == "wte.weight" else value


# ---------------------------------------------------------------------------------------------------------------------
# the export


def _publish(tmp: Path, out: Path) -> None:
    """tmp renamed to out; an existing out (empty, or replaced under --force) moved aside first, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:  # the export is in place: a leftover of the old one is no failure
        shutil.rmtree(old, ignore_errors=True)


def _notes(m: ModelConfig, dtype: str) -> list[str]:
    notes = []
    if m.lora_rank > 0:
        notes.append(f"LoRA adapters merged (rank {m.lora_rank}, scale {m.lora_scale:g})")
    if not m.bias:
        notes.append("model.bias = false: written with zero biases (the same function)")
    if m.dtype != "float32" or dtype != "fp32":
        notes.append(f"tensors rounded from {m.dtype} to {DTYPES[dtype][1]}")
    return notes


def export_hf(path, out_dir, dtype: str = "fp32", force: bool = False) -> Exported:
    """Write the model of a checkpoint (a file, or a run directory: its newest verified checkpoint) as a Hugging Face
    GPT-2 directory at `out_dir` (made, with its parents; an existing non-empty one replaced only with `force`)."""
    check_dtype(dtype)
    out = Path(out_dir)
    check_out_dir(out, [path], force)
    # a run directory's newest held open from its choice to the end of the export: a live run's pruning leaves it
    with open_checkpoint(path) as saved:
        check_out_dir(out, [saved.path], force)
        m = config_from_dict(saved.config).model
        check_expressible(m, saved.path)
        params = _Params(saved, m)
        tok, special, notes = tokenizer_files(saved.state.get("tokenizer"), m, saved.path)
        # every rank would write the same directory: refused alike on each, after the inputs' checks
        if (ranks := world_comm().size) > 1:
            raise UserError(
                f"hpc-llm export-hf runs on one process, got {ranks} ranks: run it without mpiexec"
            )
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
            # mkdtemp's 0700 would outlive the rename: the mode a new directory gets
            umask = os.umask(0o22)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)
        except OSError as exc:
            raise UserError(
                f"export-hf --out {out}: cannot create it ({exc.strerror or exc})"
            ) from None
        try:
            with open(tmp / WEIGHTS_FILE, "wb") as f:
                f.write(_header([(PREFIX + n, s) for n, s in params.shapes], dtype))
                for name, _ in params.shapes:
                    f.write(_encoded(name, params[name], dtype))
                f.flush()
                os.fsync(f.fileno())
            texts = {
                "config.json": hf_config(m, dtype, special),
                "generation_config.json": {"bos_token_id": special, "eos_token_id": special},
                **tok,
            }
            for name, obj in texts.items():
                _write(
                    tmp / name, obj if isinstance(obj, str) else json.dumps(obj, indent=2) + "\n"
                )
            fsync_dir(tmp)
            _publish(tmp, out)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise UserError(
                    f"export-hf --out {out}: cannot write ({exc.strerror or exc})"
                ) from None
            raise
    files = sorted(p.name for p in out.iterdir())
    return Exported(out, files, _notes(m, dtype) + notes)
