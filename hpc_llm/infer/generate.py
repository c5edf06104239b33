"""Sampling from a trained model with a KV cache: prompts are encoded once (a batch of prompts of different lengths
together, right-padded), then one token per forward. Under tensor parallelism the logits stay split over the
vocabulary shards of the TP group and every sampling rule is computed exactly from small per-shard summaries
(`sample_sharded`); one process is the tp = 1 case of the same code.

Exact sharded sampling, for rows of logits split over P ranks (rank r holds columns v0_r..), z = logits / T:

- greedy (T = 0): each rank's (max, global index of its first max) per row, allgathered; the first rank with the
  largest value wins: the lowest index among ties, as argmax on the full row.
- top-k: each rank's k largest (or all it has) allgathered; the k-th largest of their union is the k-th largest of
  the row, and every entry >= it is kept (ties at the k-th value kept, nanoGPT's rule).
- top-p: the row's max and sum of exp (two small allreduces) give exact probabilities p; each rank sends its kept
  entries in descending order (index ascending among equal p) until their local mass reaches top_p. The union holds
  the nucleus N (the shortest prefix of the row in that order whose mass is >= top_p): a member x of N on rank r
  has less than top_p of the row's mass before it, so less than top_p of rank r's before it, so rank r sent it.
  Every rank then computes the same nucleus from the same candidates and draws with the same generator.
- top-k (or top-p) candidates are sampled from directly: p over the candidates, renormalised.
- plain temperature sampling: inverse CDF over the shards: each rank's mass exp(z - max) allgathered, u from the
  row's generator, the rank whose cumulative mass passes u finds the index, one allreduce shares it.

Every rank draws the same numbers (the same generators, seeded alike), so nothing is broadcast. Results equal the
single-process ones up to the rounding of sums over shards (1e-16 relative), which decides a draw only when u or a
nucleus boundary falls that close to a cumulative sum.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from hpc_llm.backend import to_host
from hpc_llm.errors import UserError
from hpc_llm.model.gpt import GPT
from hpc_llm.model.kv_cache import KVCache
from hpc_llm.parallel.comm import Comm

_SOLO = Comm(None)


def check_options(
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    top_p: float | None = None,
) -> None:
    """UserError, naming the option as `hpc-llm generate` spells it, unless every sampling option is in range."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: expected a non-negative integer, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(
            f"--temperature: expected a finite non-negative number (0: greedy), got {temperature}"
        )
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k: expected a positive integer, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):
        raise UserError(f"--top-p: expected a number in (0, 1], got {top_p}")
    if seed < 0:
        raise UserError(f"--seed: expected a non-negative integer, got {seed}")


# -- sampling over vocabulary shards ---------------------------------------------------------------------------------


def _uniforms(rngs, n: int) -> np.ndarray:
    """One uniform [0, 1) per row: from each row's generator (a list), or n from one generator."""
    if isinstance(rngs, np.random.Generator):
        return rngs.random(n)
    return np.array([r.random() for r in rngs])


def _greedy(z: np.ndarray, v0: int, comm: Comm) -> np.ndarray:
    rows = np.arange(z.shape[0])
    a = z.argmax(axis=1)
    # (B, 2): value, global index
    mine = np.stack([z[rows, a], (a + v0).astype(np.float64)], axis=1)
    every = comm.allgather(mine)  # (P, B, 2)
    best = every[:, :, 0].argmax(axis=0)  # the first rank with the max: the lowest index among ties
    return every[best, rows, 1].astype(np.int64)


def _top_k_threshold(z: np.ndarray, k: int, comm: Comm) -> np.ndarray:
    """The k-th largest of each row of the whole (sharded) z: the k-th largest of the union of the shards' top k."""
    kl = min(k, z.shape[1])
    local = (
        -np.sort(-z, axis=1)[:, :kl]
        if kl < 64
        else np.partition(z, z.shape[1] - kl, axis=1)[:, -kl:]
    )
    # (B, P kl)
    union = np.moveaxis(comm.allgather(np.ascontiguousarray(local)), 0, 1).reshape(z.shape[0], -1)
    if union.shape[1] < k:  # fewer entries than k in the whole row: all kept
        return np.full(z.shape[0], -np.inf)
    return -np.partition(-union, k - 1, axis=1)[:, k - 1]


def _row_max(z: np.ndarray, comm: Comm) -> np.ndarray:
    m = z.max(axis=1)
    return comm.allreduce_(m, op="max")


def candidates(z: np.ndarray, v0: int, comm: Comm, top_p: float):
    """Exact probabilities of this rank's kept entries (z finite), and of them the candidates it sends: in order of
    p descending (index ascending among ties) until their mass reaches top_p (all, for top_p = 1). Gathered ->
    (p, global index) (B, P * K), padded with p = 0."""
    B, Vl = z.shape
    m = _row_max(z, comm)
    e = np.exp(z - m[:, None])  # -inf (not kept, padding) -> 0
    s = comm.allreduce_(e.sum(axis=1), op="sum")
    kept = int((e > 0).sum(axis=1).max()) if B else 0
    # Only the largest entries need ordering: the `kept` largest hold every kept one (top-k); for top-p, the n
    # largest (n = 64, 256, ...) until each row's prefix ends inside them, before their smallest value (entries
    # tied with it may lie outside), so a full sort of the shard is rarely needed
    n = kept if top_p >= 1 else min(kept, 64)
    rows = np.arange(B)
    while True:
        sel = (
            np.argpartition(-e, n - 1, axis=1)[:, :n]
            if 0 < n < Vl
            else np.broadcast_to(np.arange(Vl), z.shape)
        )
        p = np.take_along_axis(e, sel, axis=1) / s[:, None]
        order = np.lexsort((sel, -p), axis=1)  # p desc, index asc
        ps, gi = np.take_along_axis(p, order, axis=1), np.take_along_axis(sel, order, axis=1) + v0
        if top_p >= 1:
            count = (ps > 0).sum(axis=1)
            break
        before = np.cumsum(ps, axis=1) - ps  # local mass before each entry
        count = ((before < top_p) & (ps > 0)).sum(axis=1)
        if sel.shape[1] >= min(kept, Vl) or B == 0:
            break
        last = ps[rows, np.maximum(count - 1, 0)]
        if np.all((count < ps.shape[1]) & (last > ps[:, -1])):
            break
        n = min(4 * n, kept)
    K = int(comm.allreduce_(np.array([count.max() if B else 0], dtype=np.int64), op="max")[0])
    K = max(K, 1)
    if ps.shape[1] < K:
        ps, gi = (
            np.pad(ps, ((0, 0), (0, K - ps.shape[1]))),
            np.pad(gi, ((0, 0), (0, K - gi.shape[1]))),
        )
    live = np.arange(K)[None, :] < count[:, None]
    send = np.stack(
        [np.where(live, ps[:, :K], 0.0), np.where(live, gi[:, :K], np.iinfo(np.int32).max)], axis=1
    )
    every = np.moveaxis(comm.allgather(send), 0, 2)  # (P, B, 2, K) -> (B, 2, P, K)
    return every[:, 0].reshape(B, -1), every[:, 1].reshape(B, -1)


def nucleus(p: np.ndarray, idx: np.ndarray, top_p: float):
    """Candidates (B, M) (p, global index) -> sorted by (p desc, index asc), and each row's nucleus size m: the
    first prefix whose mass reaches top_p (all entries with p > 0 for top_p >= 1)."""
    order = np.lexsort((idx, -p), axis=1)
    p, idx = np.take_along_axis(p, order, axis=1), np.take_along_axis(idx, order, axis=1)
    c = np.cumsum(p, axis=1)
    live = (p > 0).sum(axis=1)
    m = live if top_p >= 1 else np.minimum((c < top_p).sum(axis=1) + 1, live)
    return p, idx, c, m


def _nucleus_draw(p: np.ndarray, idx: np.ndarray, top_p: float, u: np.ndarray) -> np.ndarray:
    """A draw from each row's nucleus renormalised, by the row's uniform u. The same on every rank: the arrays
    are."""
    p, idx, c, m = nucleus(p, idx, top_p)
    rows = np.arange(p.shape[0])
    total = c[rows, m - 1]
    # the first entry whose cumulative mass passes u * total
    pick = (c <= (u * total)[:, None]).sum(axis=1)
    pick = np.minimum(pick, m - 1)
    return idx[rows, pick].astype(np.int64)


def _inverse_cdf(z: np.ndarray, v0: int, comm: Comm, u: np.ndarray) -> np.ndarray:
    B, Vl = z.shape
    m = _row_max(z, comm)
    e = np.exp(z - m[:, None])
    c = np.cumsum(e, axis=1)  # local cumulative mass
    mass = comm.allgather(np.ascontiguousarray(c[:, -1]))  # (P, B)
    cum = np.cumsum(mass, axis=0)
    target = u * cum[-1]
    owner = (cum <= target[None, :]).sum(axis=0)  # the rank whose cumulative mass passes u
    # rounding: the last with mass
    owner = np.minimum(owner, comm.size - 1 - (mass[::-1] > 0).argmax(axis=0))
    out = np.zeros(B, dtype=np.int64)
    here = np.flatnonzero(owner == comm.rank)
    if here.size:
        before = (cum - mass)[comm.rank, here]
        j = (c[here] <= (target[here] - before)[:, None]).sum(axis=1)
        # rounding at the very end: the last entry with mass
        last = Vl - 1 - (e[here, ::-1] > 0).argmax(axis=1)
        out[here] = np.minimum(j, last) + v0
    return comm.allreduce_(out, op="sum")


def sample_sharded(
    logits,
    v0: int,
    comm: Comm,
    rngs,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    vocab_size: int | None = None,
) -> np.ndarray:
    """Next ids (B,) from this rank's vocabulary slice of the logits (B, Vl) (columns v0.., -inf on padding), the
    same on every rank of comm (the module docstring's schemes). rngs: one Generator per row (or one for all rows,
    drawn in row order); every rank must hold the same. Temperature first, then top-k, then top-p."""
    z = np.asarray(to_host(logits), dtype=np.float64)
    if temperature == 0:
        return _greedy(z, v0, comm)
    z = z / temperature
    vocab = vocab_size if vocab_size is not None else z.shape[1] * comm.size
    k = top_k if top_k is not None and top_k < vocab else None
    p = top_p if top_p is not None and top_p < 1 else None
    u = _uniforms(rngs, z.shape[0])
    if k is None and p is None:
        return _inverse_cdf(z, v0, comm, u)
    if k is not None:
        z = np.where(z >= _top_k_threshold(z, k, comm)[:, None], z, -np.inf)
    probs, idx = candidates(z, v0, comm, 1.0 if p is None else p)
    return _nucleus_draw(probs, idx, 1.0 if p is None else p, u)


def sample_next(
    logits: np.ndarray,
    rng: np.random.Generator,
    temperature: float,
    top_k: int | None,
    top_p: float | None = None,
) -> np.ndarray:
    """logits (B, V) on the host -> next ids (B,), one process. temperature 0 is greedy."""
    return sample_sharded(
        logits, 0, _SOLO, rng, temperature, top_k, top_p, vocab_size=np.shape(logits)[-1]
    )


# -- decoding ----------------------------------------------------------------------------------------------------------


def prompt_streams(seed: int, indices) -> list[np.random.Generator]:
    """Prompt i's own generator, default_rng([seed, i]): its sample does not depend on what it is batched with."""
    return [np.random.default_rng([seed, int(i)]) for i in indices]


def generate_batch(
    model: GPT,
    prompts: list,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    top_p: float | None = None,
    indices=None,
) -> list:
    """Prompts (a list of 1-D id arrays, any lengths) -> their new tokens, (max_new_tokens,) each, decoded together.

    Each prompt's context is its last block_size tokens; the batch is prefilled right-padded (row b's real tokens at
    positions 0..n_b-1: causal attention keeps the padding out of them), then each step writes row b's new token at
    its own position. When a row's context reaches block_size, that row's cache is rebuilt from its last
    block_size // 2 tokens (learned positions cannot slide), so long outputs stay O(T) per token. Row i samples from
    prompt_streams(seed, indices)[i] (indices default 0..B-1). Under tensor parallelism every rank of the model's TP
    group calls this with the same arguments and gets the same tokens."""
    check_options(max_new_tokens, temperature, top_k, seed, top_p)
    prompts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
    if not prompts or any(p.size == 0 for p in prompts):
        raise UserError("prompt: expected at least one token")
    T = model.cfg.block_size
    for p in prompts:
        model.check_tokens(p[-T:][None])
    B = len(prompts)
    rngs = prompt_streams(seed, range(B) if indices is None else indices)
    cache = KVCache(model, B, reuse=True)
    try:
        return _decode(model, cache, prompts, max_new_tokens, rngs, temperature, top_k, top_p)
    finally:
        cache.release()


def _decode(
    model: GPT, cache: KVCache, prompts: list, max_new_tokens: int, rngs, temperature, top_k, top_p
):
    T, B = model.cfg.block_size, len(prompts)
    out = [list(p) for p in prompts]
    new = np.zeros((B, max_new_tokens), dtype=np.int64)
    logits = _prefill(model, cache, [p[-T:] for p in prompts])
    for step in range(max_new_tokens):
        nxt = sample_sharded(
            logits, model.v0, model.tp, rngs, temperature, top_k, top_p, model.cfg.vocab_size
        )
        new[:, step] = nxt
        for row, t in zip(out, nxt):
            row.append(int(t))
        if step == max_new_tokens - 1:
            break
        full = np.flatnonzero(cache.lengths == T)
        # rebuilt first: their caches restart at T // 2, so the step below fits for every row
        if full.size:
            # in a cache of their own (a one-token row fed beside T // 2 tokens would pad past block_size); the
            # model's pool keeps one buffer, the largest, and a smaller cache is a view of it: rebuilds of
            # different row counts do not pile up buffers
            sub = KVCache(model, full.size, reuse=True)
            rebuilt = _prefill(model, sub, [np.asarray(out[r][-(T // 2) :]) for r in full])
            cache.take(full, sub)
            sub.release()
        rest = np.setdiff1d(np.arange(B), full)
        if rest.size:
            n = np.zeros(B, dtype=np.int64)
            # the rebuilt rows ride along (their token is in their rebuilt context already)
            n[rest] = 1
            step_logits = model.forward_cached(
                model.xp.asarray(nxt[:, None]),
                cache,
                lengths=n if full.size else None,
                last=True,
                split=True,
            )
        if full.size and rest.size:
            logits = step_logits.copy()
            logits[full] = rebuilt
        else:
            logits = rebuilt if full.size else step_logits
    return list(new)


def _prefill(model: GPT, cache: KVCache, contexts: list):
    """Each row's logits after its context, (B, this rank's vocabulary slice), the contexts right-padded."""
    n = np.array([len(c) for c in contexts])
    idx = np.zeros((len(contexts), int(n.max())), dtype=np.int64)
    for b, c in enumerate(contexts):
        idx[b, : len(c)] = c
    lengths = None if (n == n[0]).all() else n
    return model.forward_cached(
        model.xp.asarray(idx), cache, lengths=lengths, last=True, split=True
    )


def generate(
    model: GPT,
    prompt: np.ndarray,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    top_p: float | None = None,
) -> np.ndarray:
    """prompt (B, T0) ids -> (B, T0 + max_new_tokens): generate_batch on its rows (row i sampling from the stream
    default_rng([seed, i]))."""
    check_options(max_new_tokens, temperature, top_k, seed, top_p)
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError("prompt: expected at least one token")
    new = generate_batch(model, list(prompt), max_new_tokens, temperature, top_k, seed, top_p)
    return np.concatenate(
        [prompt, np.array(new, dtype=np.int64).reshape(prompt.shape[0], max_new_tokens)], axis=1
    )


def generate_prompts(
    model: GPT, prompts: list, max_new_tokens: int, batch_size: int = 8, **kw
) -> list[dict]:
    """Many prompts (id arrays), batch_size at a time in their order; prompt i samples from default_rng([seed, i])
    wherever it is batched. -> [{"tokens": new ids (list), "seconds": the wall time of its batch}, ...]."""
    if batch_size < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {batch_size}")
    results = []
    for a in range(0, len(prompts), batch_size):
        t0 = time.perf_counter()
        chunk = prompts[a : a + batch_size]
        new = generate_batch(model, chunk, max_new_tokens, indices=range(a, a + len(chunk)), **kw)
        dt = time.perf_counter() - t0
        results += [{"tokens": [int(t) for t in row], "seconds": dt} for row in new]
    return results


# -- the command line's inputs ---------------------------------------------------------------------------------------


def tp_from_sets(sets, world_size: int, verb: str = "generate", data_parallel: bool = False) -> int:
    """`--set parallel.tp=T` (the one key inference takes; default: the number of ranks). T must equal the number
    of ranks (the whole model on one TP group: generate), or with data_parallel divide it (eval: dp = ranks / T
    replicas, each a TP group; never pipeline parallelism)."""
    tp = world_size
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--set {item}: expected SECTION.KEY=VALUE")
        if key.strip() != "parallel.tp":
            raise UserError(
                f"--set {key.strip()}: `hpc-llm {verb}` takes only parallel.tp (the tensor-parallel size)"
            )
        try:
            tp = int(value)
        except ValueError:
            raise UserError(f"--set parallel.tp={value}: expected a positive integer") from None
        if tp < 1:
            raise UserError(f"--set parallel.tp={value}: expected a positive integer")
    if data_parallel and world_size % tp:
        raise UserError(
            f"parallel.tp={tp} but {world_size} rank(s): `hpc-llm {verb}` runs dp x tp ranks, so "
            "parallel.tp must divide the number of ranks"
        )
    if not data_parallel and tp != world_size:
        raise UserError(
            f"parallel.tp={tp} but {world_size} rank(s): `hpc-llm {verb}` runs one tensor-parallel "
            f"group, so start it with `mpiexec -n {tp}`"
        )
    return tp


def read_prompts(path) -> list[str]:
    """--prompts FILE: UTF-8, one prompt a line (a final newline ends the last line; "\\r\\n" endings are fine).
    An empty line is an error naming it: it would be a prompt of no tokens."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UserError(f"--prompts {path}: the file has no prompts (expected one prompt a line)")
    out = []
    for i, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if not line:
            raise UserError(f"--prompts {path}: line {i} is empty (expected one prompt a line)")
        out.append(line)
    return out
