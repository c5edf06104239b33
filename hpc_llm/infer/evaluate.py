"""`hpc-llm eval`: a checkpoint's loss and perplexity on a prepared split, over deterministic windows.

The split's tokens t_0..t_{N-1} give N - 1 predictions (t_{i+1} from t_0..t_i within a window); they are cut into
non-overlapping windows of block_size inputs, x = t[w T : (w+1) T], y = t[w T + 1 : (w+1) T + 1], the last window
shorter when N - 1 is not a multiple of T, so every prediction is made exactly once, with a context that restarts at
each window's start. The loss is the mean cross-entropy over all of them (each window's tokens weighed as tokens,
not as windows), summed in float64. Windows go batch_size at a time in order; --max-batches N stops after N batches
(then the tail window is left out unless reached). Under tensor parallelism every rank of the TP group runs the same
windows on its shards (the vocabulary-parallel cross-entropy is global); under data parallelism (dp replicas, each
a TP group) batch i goes to replica i mod dp, and the replicas' (sum of loss x tokens, tokens) are summed over the
data-parallel group. The result is the same on any dp x tp layout up to the order of float64 sums.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from hpc_llm.data.tokenizer import check_same_tokenizer
from hpc_llm.data.tokens import TokenData
from hpc_llm.errors import UserError
from hpc_llm.runtime.faults import launcher_rank


def windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) of each window over n_tokens tokens: length inputs from start, their targets one later."""
    n_pred = n_tokens - 1
    return [(a, min(block_size, n_pred - a)) for a in range(0, max(n_pred, 0), block_size)]


def batches(
    n_tokens: int, block_size: int, batch_size: int, max_batches: int | None = None
) -> list[list]:
    """The windows grouped into batches of batch_size equal-length windows, in order (the short tail alone)."""
    ws = windows(n_tokens, block_size)
    full = [w for w in ws if w[1] == block_size]
    out = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    out += [[w] for w in ws if w[1] != block_size]
    return out if max_batches is None else out[:max_batches]


def evaluate(
    model, tokens, batch_size: int = 8, max_batches: int | None = None, dp_comm=None
) -> dict:
    """{"loss", "perplexity", "tokens", "windows", "batches"} of the model on a split's tokens (a 1-D array).
    dp_comm: the data-parallel group (parallel.grid's dp_comm; none: one replica), every rank of which calls this
    with the same arguments: each replica runs batches dp_rank, dp_rank + dp, ... and all get the whole result."""
    tokens = np.asarray(tokens)
    total, count, n_windows = 0.0, 0, 0
    todo = batches(len(tokens), model.cfg.block_size, batch_size, max_batches)
    rank, dp = (dp_comm.rank, dp_comm.size) if dp_comm is not None else (0, 1)
    for batch in todo[rank::dp]:
        x = np.stack([tokens[a : a + n] for a, n in batch]).astype(np.int64)
        y = np.stack([tokens[a + 1 : a + 1 + n] for a, n in batch]).astype(np.int64)
        loss = model.forward(model.xp.asarray(x), model.xp.asarray(y))
        total += float(loss) * y.size
        count += y.size
        n_windows += len(batch)
    if dp > 1:  # float64 sums: the token and window counts stay exact (far below 2^53)
        sums = dp_comm.allreduce_(np.array([total, count, n_windows], dtype=np.float64), op="sum")
        total, count, n_windows = float(sums[0]), int(sums[1]), int(sums[2])
    mean = total / count
    return {
        "loss": mean,
        "perplexity": math.exp(mean),
        "tokens": count,
        "windows": n_windows,
        "batches": len(todo),
    }


def check_eval_options(batch_size: int, max_batches: int | None) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise UserError(f"--max-batches: expected a positive integer, got {max_batches}")


def open_split(saved, data_dir, split: str):
    """The split's tokens from a prepared data directory, after checking its tokenizer is the checkpoint's (train's
    check, tokenizer.check_same_tokenizer: the same ids must mean the same text; an ids-only gpt2-bpe import warns)
    and that it has a prediction."""
    data = TokenData(data_dir)
    warning = check_same_tokenizer(
        saved.state.get("tokenizer"),
        data.tokenizer.meta(),
        f"checkpoint {saved.path}",
        f"--data {data_dir}",
    )
    if warning:  # every rank checks; one says so
        log = logging.getLogger(__name__)
        (log.warning if launcher_rank() == 0 else log.debug)("%s", warning)
    tokens = data.split(split)
    if len(tokens) < 2:
        raise UserError(
            f"--data {data_dir}: split {split!r} has {len(tokens)} tokens, at least 2 needed (one "
            "prediction)"
        )
    return tokens
