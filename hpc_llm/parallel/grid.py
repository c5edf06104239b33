"""The process grid: world ranks -> (pp, dp, tp) coordinates, tp fastest-varying, and a communicator per group.

world rank = (pp_rank * dp + dp_rank) * tp + tp_rank, so the ranks of one tensor-parallel group are consecutive and,
with ranks packed per node, stay on one node (tensor parallelism talks twice per layer; data parallelism once per
step), and pipeline neighbours are dp * tp ranks apart (they exchange one activation per micro-batch).

Groups, each made by Split:
    tp   same (pp, dp): one tensor-parallel group (a stage's shards)
    dp   same (pp, tp): one data-parallel group (replicas of the same shard of the same stage)
    pp   same (dp, tp): one pipeline (point-to-point activations and gradients between neighbours)
    mp   same dp: the whole model once (tp x pp ranks): the gradient norm without ZeRO-1
    emb  the first and the last stage of one pipeline (pp > 1 only): the two copies of the tied embedding (none in a
         V, schedule "zbv": rank 0 holds both ends of the model, one copy)

`mpi4py.MPI` is imported inside the functions that need it: importing it initialises MPI, which a single process
run without mpiexec never does.
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
    pp_comm: Comm
    mp_comm: Comm
    emb_comm: Comm | None  # None: pp == 1 (one copy of the embedding), or a middle stage
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

    @property
    def pp_rank(self) -> int:
        return self.pp_comm.rank

    def describe(self) -> str:
        return (
            f"{self.world.size} ranks = pp {self.pp} x dp {self.dp} x tp {self.tp} (tp fastest: a TP group is "
            f"{self.tp} consecutive ranks; pipeline neighbours {self.dp * self.tp} apart)"
        )


def check_layout(
    world_size: int, tp: int, pp: int, n_head: int, padded_vocab: int, mlp_width: int = 0
) -> None:
    """Reject a layout that does not fit, before any compute; the same verdict on every rank. mlp_width: the MLP's
    hidden width (a pruned model's need not be a multiple of tp)."""
    if tp < 1:
        raise UserError(f"parallel.tp: expected a positive integer, got {tp}")
    if pp < 1:
        raise UserError(f"parallel.pp: expected a positive integer, got {pp}")
    if world_size % (tp * pp):
        raise UserError(
            f"parallel.tp={tp} x parallel.pp={pp} does not divide the number of ranks ({world_size})"
        )
    if n_head % tp:
        raise UserError(f"parallel.tp={tp} does not divide model.n_head={n_head}")
    if mlp_width % tp:
        raise UserError(
            f"parallel.tp={tp} does not divide the MLP width ({mlp_width}, model.n_inner)"
        )
    if padded_vocab % tp:
        raise UserError(f"parallel.tp={tp} does not divide the padded vocabulary ({padded_vocab})")


def single_process_grid() -> Grid:
    """A 1x1x1 grid that never calls MPI."""
    ledger = Ledger()
    one = {name: Comm(None, ledger, name) for name in ("world", "tp", "dp", "pp", "mp")}
    return Grid(one["world"], one["tp"], one["dp"], one["pp"], one["mp"], None, tp=1, dp=1, pp=1)


def make_grid(mpi_comm, tp: int, pp: int = 1, v_shape: bool = False) -> Grid:
    """Split `mpi_comm` (usually MPI.COMM_WORLD) into the groups above; all ranks must call this."""
    size, rank = mpi_comm.Get_size(), mpi_comm.Get_rank()
    if size % (tp * pp):
        raise UserError(
            f"parallel.tp={tp} x parallel.pp={pp} does not divide the number of ranks ({size})"
        )
    dp = size // (tp * pp)
    ledger = Ledger()
    tp_rank, dp_rank, pp_rank = rank % tp, rank // tp % dp, rank // (tp * dp)
    tp_mpi = mpi_comm.Split(color=pp_rank * dp + dp_rank, key=tp_rank)
    dp_mpi = mpi_comm.Split(color=pp_rank * tp + tp_rank, key=dp_rank)
    pp_mpi = mpi_comm.Split(color=dp_rank * tp + tp_rank, key=pp_rank)
    mp_mpi = mpi_comm.Split(color=dp_rank, key=rank)
    from mpi4py import MPI

    holds_embedding = pp > 1 and not v_shape and pp_rank in (0, pp - 1)
    emb_mpi = mpi_comm.Split(
        color=dp_rank * tp + tp_rank if holds_embedding else MPI.UNDEFINED, key=pp_rank
    )
    emb = Comm(emb_mpi, ledger, "emb") if holds_embedding else None
    return Grid(
        Comm(mpi_comm, ledger, "world"),
        Comm(tp_mpi, ledger, "tp"),
        Comm(dp_mpi, ledger, "dp"),
        Comm(pp_mpi, ledger, "pp"),
        Comm(mp_mpi, ledger, "mp"),
        emb,
        tp=tp,
        dp=dp,
        pp=pp,
    )


def world_grid(tp: int, pp: int = 1, v_shape: bool = False) -> Grid:
    """The grid over MPI.COMM_WORLD; a single process run without mpiexec never calls MPI. v_shape: the pipeline's
    chunks in a V (StagePlan.v_shape)."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1 and tp == 1 and pp == 1:
        return single_process_grid()
    return make_grid(MPI.COMM_WORLD, tp, pp, v_shape)
