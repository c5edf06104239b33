"""Launches and bytes of the device path per Block (forward, backward) and per optimizer step, counted on NumPy by
the launch-counting stand-in for CuPy (hpc_llm/kernels/cuda/launches.py, hpc_llm/plan/launches.py).

    python scripts/bench/device_launches.py inputs/megatron_175b.toml --tp 8 --sp --precision bf16 --mbs 1 \
        --act-comm bf16

Block bytes are for the row's micro-batch and heads per rank (the harness's one-row, two-head counts scaled); the
optimizer step is counted on two shards (1 and 4 blocks of width 128): its launches, and its bytes per element."""

from __future__ import annotations

import argparse
import json

from hpc_llm.config import load_config
from hpc_llm.model.gpt import GPT
from hpc_llm.plan.launches import block_counts, optimizer_counts, optimizer_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument(
        "--recompute", default="none", help="none or selective (block: the forward again)"
    )
    ap.add_argument("--mbs", type=int, default=1)
    ap.add_argument(
        "--act-comm", default="fp32", help="the TP transfers' format (bf16: conversions counted)"
    )
    a = ap.parse_args()
    m = load_config(a.config).model
    c = block_counts(
        T=m.block_size,
        head_dim=m.n_embd // m.n_head,
        tp=a.tp,
        precision=a.precision,
        recompute=a.recompute,
        dropout=m.dropout,
        sp=a.sp,
        act_comm=a.act_comm,
    )
    scale = a.mbs * (m.n_head // a.tp) / 2
    out = {}
    for name, led in (("block_forward", c.forward), ("block_backward", c.backward)):
        gemm = led.total - led.elementwise
        out[name] = {
            "launches": led.total - led.launches["tp_collective"],
            "gemm_launches": gemm,
            "elementwise_GB": round(led.elementwise_bytes * scale / 1e9, 3),
        }
    small, large = (optimizer_counts(n, 128, a.precision) for n in (1, 4))
    elems = GPT(optimizer_model(4, 128), seed=None).local_size
    out["optimizer_step"] = {
        "launches_small_shard": small.total,
        "launches_large_shard": large.total,
        "large_shard_elements": elems,
        "bytes_per_element": round(large.elementwise_bytes / elems, 2),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
