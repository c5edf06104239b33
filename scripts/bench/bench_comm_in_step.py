"""A collective's seconds as calibrate times it (a train of calls back to back) against the same call made the way a
step makes it: right after some compute, on that compute's output (docs/planning.md, "Where the unshaped rows'
missing time goes"). Per call after compute, each rank's seconds inside it: the later-arriving rank's is the call's
own cost (it waits for nobody), the earlier one's adds the skew between the ranks. Medians.

    mpiexec -n 2 python scripts/bench/bench_comm_in_step.py [--dim 384] [--bytes 337000]
    scripts/vcluster.sh mpiexec -n 2 --host node1:1,node2:1 python scripts/bench/bench_comm_in_step.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hpc_llm.bench.calibrate import collective_calls
from hpc_llm.parallel.comm import world_comm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dim", type=int, default=384, help="the compute's matmuls: (rows x dim) @ (dim x dim)"
    )
    p.add_argument(
        "--bytes", type=int, default=337_000, help="the allreduced output (tp2's 0.34 MB)"
    )
    p.add_argument(
        "--stream-mb",
        type=float,
        default=0,
        help="then a sum over this many MB (evicting the caches)",
    )
    p.add_argument("--calls", type=int, default=60)
    args = p.parse_args()
    comm = world_comm()
    rng = np.random.default_rng(comm.rank)
    x = rng.random((args.bytes // 4 // args.dim, args.dim), dtype=np.float32)
    w = rng.random((args.dim, args.dim), dtype=np.float32)
    big = np.ones(int(args.stream_mb * 2**20) // 4, np.float32)

    def compute():
        # three products, as a block's linears follow each other; the last one's output is reduced
        x @ w
        x @ w
        big.sum()
        return x @ w

    alone = collective_calls(comm, x.nbytes)["allreduce"]
    for _ in range(3):
        alone()
    trains = []
    for _ in range(5):
        comm.barrier()
        t0 = time.perf_counter()
        for _ in range(args.calls // 5):
            alone()
        comm.barrier()
        trains.append((time.perf_counter() - t0) / (args.calls // 5))

    t_compute, inside = [], []
    comm.barrier()
    for _ in range(args.calls):
        t0 = time.perf_counter()
        y = compute()
        t1 = time.perf_counter()
        comm.allreduce_(y)
        t_compute.append(t1 - t0)
        inside.append(time.perf_counter() - t1)
    every = np.array(comm.allgather_objects(inside))
    if comm.rank == 0:
        ms = 1e3
        print(
            f"allreduce of {x.nbytes} B: train {np.median(trains) * ms:.3f} ms a call; after "
            f"{np.median(t_compute) * ms:.2f} ms of compute (dim {args.dim}, {args.stream_mb} MB streamed): "
            f"the later rank "
            f"{np.median(every.min(0)) * ms:.3f}, the earlier {np.median(every.max(0)) * ms:.3f}"
        )


if __name__ == "__main__":
    main()
