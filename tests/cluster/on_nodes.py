"""The rank side of test_vcluster.py, run by it under the virtual cluster's mpiexec (scripts/vcluster.sh mpiexec), so
each rank runs inside its node (not collected by pytest: its name does not start with test_).

    python on_nodes.py probe              # any ranks
    python on_nodes.py single DATA OUT    # one process, no launcher
    python on_nodes.py across DATA OUT    # 2 ranks per node (4 on 2 nodes, 8 on 4), after `single`
    python on_nodes.py resume DATA OUT    # 2 ranks on one node, after `across`

`probe`: rank 0 prints every rank's hostname, the groups of ranks Open MPI sees sharing memory (one node: shared
memory between them, TCP to the others), and the message the last rank got from rank 0.
`single`: the run trained to K in one process; its checkpoint in OUT/single.
`across`: TP2 with the other ranks data parallel, ZeRO-1 (the data-parallel groups span the nodes), resumes the
one-process checkpoint to N, and PP2 x TP2 with the rest data parallel (the pipeline spans them) trains from scratch
to K, leaving its checkpoint in OUT/pp2xtp2; both follow what one process trains (float64, dropout: 1e-10,
test_parallel.py's tolerance), and each TP group is on one node.
`resume`: DP2 on one node resumes the PP2 x TP2 checkpoint written across the nodes to N and follows the single
process. Every rank checks itself; rank 0 prints every rank's problems and the job exits 1 if there are any (0 and
`ok` otherwise).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers.py

from helpers import (  # noqa: E402
    F64_RTOL,
    reference_checks,
    rel_diff,
    replica_checks,
    run_config,
    train,
)
from mpi4py import MPI  # noqa: E402

from hpc_llm.parallel.grid import make_grid, single_process_grid  # noqa: E402
from hpc_llm.train.trainer import Trainer  # noqa: E402

K, N = 2, 4  # the cross-node run saves at K; the one-node run resumes it to N
COMMON = {
    "model.dtype": "float64",
    "model.dropout": 0.1,
    "train.grad_accum": 2,
}


def reference(data, out, job: str):
    """The single-process run to N (each rank its own, under its own out_dir)."""
    rank = MPI.COMM_WORLD.rank
    cfg = run_config(data, out / f"ref-{job}-{rank}", **COMMON, **{"train.max_iters": N})
    return train(cfg, single_process_grid())


def placement_checks(tr, name: str, spans: str) -> list[str]:
    """Every TP group on one node; the group `spans` (dp or pp) over more than one."""
    bad, host = [], socket.gethostname()
    tp_hosts = tr.grid.tp_comm.mpi.allgather(host)
    if len(set(tp_hosts)) != 1:
        bad.append(f"{name}: the TP group of world rank {tr.grid.rank} is on {tp_hosts}")
    across = getattr(tr.grid, f"{spans}_comm").mpi.allgather(host)
    if len(set(across)) < 2:
        bad.append(f"{name}: the {spans} group of world rank {tr.grid.rank} is all on {across[0]}")
    return bad


def single(data, out) -> list[str]:
    tr = train(
        run_config(data, out / "single", **COMMON, **{"train.max_iters": K}), single_process_grid()
    )
    return [] if tr.step == K else [f"the single process stopped at step {tr.step}"]


def resumed(cfg, grid, run: Path, name: str) -> tuple[Trainer, list[str]]:
    """cfg trained on grid from run's newest checkpoint (at K) to its end; [a problem] if it did not start at K."""
    tr = Trainer(cfg, resume=str(sorted(run.glob("ckpt_*.h5"))[-1]), grid=grid)
    start = tr.step
    tr.summary = tr.run()
    return tr, (
        [] if start == K else [f"{name}: started at step {start}, not at the checkpoint's {K}"]
    )


def across(data, out) -> list[str]:
    ref = reference(data, out, "across")
    name = f"dp{MPI.COMM_WORLD.size // 2} x tp2, ZeRO-1, resumed from one process"
    dp, bad = resumed(
        run_config(
            data,
            out / "dp2xtp2",
            **COMMON,
            **{"train.max_iters": N, "parallel.tp": 2, "parallel.zero": 1},
        ),
        make_grid(MPI.COMM_WORLD, 2),
        out / "single",
        name,
    )
    bad += reference_checks(dp, ref, name, slice(K, None)) + replica_checks(dp)
    bad += placement_checks(dp, name, "dp")
    pp = train(
        run_config(
            data,
            out / "pp2xtp2",
            **COMMON,
            **{"train.max_iters": K, "parallel.tp": 2, "parallel.pp": 2},
        ),
        make_grid(MPI.COMM_WORLD, 2, 2),
    )
    name = f"pp2 x dp{pp.grid.dp} x tp2"
    got, want = pp.metrics.train, ref.metrics.train
    for key in ("loss", "grad_norm"):
        if not rel_diff(got[key], want[key][:K]) <= F64_RTOL:
            bad.append(f"{name} {key}: {got[key]} vs reference {want[key][:K]}")
    bad += placement_checks(pp, name, "pp")
    if pp.step != K or not pp.summary.get("checkpoint"):
        bad.append(f"{name}: step {pp.step}, checkpoint {pp.summary.get('checkpoint')}")
    return bad


def resume(data, out) -> list[str]:
    ref = reference(data, out, "resume")
    hosts = set(MPI.COMM_WORLD.allgather(socket.gethostname()))
    name = "dp2 on one node, resumed from pp2 x tp2 across nodes"
    tr, bad = resumed(
        run_config(data, out / "resumed", **COMMON, **{"train.max_iters": N}),
        make_grid(MPI.COMM_WORLD, 1),
        out / "pp2xtp2",
        name,
    )
    bad += [] if len(hosts) == 1 else [f"the resuming job is on {sorted(hosts)}, not one node"]
    return bad + reference_checks(tr, ref, name, slice(K, None))


def probe() -> int:
    comm = MPI.COMM_WORLD
    hosts = comm.gather(socket.gethostname())
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    groups = comm.gather(",".join(map(str, local.allgather(comm.rank))))
    if comm.rank == 0:
        comm.send(f"from rank 0 on {socket.gethostname()}", dest=comm.size - 1)
    got = comm.recv(source=0) if comm.rank == comm.size - 1 else None
    got = comm.bcast(got, root=comm.size - 1)
    if comm.rank == 0:
        print(
            f"hostnames {' '.join(hosts)}; shared memory {' '.join(sorted(set(groups)))}; "
            f"rank {comm.size - 1} got: {got}",
            flush=True,
        )
    return 0


def main() -> int:
    if sys.argv[1] == "probe":
        return probe()
    what, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    bad = {"single": single, "across": across, "resume": resume}[what](data, out)
    comm = MPI.COMM_WORLD
    lines = comm.gather([f"rank {comm.rank} on {socket.gethostname()}: {b}" for b in bad])
    if comm.rank == 0:
        report = [line for rank_lines in lines for line in rank_lines]
        print("\n".join(report) if report else "ok", flush=True)
    return 1 if comm.allreduce(len(bad)) else 0


if __name__ == "__main__":
    sys.exit(main())
