"""The fused attention's products on a device (kernels/cuda/attention.cu), priced in place of the unfused loop's.

A device Block is priced as the inventory's GEMMs plus the counted elementwise launches and bytes (plan/launches.py),
and the counted ledger already holds the fused kernels' launches and their bytes (q, k, v, y, dy, logsumexp and D
read or written once per kernel; the re-reads of k and v by each query tile, and of q and dy by each key tile,
assumed served from L2). What the inventory has wrong for the fused path is its attention GEMMs: the unfused loop's
per 128-query block (compute.attention_core_forward, block_backward_input). The fused kernels compute, per pair of a
query tile and a key tile it sees (TILE rows each, the diagonal tile whole), 2 products forward (s = q k^T, p v) and
7 backward (attention_backward_kv: s, dp, dv, dk; attention_backward_q: s, dp, dq), priced as one product of
T x (the mean keys a query's tile sees) x head size each at the cluster's GEMM rate for that shape in the dtype
attention.cu multiplies in: the compute format's (bfloat16, float16) where it runs them on tensor cores (a 16-bit
format and a head size a multiple of 16: kernels/attention.tensor_core_products, the kernel's own test), else
float32's (scalar FMA loops on CUDA cores)."""

from __future__ import annotations

from hpc_llm.kernels.attention import TILE, tensor_core_products
from hpc_llm.model.attention import query_blocks

PRODUCTS = {False: 2, True: 7}  # the fused forward's, backward's
FORMATS = {"bfloat16": "bf16", "float16": "fp16"}  # Pricer.low -> the compute format


def kernel_dtype(p, hd: int) -> str:
    """The dtype of attention.cu's tile products at head size hd: the 16-bit format's on tensor cores, else
    float32."""
    return p.low if p.low and tensor_core_products(FORMATS[p.low], hd) else "float32"


def _product(p, m: int, n: int, k: int, batch: int) -> float:
    """A matmul's arithmetic at the cluster's rate for the kernel's dtype (k: the head size), without a call's cost
    (the ledger counts the launches)."""
    if m * n * k == 0:
        return 0.0
    return p.share * batch * 2.0 * m * n * k / p.cl.gemm_rate(kernel_dtype(p, k), m, n, k)


def fused_seconds(p, b: int, T: int, h: int, hd: int, backward: bool) -> float:
    """The fused kernels' products of one Block (h heads on this rank, b rows)."""
    tiles = [(a, min(a + TILE, T)) for a in range(0, T, TILE)]
    keys = sum((i1 - i0) * min(T, -(-i1 // TILE) * TILE) for i0, i1 in tiles) / T  # per query
    return PRODUCTS[backward] * _product(p, T, round(keys), hd, b * h)


def unfused_seconds(p, b: int, T: int, h: int, hd: int, backward: bool, selective: bool) -> float:
    """The inventory's attention GEMMs (compute.py): 2 per query block forward, 4 backward (5 with selective
    recompute's q k^T again)."""
    n = 2 if not backward else 5 if selective else 4
    return n * sum(p.gemm(q1 - q0, q1, hd, b * h).gemm for q0, q1 in query_blocks(T))


def gemm_delta(p, b: int, T: int, h: int, hd: int, backward: bool, selective: bool) -> float:
    """What the fused kernels' products add to (or take from) the inventory's GEMM seconds for one Block."""
    return fused_seconds(p, b, T, h, hd, backward) - unfused_seconds(
        p, b, T, h, hd, backward, selective
    )
