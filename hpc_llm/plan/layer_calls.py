"""The layers' calls priced at what they cost in the model's own code.

call_s and gemm_call_s are one NumPy call repeated in a hot loop (bench/calibrate.elementwise_figures): 0.5 and
0.8 us here. A step's layers pay ~1.5 us a call: each call goes through a layer's Python (its methods, the cache
tuples, the precision's hooks) and its arguments are new arrays, not the one small array of the loop. Where a cluster
file has compute.tiny_block_s (the model's own Block forward and backward at bench/calibrate.TINY_BLOCK, where its
bytes and FLOPs take a few microseconds of its ~200), a call in the layers is priced at what that implies: the
tiny Block's seconds, less its priced bytes and FLOPs, over the calls plan/compute.py counts in it. The figure is
read through the inventory itself, so it prices exactly the calls the inventory counts. The optimizer step and the
gradient norm, a loop of chunked calls on a few arrays like calibrate's, keep call_s.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from hpc_llm.bench.calibrate import TINY_BLOCK
from hpc_llm.plan.cluster import Cluster
from hpc_llm.plan.compute import block_backward, block_forward
from hpc_llm.plan.pricer import Pricer


def _tiny_block(cl: Cluster) -> float:
    """The tiny Block's forward and backward as plan/compute.py prices it (fp32, one rank)."""
    t = TINY_BLOCK
    p = Pricer(cl, "float32", 4, 1, None)
    shape = (t["batch"], t["block_size"], t["n_embd"], t["n_head"])
    return block_forward(p, *shape).compute + block_backward(p, *shape, False).compute


def layer_call_s(cl: Cluster) -> float | None:
    """Seconds a call costs in the layers (None where the file has no tiny_block_s)."""
    if cl.tiny_block_s is None:
        return None
    free = replace(cl, call_s=0.0, gemm_call_s=0.0)
    work = _tiny_block(free)
    calls = _tiny_block(replace(free, call_s=1.0, gemm_call_s=1.0)) - work
    return max(0.0, cl.tiny_block_s - work) / calls


def in_layers(pr: Pricer) -> Pricer:
    """The pricer for the layers' forward and backward: every call at layer_call_s; pr itself without the figure."""
    per_call = layer_call_s(pr.cl)
    if per_call is None:
        return pr
    out = copy.copy(pr)
    out.cl = replace(pr.cl, call_s=per_call, gemm_call_s=per_call)
    return out
