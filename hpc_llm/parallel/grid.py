"""The process grid: world ranks -> (pp, dp, tp) coordinates, tp fastest-varying, and a communicator per group.

world rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so the ranks of one tensor-parallel group are consecutive and,
with ranks packed per node, stay on one node (tensor parallelism talks twice per layer; data parallelism once per
step). Pipeline parallelism (pp) is not implemented yet: it is fixed at 1 but keeps its place in the formula.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpc_llm.errors import UserError
from hpc_llm.parallel.comm import Comm, Ledger


@dataclass
class Grid:
    world: Comm
    tp_comm: Comm
    dp_comm: Comm
    tp: int
    dp: int
    pp: int = 1

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def tp_rank(self) -> int:
        return self.tp_comm.rank

    @property
    def dp_rank(self) -> int:
        return self.dp_comm.rank

    def describe(self) -> str:
        return (f"{self.world.size} ranks = dp {self.dp} x tp {self.tp} (tp fastest: a TP group is "
                f"{self.tp} consecutive ranks)")


def check_layout(world_size: int, tp: int, n_head: int, padded_vocab: int) -> None:
    """Reject a layout that does not fit, before any compute; the same verdict on every rank."""
    if tp < 1:
        raise UserError(f"parallel.tp: expected a positive integer, got {tp}")
    if world_size % tp:
        raise UserError(f"parallel.tp={tp} does not divide the number of ranks ({world_size})")
    if n_head % tp:
        raise UserError(f"parallel.tp={tp} does not divide model.n_head={n_head}")
    if padded_vocab % tp:
        raise UserError(f"parallel.tp={tp} does not divide the padded vocabulary ({padded_vocab})")


def single_process_grid() -> Grid:
    """A 1x1 grid that never calls MPI."""
    ledger = Ledger()
    return Grid(Comm(None, ledger, "world"), Comm(None, ledger, "tp"), Comm(None, ledger, "dp"), tp=1, dp=1)


def make_grid(mpi_comm, tp: int) -> Grid:
    """Split `mpi_comm` (usually MPI.COMM_WORLD) into tensor- and data-parallel groups; all ranks must call this."""
    size, rank = mpi_comm.Get_size(), mpi_comm.Get_rank()
    if size % tp:
        raise UserError(f"parallel.tp={tp} does not divide the number of ranks ({size})")
    dp = size // tp
    ledger = Ledger()
    tp_rank, dp_rank = rank % tp, rank // tp
    tp_mpi = mpi_comm.Split(color=dp_rank, key=tp_rank)  # the same dp index: one TP group
    dp_mpi = mpi_comm.Split(color=tp_rank, key=dp_rank)  # the same tp index: one DP group
    return Grid(Comm(mpi_comm, ledger, "world"), Comm(tp_mpi, ledger, "tp"), Comm(dp_mpi, ledger, "dp"), tp=tp, dp=dp)


def world_grid(tp: int) -> Grid:
    """The grid over MPI.COMM_WORLD; a single process run without mpiexec never calls MPI."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1 and tp == 1:
        return single_process_grid()
    return make_grid(MPI.COMM_WORLD, tp)
