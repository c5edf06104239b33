"""Gradient compression's crossover on the virtual cluster (docs/planning.md, "Across nodes: the planner against
shaped links"): the link rate below which each `parallel.grad_comm` scheme makes a dp 2 step (one rank on each of two
nodes) faster than fp32, measured (scripts/bench/bench_grad_comm.py at each rate: the schemes alternating step by
step) beside the planner's prediction (plan/grad_comm.py) on the cluster file calibrated across the nodes.

    python scripts/bench/vcluster_crossover.py --cluster CLUSTER.toml --rate-of-cluster 100mbit \\
        --measured RATE=bench_grad_comm.out ...  [--preset shakespeare-char]

The planner's link at another rate: the calibrated link's bandwidth scaled by the rate (the share of the nominal
rate that Open MPI's TCP gets, as calibrated, kept); "none" (unshaped) is the calibrated cluster file of that run
when given as --cluster-unshaped, else not predicted. Prints the markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hpc_llm.config import Config  # noqa: E402
from hpc_llm.plan.cluster_file import load_cluster  # noqa: E402
from hpc_llm.plan.memory import Layout  # noqa: E402
from hpc_llm.plan.predict import predict  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import PRESETS, model_shape  # noqa: E402

SCHEMES = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("powersgd r=4", "powersgd"))
UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def bits(rate: str) -> float:
    for unit, m in UNITS.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * m
    raise SystemExit(f"a rate like 100mbit: got {rate}")


def predicted(cl, model, batch: int, bw: float | None) -> dict:
    """{scheme: predicted step s} at dp 2 across two nodes, the inter link's bandwidth bw (None: as calibrated)."""
    cl = dataclasses.replace(cl, devices=1, links=dict(cl.links))
    if bw is not None:
        link = cl.links["inter"]

        # a table by message size (and each collective kind's) keeps its shape, scaled to the new rate
        def scaled(table: tuple) -> tuple:
            return tuple((size, b * bw / link.bw) for size, b in table)

        table = scaled(link.bw_by_size)
        kinds = tuple((kind, scaled(t)) for kind, t in link.collectives)
        cl.links["inter"] = dataclasses.replace(
            link, bw=bw, nb_bw=bw, bw_by_size=table, nb_bw_by_size=table, collectives=kinds
        )
    return {
        name: predict(model, Layout(1, 2, 1, batch_size=batch, grad_comm=gc), cl, "fp32").time[
            "step"
        ]
        for name, gc in SCHEMES
    }


def crossover(cl, model, batch: int, scale: float, scheme: str) -> float | None:
    """The rate (bit/s) below which `scheme` beats fp32, by bisection in log(rate) over 1 Mbit/s .. 1 Tbit/s."""

    def gain(rate):
        p = predicted(cl, model, batch, scale * rate / 8)
        return p["fp32"] - p[scheme]

    lo, hi = 1e6, 1e12
    if gain(lo) <= 0:
        return None  # never pays
    if gain(hi) > 0:
        return math.inf
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if gain(mid) > 0 else (lo, mid)
    return lo


def measured(path: str) -> dict:
    """{scheme: step s} from bench_grad_comm.py's JSON line."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("JSON "):
            return {r["scheme"]: r["step_ms"] / 1e3 for r in json.loads(line[5:])}
    raise SystemExit(f"{path}: no JSON line of bench_grad_comm.py")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument(
        "--rate-of-cluster", required=True, help="the rate the cluster file was calibrated at"
    )
    ap.add_argument("--cluster-unshaped")
    ap.add_argument("--measured", nargs="+", default=[], metavar="RATE=FILE")
    ap.add_argument("--preset", default="shakespeare-char")
    args = ap.parse_args()
    cl = load_cluster(args.cluster)
    scale = cl.links["inter"].bw * 8 / bits(args.rate_of_cluster)
    cfg = Config()
    for k, v in model_shape(args.preset).items():
        setattr(cfg.model, k, v)
    batch = PRESETS[args.preset]["batch"]
    print(
        f"calibrated link: {cl.links['inter'].bw / 1e6:.2f} MB/s = {100 * scale:.0f}% of the rate"
    )
    print("\n| link | " + " | ".join(f"{n} measured / predicted ms" for n, _ in SCHEMES) + " |")
    print("|" + " --- |" * (len(SCHEMES) + 1))
    for item in args.measured:
        rate, path = item.split("=", 1)
        got = measured(path)
        if rate == "none":
            pred = (
                predicted(load_cluster(args.cluster_unshaped), cfg.model, batch, None)
                if (args.cluster_unshaped)
                else {}
            )
        else:
            pred = predicted(cl, cfg.model, batch, scale * bits(rate) / 8)
        cells = [
            f"{1e3 * got[n]:.0f} / " + (f"{1e3 * pred[n]:.0f}" if n in pred else "-")
            for n, _ in SCHEMES
        ]
        print(f"| {rate} | " + " | ".join(cells) + " |")
    print(
        "\npredicted crossover (compression pays below): "
        + ", ".join(
            f"{n}: {_fmt(crossover(cl, cfg.model, batch, scale, n))}" for n, _ in SCHEMES[1:]
        )
    )


def _fmt(rate: float | None) -> str:
    if rate is None:
        return "never"
    if math.isinf(rate):
        return "always (to 1 Tbit/s)"
    return f"{rate / 1e6:.0f} Mbit/s"


if __name__ == "__main__":
    main()
