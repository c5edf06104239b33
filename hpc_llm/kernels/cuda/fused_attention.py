"""The fused (flash-style) attention on a device: attention.cu's forward kernel and its three backward kernels
(the rows' D, then dk and dv per key tile, then dq per query tile), launched on CuPy, or counted on the
launch-counting stand-in while their NumPy twin (kernels/attention.py) computes. model/attention.py's
attention_forward / attention_backward call these on a device."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from hpc_llm.kernels import attention as flash
from hpc_llm.kernels.cuda.device import NULL, ROUNDING, THREADS, grid_1d, module, run_kernel


class FlashCache(NamedTuple):
    """What the fused attention's backward needs beside qkv: forward's output kept in the format (with fp32 the
    array the projection keeps too, no copy), each row's logsumexp (B, heads, T), and the dropout
    (kernels/attention.AttnDropout, None: none)."""

    y: object
    lse: object
    drop: object


def _attention_args(xp, n_head: int, hd: int, prec, drop) -> tuple:
    """attention.cu's trailing arguments: scale, rounding mode, dropout (rows, head0, key, threshold, scale)."""
    rows = NULL if drop is None else xp.asarray(np.asarray(drop.rows, dtype=np.uint32))
    d = (0, (0, 0), 0, 1.0) if drop is None else (drop.head0, drop.key, drop.threshold, drop.scale)
    return (
        np.float32(1.0 / math.sqrt(hd)),
        np.int32(ROUNDING[prec.name]),
        rows,
        np.int32(d[0]),
        *(np.uint32(k) for k in d[1]),
        np.uint32(d[2]),
        np.float32(d[3]),
    )


@functools.cache
def _attention_kernel(name: str, hd: int, tiles: int, tensor_cores: bool):
    """attention.cu's kernel `name` and the shared memory (bytes) its tiles of head size hd need, which it is
    allowed (beyond the default 48 kB from hd 79 backward, 158 forward); on tensor cores also its two TILE x CH
    product buffers."""
    from cupy.cuda import driver

    tile = flash.TILE
    nbytes = 4 * (tiles * tile * hd + 2 * tile * (tile + 1) + 3 * tile)
    nbytes += 4 * 2 * tile * flash.PRODUCT_CHUNK if tensor_cores else 0
    fn = module("attention").get_function(name)
    attr = getattr(driver, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 8)
    driver.funcSetAttribute(fn.ptr, attr, nbytes)
    return fn, nbytes


def fusable(qkv, n_head: int) -> bool:
    return qkv.shape[2] // 3 // n_head <= flash.MAX_HEAD_DIM


def flash_attention_forward(xp, qkv, n_head: int, prec, drop):
    """attention.attention_forward on a device: (y, (qkv kept, None, FlashCache)), one launch (attention_forward)."""
    B, T, C3 = qkv.shape
    hd = C3 // 3 // n_head

    def launch():
        y = xp.empty((B, T, C3 // 3), dtype=qkv.dtype)
        lse = xp.empty((B, n_head, T), dtype=qkv.dtype)
        fn, smem = _attention_kernel(
            "attention_forward", hd, 2, flash.tensor_core_products(prec.name, hd)
        )
        args = (qkv, y, lse, np.int32(T), np.int32(n_head), np.int32(hd))
        grid = (-(-T // flash.TILE), n_head, B)
        fn(grid, (THREADS,), (*args, *_attention_args(xp, n_head, hd, prec, drop)), shared_mem=smem)
        return y, lse

    def twin(qkv_):
        return flash.flash_forward(qkv_, n_head, prec, drop)

    if xp.__name__ == "cupy" and not fusable(qkv, n_head):
        y, lse = twin(qkv)
    else:
        # q, k, v read once (their tiles' re-reads by later query tiles: L2), y and lse written once
        nbytes = qkv.nbytes * 4 // 3 + B * n_head * T * qkv.itemsize
        y, lse = run_kernel(xp, "attention_forward", nbytes, twin, (qkv,), launch)
    return y, (prec.keep(qkv), None, FlashCache(prec.keep(y), lse, drop))


def flash_attention_backward(xp, dy, cache, n_head: int, prec):
    """attention.attention_backward of a FlashCache: dqkv (B, T, 3C) in three launches (the rows' D, then dk and dv,
    then dq)."""
    kept, _, fc = cache
    qkv, y = prec.use(kept, dy.dtype), prec.use(fc.y, dy.dtype)
    B, T, C = dy.shape
    hd = C // n_head
    rows = B * n_head * T * dy.itemsize  # lse or D
    fuse = xp.__name__ != "cupy" or fusable(qkv, n_head)

    def dot_launch():
        D = xp.empty((B, n_head, T), dtype=dy.dtype)
        fn = module("attention").get_function("attention_backward_dot")
        args = (dy, y, D, np.int32(T), np.int32(n_head), np.int32(hd))
        fn(grid_1d(B * n_head * T), (THREADS,), (*args, np.int32(ROUNDING[prec.name]), np.int32(B)))
        return D

    def dot_twin(dy_, y_):
        return flash.flash_backward_dot(dy_, y_, n_head, prec)

    if fuse:
        D = run_kernel(
            xp, "attention_backward_dot", 2 * dy.nbytes + rows, dot_twin, (dy, y), dot_launch
        )
    else:
        D = dot_twin(dy, y)
    dqkv = xp.empty((B, T, 3 * C), dtype=dy.dtype)
    for name, twin, part in (
        ("attention_backward_kv", flash.flash_backward_kv, 2),
        ("attention_backward_q", flash.flash_backward_q, 1),
    ):

        def launch(name=name, part=part):
            fn, smem = _attention_kernel(name, hd, 4, flash.tensor_core_products(prec.name, hd))
            args = (qkv, dy, fc.lse, D, dqkv, np.int32(T), np.int32(n_head), np.int32(hd))
            tail = _attention_args(xp, n_head, hd, prec, fc.drop)
            fn((-(-T // flash.TILE), n_head, B), (THREADS,), (*args, *tail), shared_mem=smem)

        def run_twin(qkv_, dy_, lse_, D_, twin=twin):
            twin(dy_, qkv_, lse_, D_, n_head, prec, fc.drop, dqkv)

        # qkv, dy, lse and D read once (re-reads of tiles: L2), this kernel's part of dqkv written once
        nbytes = qkv.nbytes + dy.nbytes + 2 * rows + part * dy.nbytes
        if fuse:
            run_kernel(xp, name, nbytes, run_twin, (qkv, dy, fc.lse, D), launch)
        else:
            run_twin(qkv, dy, fc.lse, D)
    return dqkv
