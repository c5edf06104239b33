"""The validation table of docs/planning.md from the measured runs, predicted again by the planner as it is now.

    python scripts/bench/validation_table.py docs/planning_data/validation.jsonl \
        --cluster docs/planning_data/this_machine.toml

Each JSON line is one run of scripts/bench/validate_plan.py (its measured step times, CPU times and peak memory, the
layout, the config overrides). The prediction is recomputed here from the same preset, layout and overrides on
--cluster (ranks per device = ranks / cores when oversubscribed, as validate_plan.py does), so a change to the cost
model shows on the same measurements; the prediction stored in the line (the model as it was at the run) is shown
beside it with --stored. Prints the markdown table and the summary (runs within 15% / 10%, median and largest
|error|).
"""

from __future__ import annotations

import argparse
import json
import statistics

from common import model_sets


def describe(lay: dict, sets: list) -> str:
    desc = f"pp{lay['pp']} dp{lay['dp']} tp{lay['tp']}" + (
        f" zero{lay['zero']}" if lay["zero"] else ""
    )
    if lay["pp"] > 1:
        desc += f" {lay['schedule']}" + (f" v{lay['virtual']}" if lay["virtual"] > 1 else "")
    return desc + f" m{lay['micro_batches']} b{lay['batch_size']}" + "".join(f" {s}" for s in sets)


def repredict(row: dict, cl) -> tuple[dict, int]:
    """-> (predicted step parts in seconds, predicted peak bytes per rank) for a validation run."""
    from hpc_llm.config import load_config
    from hpc_llm.plan.memory import Layout, rank_memory
    from hpc_llm.plan.predict import PRECISIONS, predict

    lay = Layout(**row["layout"])
    # the layout first (the config's checks read it: sequence parallelism needs its tp), then the run's overrides
    grid = [
        f"parallel.tp={lay.tp}",
        f"parallel.pp={lay.pp}",
        f"parallel.schedule={lay.schedule}",
        f"parallel.virtual_stages={lay.virtual}",
        f"train.grad_accum={lay.micro_batches}",
    ]
    cfg = load_config(None, model_sets(row["preset"]) + grid + list(row["sets"]))
    share = max(1.0, row["ranks"] / cl.devices)
    pred = predict(cfg.model, lay, cl, getattr(cfg.train, "precision", None), share)
    by = PRECISIONS[pred.precision][1]
    mem = max(
        rank_memory(cfg.model, lay, s, by, dp_rank=r).step_peak
        for s in range(lay.pp)
        for r in range(lay.dp)
    )
    return pred.time, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jsonl")
    ap.add_argument("--cluster", default="docs/planning_data/this_machine.toml")
    ap.add_argument(
        "--stored", action="store_true", help="also show the prediction recorded at the run"
    )
    args = ap.parse_args()
    from hpc_llm.plan.cluster_file import load_cluster

    cl = load_cluster(args.cluster)
    rows = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    head = (
        "| # | shape | ranks | layout | measured ms (wall / CPU) | predicted ms | error vs wall / CPU | "
        "peak MiB measured / predicted | error | load |"
    )
    if args.stored:
        head += " predicted at the run |"
    out = [head, "|" + " --- |" * (11 if args.stored else 10)]
    t_err, m_err = [], []
    for i, r in enumerate(rows, 1):
        parts, mem = repredict(r, cl)
        w, c, p = 1000 * r["measured_step_s"], 1000 * r["cpu_step_s"], 1000 * parts["step"]
        measured = r["measured_peak_bytes"]
        t_err.append(p / w - 1)
        m_err.append(mem / measured - 1)
        line = (
            f"| {i} | {r['preset']} | {r['ranks']} | {describe(r['layout'], r['sets'])} | {w:.0f} / {c:.0f} | "
            f"{p:.0f} | {100 * (p / w - 1):+.0f}% / {100 * (p / c - 1):+.0f}% | {measured / 2**20:.0f} / "
            f"{mem / 2**20:.0f} | {100 * m_err[-1]:+.1f}% | {r['load']:.1f} |"
        )
        if args.stored:
            line += f" {1000 * r['predicted_step_s']:.0f} ms |"
        out.append(line)
    print("\n".join(out))
    at = [abs(e) for e in t_err]
    am = [abs(e) for e in m_err]
    print(
        f"\ntime vs wall: {sum(e <= 0.15 for e in at)} of {len(at)} within 15%, median |error| "
        f"{100 * statistics.median(at):.1f}%, largest {100 * max(at):.1f}%"
    )
    print(
        f"peak memory: {sum(e <= 0.10 for e in am)} of {len(am)} within 10%, median |error| "
        f"{100 * statistics.median(am):.1f}%, largest {100 * max(am):.1f}%"
    )


if __name__ == "__main__":
    main()
