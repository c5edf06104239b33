"""Structured pruning (`hpc-llm prune CKPT --heads F --mlp F [--layers I,J,...] --out CKPT2`): whole attention heads,
MLP neurons and blocks removed from a checkpoint's model, written as an ordinary, smaller checkpoint.

What is removed, per block:
- heads: round(F n_head) of them, the same number in every block, so the model keeps one n_head (GPT-2's format; which
  heads go is each block's own choice). A head is its q, k and v columns of attn.c_attn (weight and bias) and its
  rows of attn.c_proj.weight; each head keeps its size, so the config records it (model.head_dim = the old
  n_embd / n_head) and the attention's width becomes n_head' head_dim, no longer n_embd.
- MLP neurons: round(F 4 n_embd) of them, likewise the same number per block (model.n_inner = the width left). A
  neuron is its column of mlp.c_fc (weight and bias) and its row of mlp.c_proj.weight.
- blocks (--layers): only the listed blocks are kept, in order (depth pruning, as Minitron's), renumbered h.0 ...

Importance (weight magnitude): a head's or neuron's score is the norm of what feeds it times the norm of what it
writes back, ||its input weights and biases||_2 * ||its output rows||_2: the size of its path through the block (a unit
whose output rows are zero scores 0 whatever its input). The lowest-scored go (ties: the later index). The residual
stream, the embeddings, the LayerNorms and the output biases are untouched, so the pruned model computes exactly what
the original computes with the removed units' output rows zeroed (tests/tools/test_prune.py, float64).

The checkpoint is written like merge-lora's: a step-0 training checkpoint (zero Adam moments, empty metrics), its
state recording what was pruned; fine-tune it with train.init_from, optionally with the original as train.teacher.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from hpc_llm.api import open_checkpoint
from hpc_llm.checkpoint.serial import save_fresh_checkpoint
from hpc_llm.config import ModelConfig, config_from_dict
from hpc_llm.errors import UserError
from hpc_llm.parallel.comm import world_comm
from hpc_llm.runtime.fsio import check_output


def head_scores(params: dict, p: str, m: ModelConfig) -> np.ndarray:
    """(n_head,): block p's heads' magnitude scores."""
    H, hd, C = m.n_head, m.head_size, m.n_embd
    w_in = np.asarray(params[p + "attn.c_attn.weight"], np.float64).reshape(C, 3, H, hd)
    sq_in = (w_in**2).sum(axis=(0, 1, 3))
    if p + "attn.c_attn.bias" in params:
        sq_in += (
            np.asarray(params[p + "attn.c_attn.bias"], np.float64).reshape(3, H, hd) ** 2
        ).sum(axis=(0, 2))
    w_out = np.asarray(params[p + "attn.c_proj.weight"], np.float64).reshape(H, hd, C)
    return np.sqrt(sq_in) * np.sqrt((w_out**2).sum(axis=(1, 2)))


def neuron_scores(params: dict, p: str) -> np.ndarray:
    """(n_inner,): block p's MLP neurons' magnitude scores."""
    sq_in = (np.asarray(params[p + "mlp.c_fc.weight"], np.float64) ** 2).sum(axis=0)
    if p + "mlp.c_fc.bias" in params:
        sq_in += np.asarray(params[p + "mlp.c_fc.bias"], np.float64) ** 2
    w_out = np.asarray(params[p + "mlp.c_proj.weight"], np.float64)
    return np.sqrt(sq_in) * np.sqrt((w_out**2).sum(axis=1))


def top(scores: np.ndarray, keep: int) -> np.ndarray:
    """The indices of the `keep` highest scores (ties: the earlier index), in increasing order."""
    return np.sort(np.argsort(-scores, kind="stable")[:keep])


def block_params(params: dict, p: str, q: str, m: ModelConfig, heads, neurons) -> dict:
    """Block p's tensors with only `heads` and `neurons` kept, named as block q."""
    H, hd = m.n_head, m.head_size
    cols = (
        np.arange(3)[:, None, None] * H * hd + heads[None, :, None] * hd + np.arange(hd)
    ).reshape(-1)
    rows = (heads[:, None] * hd + np.arange(hd)).reshape(-1)
    take = {
        "attn.c_attn.weight": lambda t: t[:, cols],
        "attn.c_attn.bias": lambda t: t[cols],
        "attn.c_proj.weight": lambda t: t[rows],
        "mlp.c_fc.weight": lambda t: t[:, neurons],
        "mlp.c_fc.bias": lambda t: t[neurons],
        "mlp.c_proj.weight": lambda t: t[neurons],
    }
    out = {}
    for name, t in params.items():
        if name.startswith(p):
            short = name[len(p) :]
            out[q + short] = np.ascontiguousarray(take.get(short, lambda x: x)(t))
    return out


@dataclasses.dataclass(frozen=True)
class Pruning:
    """What to remove: fractions of each block's heads and MLP neurons, and the blocks kept (None: all)."""

    heads: float | None = None  # None: none removed
    mlp: float | None = None
    layers: tuple[int, ...] | None = None


def plan_widths(m: ModelConfig, pr: Pruning, what: str) -> tuple[int, int, list[int]]:
    """(heads kept per block, neurons kept per block, blocks kept), each checked: one line naming the flag."""
    for flag, f in (("--heads", pr.heads), ("--mlp", pr.mlp)):
        if f is not None and not 0 < f < 1:
            raise UserError(
                f"prune {flag} {f}: expected a fraction in (0, 1) of each block's units"
            )
    heads = m.n_head - round((pr.heads or 0.0) * m.n_head)
    neurons = m.mlp_width - round((pr.mlp or 0.0) * m.mlp_width)
    if heads < 1:
        raise UserError(
            f"prune --heads {pr.heads}: removes all {m.n_head} heads of each block of {what}"
        )
    if neurons < 1:
        raise UserError(
            f"prune --mlp {pr.mlp}: removes all {m.mlp_width} MLP neurons of each block of {what}"
        )
    layers = list(range(m.n_layer)) if pr.layers is None else list(pr.layers)
    if not layers or any(not 0 <= i < m.n_layer for i in layers) or layers != sorted(set(layers)):
        raise UserError(
            f"prune --layers {','.join(map(str, layers))}: expected the blocks to keep, increasing, "
            f"each in [0, {m.n_layer}) ({what} has {m.n_layer})"
        )
    if (heads, neurons, len(layers)) == (m.n_head, m.mlp_width, m.n_layer):
        raise UserError(f"prune: nothing to remove from {what} (give --heads, --mlp or --layers)")
    return heads, neurons, layers


def pruned(params: dict, m: ModelConfig, pr: Pruning, what: str = "the model"):
    """-> (the pruned model's parameters, its ModelConfig, a record of what was kept)."""
    n_heads, n_neurons, layers = plan_widths(m, pr, what)
    out = {name: t for name, t in params.items() if not name.startswith("h.")}
    kept = []
    for new, i in enumerate(layers):
        p = f"h.{i}."
        heads = top(head_scores(params, p, m), n_heads)
        neurons = top(neuron_scores(params, p), n_neurons)
        out.update(block_params(params, p, f"h.{new}.", m, heads, neurons))
        kept.append({"layer": i, "heads": heads.tolist(), "neurons": len(neurons)})
    cfg = dataclasses.replace(
        m, n_layer=len(layers), n_head=n_heads, head_dim=m.head_size, n_inner=n_neurons
    )
    return out, cfg, kept


def prune(checkpoint, out, pruning: Pruning, force: bool = False) -> tuple[Path, ModelConfig]:
    """Write the pruned model of a checkpoint (a file, or a run directory: its newest verified checkpoint) to ``out``
    (a .h5 path in an existing directory, never the input); -> (its path, its ModelConfig)."""
    out = Path(out)
    if (ranks := world_comm().size) > 1:
        raise UserError(
            f"hpc-llm prune runs on one process, got {ranks} ranks: run it without mpiexec"
        )
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(
            f"prune --out {out}: expected a checkpoint file path in an existing directory"
        )
    check_output(out, "prune --out", (checkpoint,), force)
    # a run directory's newest held open from its choice to the end of the read: a live run's pruning leaves it
    with open_checkpoint(checkpoint) as f:
        path, cfg = f.path, config_from_dict(f.config)
        m = cfg.model
        plan_widths(m, pruning, str(path))  # refused before the weights are read
        if m.lora_rank > 0:
            raise UserError(
                f"prune: {path} has LoRA adapters: fold them in with `hpc-llm merge-lora` first"
            )
        saved = f.read_all(optimizer=False)
    params, model, kept = pruned(saved.params, m, pruning, str(path))
    state = {
        "tokenizer": saved.state.get("tokenizer"),
        "data_path": saved.state.get("data_path", ""),
        "pruned": {
            "path": str(path),
            "step": saved.state.get("step"),
            "heads": pruning.heads,
            "mlp": pruning.mlp,
            "score": "magnitude",
            "blocks": kept,
        },
    }
    cfg = dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, init_from=""))
    try:
        save_fresh_checkpoint(out, params, state, cfg.to_dict())
    except OSError as exc:
        raise UserError(
            f"prune --out {out}: cannot write checkpoint ({exc.strerror or exc})"
        ) from None
    return out, model
