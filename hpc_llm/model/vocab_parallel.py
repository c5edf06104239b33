"""The vocabulary split over the tensor-parallel group (Megatron's VocabParallelEmbedding and its parallel
cross-entropy): rank r holds rows [v0, v0 + Vl) of wte; each forward/backward pair's collectives sit beside it."""

from __future__ import annotations

import numpy as np

from hpc_llm.backend import array_module
from hpc_llm.kernels.cross_entropy import cross_entropy_backward_, exp_shifted_, normalize_rows_
from hpc_llm.model.layers import embedding_backward, embedding_forward, position_embedding_backward
from hpc_llm.model.tensor_parallel import (
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
)
from hpc_llm.parallel.comm import Comm

# -- the embedding: rank r holds rows [v0, v0 + Vl) of wte ---------------------------------------------------------


def vocab_parallel_embedding_forward(
    wte_local, wpe, idx, v0: int, comm: Comm, pos0=0, sequence_parallel: bool = False
):
    """Token rows looked up where this rank holds them (zero elsewhere), summed over the TP group (g), plus wpe.
    pos0: the first position, an int or per row (B,) ints (decoding rows of different lengths). wte_local may be an
    int8 quantize.QuantizedWeight: indexing it dequantizes the rows looked up. sequence_parallel: the sum is
    reduce-scattered along T instead (this rank's slice of positions, (B, T/tp, C)), its positions added to it;
    its backward's all-gather is the caller's (ends.Embedding)."""
    if isinstance(pos0, (int, np.integer)):
        if comm.size == 1 and isinstance(wte_local, np.ndarray):
            return embedding_forward(wte_local, wpe, idx, pos0)
        positions = wpe[pos0 : pos0 + idx.shape[1]]
    else:
        xp = array_module(wpe)
        positions = wpe[xp.asarray(pos0)[:, None] + xp.arange(idx.shape[1])[None, :]]
    if comm.size == 1:
        x = wte_local[idx]
        x += positions
        return x
    xp = array_module(wpe)
    local = idx - v0
    mine = (local >= 0) & (local < wte_local.shape[0])
    x = wte_local[xp.where(mine, local, 0)]
    x *= mine[..., None]
    if sequence_parallel:
        x = reduce_scatter_to_sequence_parallel_region(x, comm)
        t0 = comm.rank * x.shape[1]
        x += positions[..., t0 : t0 + x.shape[1], :]
        return x
    x = reduce_from_tp_region(x, comm)
    x += positions
    return x


def vocab_parallel_embedding_backward(
    dx, idx, v0: int, dwte_local, dwpe, accumulate: bool, comm: Comm, accumulate_wte: bool = True
) -> None:
    """dx is replicated over the TP group (g's backward is the identity; with sequence parallelism the caller has
    all-gathered it, the reduce-scatter's backward): each rank scatters the rows it holds.
    accumulate_wte: add to wte's gradient (the tied head wrote it first) rather than overwrite it."""
    if comm.size == 1:
        return embedding_backward(dx, idx, dwte_local, dwpe, accumulate, accumulate_wte)
    xp = array_module(dx)
    local = (idx - v0).reshape(-1)
    mine = (local >= 0) & (local < dwte_local.shape[0])
    position_embedding_backward(dx, dwpe, accumulate)
    if not accumulate_wte:
        dwte_local[...] = 0
    xp.add.at(dwte_local, local[mine], dx.reshape(-1, dx.shape[-1])[mine])


# -- the softmax cross-entropy: three small allreduces (max, target logit, sum of exp) -----------------------------


def vocab_parallel_cross_entropy_forward(logits, targets, vocab_size: int, v0: int, comm: Comm):
    """Mean -log p(target) over rows of this rank's logits slice (N, Vl) = columns [v0, v0 + Vl) of the padded
    vocabulary; columns >= vocab_size are padding and masked out. In place: logits become this rank's slice of the
    probabilities, which is the cache."""
    xp = array_module(logits)
    N, Vl = logits.shape
    if v0 + Vl > vocab_size:
        logits[:, max(0, vocab_size - v0) :] = -xp.inf
    row_max = logits.max(axis=1)
    comm.allreduce_(row_max, op="max")
    local = targets - v0
    mine = (local >= 0) & (local < Vl)
    target_logit, s = exp_shifted_(logits, row_max, local, mine)
    comm.allreduce_(target_logit)
    comm.allreduce_(s)
    loss = float((xp.log(s) - target_logit).astype(xp.float64).mean())
    normalize_rows_(logits, s)
    return loss, (logits, local, mine)


def vocab_parallel_cross_entropy_backward(cache, scale: float = 1.0):
    """d(scale * mean loss)/d logits = scale * (p - onehot) / N on this rank's columns, written over the cache."""
    probs, local, mine = cache
    return cross_entropy_backward_(probs, local, mine, scale / probs.shape[0])
