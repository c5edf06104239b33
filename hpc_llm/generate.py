"""Sampling from a trained model with a KV cache: the prompt is encoded once, then one token per forward."""

from __future__ import annotations

import math

import numpy as np

from hpc_llm.backend import to_host
from hpc_llm.errors import UserError
from hpc_llm.model.gpt import GPT, KVCache


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int | None) -> np.ndarray:
    """logits (B, V) on the host -> next ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def check_options(max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> None:
    """UserError, naming the option as `hpc-llm generate` spells it, unless every sampling option is in range."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens: expected a non-negative integer, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature: expected a finite non-negative number (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k: expected a positive integer, got {top_k}")
    if seed < 0:
        raise UserError(f"--seed: expected a non-negative integer, got {seed}")


def generate(model: GPT, prompt: np.ndarray, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             seed: int = 0) -> np.ndarray:
    """prompt (B, T0) ids -> (B, T0 + max_new_tokens). When the context reaches block_size, the cache is rebuilt
    from the last block_size // 2 tokens (learned positions cannot slide), so long outputs stay O(T) per token."""
    check_options(max_new_tokens, temperature, top_k, seed)
    prompt = np.asarray(prompt, dtype=np.int64)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError("prompt: expected at least one token")
    T = model.cfg.block_size
    rng = np.random.default_rng(seed)
    out = prompt
    context = prompt[:, -T:]
    model.check_tokens(context)
    cache = KVCache(model, prompt.shape[0])
    logits = model.forward_cached(model.xp.asarray(context), cache)[:, -1]
    for _ in range(max_new_tokens):
        nxt = sample_next(to_host(logits), rng, temperature, top_k)[:, None]
        out = np.concatenate([out, nxt], axis=1)
        if cache.length == T:
            cache = KVCache(model, prompt.shape[0])
            logits = model.forward_cached(model.xp.asarray(out[:, -(T // 2):]), cache)[:, -1]
        else:
            logits = model.forward_cached(model.xp.asarray(nxt), cache)[:, -1]
    return out
