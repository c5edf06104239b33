"""The data-parallel reduction under `parallel.grad_comm` (hpc_llm/parallel/compression.py), priced for predict.py.

- "bf16" / "fp16": each bucket moves 2-byte words (an alltoallv with a reduce-scatter's traffic, then without ZeRO an
  allgatherv: an allreduce's bytes at 2 per element), started as backward finishes it like the fp32 buckets; the
  casts cost each element a rounding and a widening (twice without ZeRO).
- "powersgd": at the step's end, blocking: per compressible matrix (rows x cols, r = min(rank, rows, cols),
  PyTorch's rule) the matmuls M Q, M^T P^ and P^ Q^T, a QR of the rows x r P (about two rows x r x r matmuls), the
  error feedback's passes; one allreduce of every P packed, one of every Q, and one of the other tensors (vectors,
  matrices not worth compressing) beside them.
"""

from __future__ import annotations

from hpc_llm.plan.cluster import Link

SIXTEEN = ("bf16", "fp16")
MIN_COMPRESSION_RATE = 2  # compression.py's (PyTorch's)


def wire_bytes(grad_comm: str, grad_bytes: int) -> int:
    """Bytes per gradient element on the wire."""
    return 2 if grad_comm in SIXTEEN else grad_bytes


def sixteen_bit_casts(pr, grad_comm: str, elems: int, zero: int) -> float:
    """The 16-bit reduction's conversions of `elems` gradients: to the format and back, twice without ZeRO."""
    fmt = {"bf16": "bfloat16", "fp16": "float16"}[grad_comm]
    once = pr.cl.cast_time(fmt, True, elems) + pr.cl.cast_time(fmt, False, elems)
    return pr.share * once * (1 if zero else 2)


def _matrices(specs, rank: int) -> tuple[list, int]:
    """([(rows, cols, r)] of the compressed matrices, elements reduced plain)."""
    mats, plain = [], 0
    for x in specs:
        shape = x.local_shape
        if len(shape) == 2:
            rows, cols = shape
            r = min(rank, rows, cols)
            if (rows + cols) * r * MIN_COMPRESSION_RATE < rows * cols:
                mats.append((rows, cols, r))
                continue
        plain += x.size
    return mats, plain


def powersgd_seconds(specs, rank: int, dp: int, link: Link, pr, grad_bytes: int) -> float:
    """One step's PowerSGD reduction for one rank: its compute and its three allreduces, all exposed."""
    mats, plain = _matrices(specs, rank)
    cl, t = pr.cl, 0.0
    for rows, cols, r in mats:
        t += cl.gemm_time("float32", rows, r, cols)  # P = M Q
        t += cl.gemm_time("float32", cols, r, rows)  # Q = M^T P^
        t += cl.gemm_time("float32", rows, cols, r)  # A = P^ Q^T
        t += 2 * cl.gemm_time("float32", rows, r, r)  # the QR of P
        # M += e; e = M - A / p; M = A: about 5 passes over the matrix
        t += cl.pass_time(5 * rows * cols, grad_bytes, rows * cols, calls=4)
    p_bytes = sum(rows * r for rows, _, r in mats) * grad_bytes
    q_bytes = sum(cols * r for _, cols, r in mats) * grad_bytes
    # Comm.iallreduce_, each waited for at once: priced, without its table, at the blocking rate
    comm = sum(
        link.seconds("iallreduce", b, dp, nonblocking=False)
        for b in (p_bytes, q_bytes, plain * grad_bytes)
        if b
    )
    return pr.share * t + comm
