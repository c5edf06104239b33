#!/usr/bin/env python
"""The planner's save terms (hpc_llm/plan/predict.py) for each writer: a save's time and what it costs training (the
stall), per save, for one model and layout.

    python scripts/bench/plan_saves.py inputs/megatron_175b.toml inputs/clusters/a100_dgx_ib200.toml \\
        pp=8,tp=8,dp=8,schedule=interleaved,virtual=3,micro=64,mbs=1,zero=1

Writers: gather (everything through world rank 0), mpio (each rank its dealt datasets into one shared file, a node's
ranks at one writer's bandwidth, after receiving their pieces), parts in the foreground and in the background
(checkpoint.async_save).
"""

from __future__ import annotations

import argparse
import json

from hpc_llm.config import load_config
from hpc_llm.plan.cluster_file import load_cluster
from hpc_llm.plan.given import given_layout
from hpc_llm.plan.memory import specs_of, stage_plan, stage_sync, staging_bytes
from hpc_llm.plan.predict import PRECISIONS, resolve_precision, save_terms


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
        "mpio": save_terms(cfg.model, lay, cl, precision, "mpio", False),
        "parts": save_terms(cfg.model, lay, cl, precision, "parts", False),
        "parts, async": save_terms(cfg.model, lay, cl, precision, "parts", True),
    }
    # a background save's host staging buffer on stage 0's data-parallel rank 0 (the planner's memory term)
    by = PRECISIONS[resolve_precision(cfg.model, precision)][1]
    specs = specs_of(cfg.model, lay.tp, stage_plan(cfg.model, lay, 0))
    owned = sum(b - a for a, b in stage_sync(specs, lay, 0, by).owned)
    rows["parts, async"]["staging_bytes"] = staging_bytes(specs, lay, 0, by, 0, owned)
    print(f"{args.config} on {lay.ranks} ranks ({args.layout}), {cl.name}:")
    for name, r in rows.items():
        print(f"  {name:13s} save {r['save_s']:9.1f} s   stall {r['stall_s']:9.3f} s")
    print(
        f"  staging buffer per rank (background saves): {rows['parts, async']['staging_bytes'] / 1e9:.2f} GB"
    )
    print("JSON " + json.dumps(rows))


if __name__ == "__main__":
    main()
