"""Parallel HDF5 (h5py's "mpio" driver): the environment the checkpoint writer's mpio path needs, and that path.

These tests run only where h5py is built with MPI: scripts/test_mpio.sh runs this file in `.venv-mpio` (Debian's
python3-h5py-mpi, python3-mpi4py and Open MPI, never the PyPI wheels) as
`/usr/bin/mpiexec -n N python -m pytest tests/checkpoint/test_checkpoint_mpio.py -m "parallel[N]"` for N = 1, 2, 4
(mpi-pytest's "outer mpiexec" mode: its forking mode does not work with Open MPI 4.1, whose singleton start leaves
OMPI_MCA_ess and PMIX_* in the parent's environment and the nested mpiexec then fails). scripts/test.sh's pytest run in
`.venv` (PyPI's h5py, no MPI) leaves this file out (--ignore); run there by hand, the module is skipped with its reason.
Debian's h5py loads its MPI build only when OMPI_COMM_WORLD_SIZE (set by mpiexec) or H5PY_ALWAYS_USE_MPI is set, so
outside mpiexec it is skipped there too.
With HPC_LLM_REQUIRE_MPIO=1 (scripts/test_mpio.sh sets it) a missing MPI build is an error, not a skip.

Every assertion on the ranks goes through `check` (mpi-pytest's parallel_assert), so all ranks agree on the verdict.
Under mpio, File(), create_dataset and attribute writes are collective: every rank makes them in the same order.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

if not h5py.get_config().mpi:
    _why = (
        f"h5py {h5py.__version__} has no MPI (h5py.get_config().mpi is false): the parallel-HDF5 tests run in "
        "scripts/test_mpio.sh (Debian's MPI-enabled h5py, under /usr/bin/mpiexec)"
    )
    if os.environ.get("HPC_LLM_REQUIRE_MPIO"):
        raise RuntimeError(
            f"HPC_LLM_REQUIRE_MPIO is set, but {_why}; Debian's h5py imports its MPI build only under "
            "mpiexec (OMPI_COMM_WORLD_SIZE) or with H5PY_ALWAYS_USE_MPI=1"
        )
    pytest.skip(_why, allow_module_level=True)

from helpers import (  # noqa: E402
    SAVE_SLACK,
    check,
    full_flat,
    layout_trainer,
    save_failure_problems,
    tiny_config,
)
from mpi4py import MPI  # noqa: E402  (after the skip: an MPI-less h5py need not start MPI)

SIZES = [1, 2, 4]


def mapped_libraries(fragment: str) -> set[str]:
    """Paths of the shared libraries mapped into this process whose file name contains `fragment`."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/" in line}
    return {p for p in paths if fragment in os.path.basename(p)}


@pytest.mark.parallel(nprocs=SIZES)
def test_h5py_has_mpi_and_one_mpi_library():
    """Under mpiexec -n N: h5py's MPI build is the one imported, on every rank; the world has N ranks; one libmpi is
    mapped (the Debian and PyPI Open MPI builds both ship libmpi.so.40, so the name alone proves nothing) and every
    rank reports the same MPI library version."""
    comm = MPI.COMM_WORLD
    bad = []
    if not h5py.get_config().mpi:
        bad.append(f"h5py {h5py.__version__}: get_config().mpi is false")
    libmpi = mapped_libraries("libmpi.so")
    if len(libmpi) != 1:
        bad.append(f"mapped MPI libraries: {sorted(libmpi)} (expected exactly one)")
    versions = comm.allgather(MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0])
    if len(set(versions)) != 1:
        bad.append(f"ranks report different MPI libraries: {versions}")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=SIZES)
def test_collective_write_of_one_dataset_reads_back_in_serial(shared_tmp_path):
    """Every rank writes its own slab of rows (rank r: r + 1 rows, so the offsets are uneven) of one float64 dataset
    with one collective write; after close, each rank opens the file with the default (serial) driver and reads the
    whole array back: it equals the array every rank can compute.

    Each rank's slab is non-empty on purpose: h5py 3.7's Dataset.__setitem__ returns early on an empty selection, so
    a rank with nothing to write never enters a collective write and the others wait in it for ever."""
    comm = MPI.COMM_WORLD
    rank, size = comm.rank, comm.size
    rows = [r + 1 for r in range(size)]
    lo = sum(rows[:rank])
    hi = lo + rows[rank]
    cols = 5
    want = np.arange(sum(rows) * cols, dtype=np.float64).reshape(-1, cols) * 0.5
    path = shared_tmp_path / "slabs.h5"
    with h5py.File(path, "w", driver="mpio", comm=comm) as f:
        dset = f.create_dataset("x", shape=want.shape, dtype=want.dtype)  # collective
        dset.attrs["ranks"] = np.int64(size)  # collective: the same value on every rank
        with dset.collective:
            dset[lo:hi] = want[lo:hi]
    comm.Barrier()  # every rank's file handle is closed before anyone reads
    with h5py.File(path, "r") as f:
        driver, got, ranks_attr = f.driver, f["x"][...], int(f["x"].attrs["ranks"])
    bad = []
    if driver == "mpio":
        bad.append("the read-back was meant to use the serial driver")
    if got.shape != want.shape:
        bad.append(f"read back shape {got.shape}, wrote {want.shape}")
    elif not np.array_equal(got, want):
        bad.append(
            f"read back differs from the written array in rows {np.unique(np.nonzero(got != want)[0])[:10]}"
        )
    if ranks_attr != size:
        bad.append(f"attribute ranks = {ranks_attr}, expected {size}")
    check(not bad, "\n".join(bad))


def file_contents(path) -> dict:
    """Every attribute and dataset of an HDF5 file, as {"/name@attr" or "/name": value}."""
    out = {}

    def visit(name, obj):
        for key, value in obj.attrs.items():
            out[f"/{name}@{key}"] = value
        if isinstance(obj, h5py.Dataset):
            out[f"/{name}"] = obj[()]

    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            out[f"/@{key}"] = value
        f.visititems(visit)
    return out


# measured: differ run to run
TIMINGS = {f"/metrics/train/{c}" for c in ("tokens_per_s", "mfu", "comm_seconds")}


def mpio_and_gather_files_problems(data_dir, out_dir, grid_args, **overrides) -> list[str]:
    """The same 3-step run (tiny_config with `overrides`, on make_grid(COMM_WORLD, *grid_args)) saved by the mpio
    writer and by the gather writer: what is wrong on this rank with the outcome (rank 0 compares the files: the
    same datasets bitwise, the same checksums and attributes, except the creation time, the config's out_dir and
    writer, and the metrics that are timings; the mpio file verifies, and loads in one process bitwise equal to the
    trained parameters)."""
    import json

    import hpc_llm
    from hpc_llm.checkpoint import verify_checkpoint
    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    comm = MPI.COMM_WORLD
    runs = {}
    for writer in ("mpio", "gather"):
        cfg = tiny_config(
            data_dir,
            out_dir / writer,
            **{"train.max_iters": 3, "train.eval_iters": 0, "checkpoint.writer": writer},
            **overrides,
        )
        tr = Trainer(cfg, grid=make_grid(comm, *grid_args))
        runs[writer] = (tr, tr.run())
    bad = []
    for writer, (tr, summary) in runs.items():
        if tr.writer != writer or summary["step"] != 3:
            bad.append(f"{writer}: writer {tr.writer}, step {summary['step']}")
    tr, summary = runs["mpio"]
    # TP, ZeRO-3's DP and the stages' collectives: on every rank
    full = tr.model.full_tensors(full_flat(tr))
    if comm.rank != 0:
        return bad
    verify_checkpoint(summary["checkpoint"])
    a, b = file_contents(summary["checkpoint"]), file_contents(runs["gather"][1]["checkpoint"])
    if sorted(a) != sorted(b):
        bad.append(f"different objects: {sorted(set(a) ^ set(b))[:6]}")
    for key in sorted(set(a) & set(b)):
        if key in ("/@created", "/@config_json", "/config@config_json") or (
            key.split("@")[0] in TIMINGS
        ):
            continue
        if not np.array_equal(np.asarray(a[key]), np.asarray(b[key])):
            bad.append(f"{key} differs")
    ca, cb = json.loads(a["/@config_json"]), json.loads(b["/@config_json"])
    for c in (ca, cb):
        del c["train"]["out_dir"], c["checkpoint"]["writer"]
    if ca != cb:
        bad.append("the configs differ beyond out_dir and writer")
    model = hpc_llm.load_model(summary["checkpoint"])
    bad += [
        f"loaded {n} differs from the trained parameters"
        for n, p in full.items()
        if not np.array_equal(model.params[n], p)
    ]
    return bad


@pytest.mark.parallel(nprocs=SIZES)
@pytest.mark.parametrize(
    ("message_elems", "zero"),
    [(None, 1), (100, 1), (100, 3)],
    ids=["default-blocks", "100-element-blocks", "100-element-blocks-zero3"],
)
def test_mpio_writer_writes_the_gather_writers_file(
    message_elems, zero, data_dir, shared_tmp_path, monkeypatch
):
    """mpio_and_gather_files_problems at dp x tp = 1, 2x1 ZeRO-1 or ZeRO-3, 2x2 ZeRO-1 or ZeRO-3 with sequence
    parallelism (on 1, 2, 4 ranks); also with every block (so every message and every write) cut to 100
    elements."""
    from hpc_llm.checkpoint import slabs

    if message_elems:
        monkeypatch.setattr(slabs, "MESSAGE_ELEMS", message_elems)
    tp = 2 if MPI.COMM_WORLD.size == 4 else 1
    overrides = {
        "model.n_head": 4,
        "model.dropout": 0.1,
        "parallel.tp": tp,
        "parallel.zero": zero if MPI.COMM_WORLD.size // tp > 1 else 0,
        "parallel.sequence_parallel": tp > 1 and zero == 3,
    }
    bad = mpio_and_gather_files_problems(data_dir, shared_tmp_path, (tp,), **overrides)
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=[4])
@pytest.mark.parametrize(
    ("tp", "zero"), [(1, 1), (1, 3), (2, 0)], ids=["PP2xDP2-zero1", "PP2xDP2-zero3", "PP2xTP2"]
)
def test_mpio_writer_writes_the_gather_writers_file_across_stages(
    tp, zero, data_dir, shared_tmp_path, monkeypatch
):
    """mpio_and_gather_files_problems with two pipeline stages (2x2 with data parallelism, ZeRO-1 or ZeRO-3, or with
    tensor parallelism; the embedding tied across the first and last stage), blocks cut to 100 elements: every rank
    of every stage creates every dataset and writes its share of the one file."""
    from hpc_llm.checkpoint import slabs

    monkeypatch.setattr(slabs, "MESSAGE_ELEMS", 100)
    overrides = {
        "model.n_head": 4,
        "parallel.tp": tp,
        "parallel.pp": 2,
        "parallel.zero": zero,
    }
    bad = mpio_and_gather_files_problems(data_dir, shared_tmp_path, (tp, 2), **overrides)
    check(not bad, "\n".join(bad))


# -- the mpio writer's failures and memory (tests/checkpoint/test_checkpoint_parallel.py has the gather writer's) ------


@pytest.mark.parallel(nprocs=[2])
@pytest.mark.parametrize("rank", [0, 1])
def test_enospc_on_one_rank_fails_the_mpio_save_on_every_rank(
    rank, data_dir, shared_tmp_path, monkeypatch
):
    """ENOSPC injected on rank 0 or 1 as its part of the collective step-4 save starts (the file open on every
    rank): every rank raises the same SaveFailed naming that rank, the file and the error, after the ranks closed
    the file together; no temporary file is left and the step-2 checkpoint still verifies and is the newest."""
    monkeypatch.setenv("HPC_LLM_FAULT", f"enospc:save:{rank}:4")
    tr = layout_trainer(
        data_dir,
        shared_tmp_path / "run",
        "DP2-zero1",
        **{"train.max_iters": 4, "checkpoint.interval": 2, "checkpoint.writer": "mpio"},
    )
    bad = [] if tr.writer == "mpio" else [f"writer {tr.writer}"]
    bad += save_failure_problems(tr, rank)
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=[2])
def test_an_mpio_save_needs_its_own_shard_plus_a_fixed_buffer(
    data_dir, shared_tmp_path, monkeypatch
):
    """As tests/checkpoint/test_checkpoint_parallel.py's test of the gather writer, with every rank writing its
    share."""
    import tracemalloc

    from hpc_llm.checkpoint import format as fmt
    from hpc_llm.checkpoint import slabs, writers

    monkeypatch.setattr(slabs, "MESSAGE_ELEMS", 4096)
    monkeypatch.setattr(fmt, "VERIFY_BLOCK_BYTES", 64 << 10)
    peaks = {}
    for n_embd in (64, 256):
        tr = layout_trainer(
            data_dir,
            shared_tmp_path / f"run{n_embd}",
            "DP2-zero1",
            **{
                "train.max_iters": 1,
                "model.n_embd": n_embd,
                "parallel.bucket_mb": 1.0,
                "checkpoint.writer": "mpio",
            },
        )
        tr.run()
        tr.out_dir = shared_tmp_path / f"measured{n_embd}"
        if MPI.COMM_WORLD.rank == 0:
            tr.out_dir.mkdir()
        MPI.COMM_WORLD.Barrier()
        tracemalloc.start()
        try:
            tr.save()
            peaks[n_embd] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    shard = tr.model.flat.nbytes + tr.opt.m.nbytes + tr.opt.v.nbytes
    buffers = (2 + writers.SEND_WINDOW) * 4096 * 8 + 2 * (64 << 10)
    peak = peaks[256]
    ok = (
        tr.writer == "mpio"
        and peak <= buffers + SAVE_SLACK
        and peak < shard / 10
        and peak - peaks[64] < 128 << 10
    )
    check(
        ok,
        f"writer {tr.writer}: peak {peak / 2**10:.0f} KiB during the save (n_embd 64: {peaks[64] / 2**10:.0f} "
        f"KiB; buffers {buffers / 2**10:.0f} KiB + slack {SAVE_SLACK / 2**10:.0f} KiB); shard "
        f"{shard / 2**10:.0f} KiB",
    )
