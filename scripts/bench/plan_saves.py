#!/usr/bin/env python
"""The planner's save terms (hpc_llm/plan/predict.py) for each writer: a save's time and what it costs training (the
stall), per save, for one model and layout.

    python scripts/bench/plan_saves.py inputs/megatron_175b.toml inputs/clusters/a100_dgx_ib200.toml \\
        pp=8,tp=8,dp=8,schedule=interleaved,virtual=3,micro=64,mbs=1,zero=1

Writers: gather (everything through world rank 0), mpio (priced as gather: one file's bandwidth), parts in the
foreground and in the background (checkpoint.async_save).
"""

from __future__ import annotations

import argparse
import json

from hpc_llm.config import load_config
from hpc_llm.plan.cluster import load_cluster
from hpc_llm.plan.given import given_layout
from hpc_llm.plan.predict import save_terms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("cluster")
    ap.add_argument("layout")
    args = ap.parse_args()
    cfg = load_config(args.config)
    cl = load_cluster(args.cluster)
    lay, precision = given_layout(cfg, args.layout)
    rows = {
        "gather": save_terms(cfg.model, lay, cl, precision, "gather", False),
        "parts": save_terms(cfg.model, lay, cl, precision, "parts", False),
        "parts, async": save_terms(cfg.model, lay, cl, precision, "parts", True),
    }
    print(f"{args.config} on {lay.ranks} ranks ({args.layout}), {cl.name}:")
    for name, r in rows.items():
        print(f"  {name:13s} save {r['save_s']:9.1f} s   stall {r['stall_s']:9.2f} s")
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
