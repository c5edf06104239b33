"""LoRA's adapters folded into the base weights (`hpc-llm merge-lora CKPT --out CKPT2`).

A LoRA run (model.lora_rank = r > 0, docs/fine-tuning.md) trains, beside each target linear layer's frozen weight W
(in, out), adapters A (in, r) and B (r, out), and computes y = x W + b + s x A B with s = lora_alpha / lora_rank. Since
(x A) B = x (A B), the merged weight W' = W + s A B computes the same function with no adapters: what this module
writes, as a checkpoint of the plain model (model.lora_rank = 0) that `generate`, `eval`, `train.init_from` and the
Python API load like any other.

The product is formed in float64 (A, B and W widened; s A B then added to W) and rounded once to W's dtype, so the
merged weight is the exact W + s A B rounded to nearest. The checkpoint is read with the checkpoint package's reader
(every dataset's crc32 verified) and written like an imported GPT-2 (hpc_llm/tools/gpt2_import.py): a step-0 training
checkpoint, zero Adam moments, empty metrics; its state records where it was merged from.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hpc_llm.api import open_checkpoint
from hpc_llm.checkpoint.rundir import check_not_a_run_checkpoint
from hpc_llm.checkpoint.serial import save_fresh_checkpoint
from hpc_llm.config import ModelConfig, config_from_dict
from hpc_llm.config.checks import LORA_TARGETS
from hpc_llm.errors import UserError
from hpc_llm.model.layout import is_lora
from hpc_llm.parallel.comm import world_comm
from hpc_llm.runtime.fsio import check_output


def merged_params(
    params: dict[str, np.ndarray], n_layer: int, targets, scale: float
) -> dict[str, np.ndarray]:
    """The base parameters with each target's s A B added to its weight (float64, then W's dtype); no adapters."""
    out = {name: p for name, p in params.items() if not is_lora(name)}
    for i in range(n_layer):
        for target in targets:
            p = f"h.{i}.{target}"
            out[f"{p}.weight"] = merged_weight(
                out[f"{p}.weight"], params[f"{p}.lora_A"], params[f"{p}.lora_B"], scale
            )
    return out


def merged_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W + s A B formed in float64 and rounded once to W's dtype."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (np.asarray(w, dtype=np.float64) + scale * (a @ b)).astype(w.dtype)


def _check_out(out: Path) -> None:
    """One process, and ``out`` a file path in an existing directory: refused before anything is read."""
    # every rank would write the same file; the world size is known everywhere
    if (ranks := world_comm().size) > 1:
        raise UserError(
            f"hpc-llm merge-lora runs on one process, got {ranks} ranks: run it without mpiexec"
        )
    if out.is_dir():
        raise UserError(
            f"merge-lora --out {out}: is a directory; expected a checkpoint file path such as "
            f"{out / 'merged.h5'}"
        )
    if not out.parent.is_dir():
        raise UserError(f"merge-lora --out {out}: directory {out.parent} does not exist")


def _check_adapters(saved, m: ModelConfig) -> None:
    """The checkpoint's config names LoRA targets that are linear layers, and the file holds their adapters."""
    if m.lora_rank <= 0:
        raise UserError(
            f"merge-lora: {saved.path} has no LoRA adapters (model.lora_rank = 0): nothing to merge"
        )
    unknown = [t for t in m.lora_targets if t not in LORA_TARGETS]
    if unknown:
        raise UserError(
            f"merge-lora: {saved.path}: its config's model.lora_targets has {unknown[0]!r}, not a linear "
            f"layer (expected names among {list(LORA_TARGETS)})"
        )
    missing = [
        f"h.{i}.{t}.{k}"
        for i in range(m.n_layer)
        for t in m.lora_targets
        for k in ("lora_A", "lora_B")
        if f"h.{i}.{t}.{k}" not in saved.params
    ]
    if missing:
        raise UserError(
            f"merge-lora: {saved.path}: its config has LoRA on {m.lora_targets} but the file lacks "
            f"{missing[0]}" + (f" and {len(missing) - 1} more adapters" if len(missing) > 1 else "")
        )


def merge_lora(checkpoint, out, force: bool = False) -> Path:
    """Write the merged model of a LoRA checkpoint (a file, or a run directory: its newest verified checkpoint) to
    ``out`` (a .h5 path in an existing directory); returns its path. ``out`` is never the checkpoint (nor, for a run
    directory, any file in it); an existing file is replaced (atomically) only with ``force``."""
    out = Path(out)
    _check_out(out)
    check_output(out, "merge-lora --out", (checkpoint,), force)
    check_not_a_run_checkpoint(out, "merge-lora --out")
    # a run directory's newest held open from its choice to the end of the read: a live run's pruning leaves it
    with open_checkpoint(checkpoint) as f:
        saved = f.read_all(optimizer=False)
    cfg = config_from_dict(saved.config)
    m = cfg.model
    _check_adapters(saved, m)
    params = merged_params(saved.params, m.n_layer, m.lora_targets, m.lora_scale)
    merged_from = {
        "path": str(saved.path),
        "step": saved.state.get("step"),
        "lora_rank": m.lora_rank,
        "lora_alpha": m.lora_alpha,
        "lora_targets": list(m.lora_targets),
    }
    # the merged model is a plain one: no adapters, nothing frozen, no init_from (the config is a new one)
    plain = ModelConfig()
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            m, lora_rank=0, lora_alpha=plain.lora_alpha, lora_targets=plain.lora_targets
        ),
        train=dataclasses.replace(cfg.train, freeze=[], init_from=""),
    )
    state = {
        "tokenizer": saved.state.get("tokenizer"),
        "data_path": saved.state.get("data_path", ""),
        "merged_lora": merged_from,
    }
    try:
        save_fresh_checkpoint(out, params, state, cfg.to_dict())
    except OSError as exc:
        raise UserError(
            f"merge-lora --out {out}: cannot write checkpoint ({exc.strerror or exc})"
        ) from None
    return out
