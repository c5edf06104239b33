"""The deterministic batch sampler: batches are a pure function of (seed, stream, step, micro). No sampler state
exists, so a resumed run sees exactly the batches it would have seen, and data-parallel ranks take disjoint row
slices of one global batch."""

from __future__ import annotations

import numpy as np

from hpc_llm.data.tokens import TokenFileCorrupt
from hpc_llm.errors import UserError

# The trainer's streams: training batches, the val split's eval batches, the train split's eval batches.
TRAIN_STREAM, VAL_STREAM, TRAIN_EVAL_STREAM = 0, 1, 2
# Names of the sampler streams, used only to make error messages name the split.
STREAM_NAMES = {TRAIN_STREAM: "train", VAL_STREAM: "val"}


def check_split_size(tokens, block_size: int, name: str = "train") -> None:
    """Raise UserError unless the split holds at least one (block_size + 1)-token window."""
    n = len(tokens)
    if n < block_size + 1:
        raise UserError(
            f"corpus split {name!r} has {n} tokens, fewer than block_size+1 = {block_size + 1}; "
            "use a larger corpus or a smaller model.block_size"
        )


def get_batch(
    tokens,
    block_size: int,
    batch_size: int,
    seed: int,
    step: int,
    micro: int = 0,
    stream: int = TRAIN_STREAM,
    rows=None,
    name: str | None = None,
):
    """The (x, y) int64 arrays of one batch, a pure function of (seed, stream, step, micro).

    The offsets of the whole GLOBAL batch (batch_size rows) are always drawn, then `rows` (e.g. a rank's
    slice(r*b, (r+1)*b)) selects this caller's share: the union over ranks is the global batch whatever the
    data-parallel size. stream 0 = training batches, stream 1 = eval batches (eval batch i uses step=i).
    """
    for key, value in (("block_size", block_size), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"get_batch: {key} is {value!r}, expected a positive integer")
    for key, value in (("seed", seed), ("step", step), ("micro", micro), ("stream", stream)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise UserError(f"get_batch: {key} is {value!r}, expected a non-negative integer")
    check_split_size(
        tokens,
        block_size,
        name if name is not None else STREAM_NAMES.get(stream, f"stream {stream}"),
    )

    rng = np.random.default_rng([int(seed), int(stream), int(step), int(micro)])
    offsets = rng.integers(0, len(tokens) - block_size, size=batch_size)
    if rows is not None:
        offsets = offsets[rows]
    # One gather of (rows, T+1) windows serves both: x is its first T columns, y its last T.
    window = offsets[:, None] + np.arange(block_size + 1)
    chunk = np.asarray(tokens)[window].astype(np.int64)
    vocab = getattr(tokens, "vocab_size", 0)
    # a TokenFile: (rows, T+1) ids checked, not the file
    if vocab and chunk.size and int(chunk.max()) >= vocab:
        raise TokenFileCorrupt(
            f"{tokens.source}: contains token id {int(chunk.max())}, but vocab_size in meta.json is "
            f"{vocab} (the file changed after `hpc-llm prepare` wrote it: prepare it again)"
        )
    # Contiguous copies so callers may move them to a GPU or modify them without aliasing each other.
    return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])
