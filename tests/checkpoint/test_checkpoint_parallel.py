"""Checkpoint saves and resumes across ranks (the gather writer; tests/checkpoint/test_checkpoint_mpio.py has the mpio
ones): slabs of at most slabs.MESSAGE_ELEMS elements per message, the memory a save needs on a rank, a save that
fails on one rank failing on every rank, and --resume auto falling back past a corrupt newest checkpoint, each rank
reading its own hyperslabs and checksumming only its share of the file.

Every assertion on the ranks goes through `check` (mpi-pytest's parallel_assert), so all ranks agree on the verdict.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import shutil
import threading
import tracemalloc

import h5py
import numpy as np
import pytest
from helpers import (
    CHECKPOINT_LAYOUTS,
    SAVE_SLACK,
    check,
    count_reads,
    flip_byte_in,
    full_flat,
    hyperslab_checks,
    layout_trainer,
    save_failure_problems,
)
from mpi4py import MPI

from hpc_llm import checkpoint as ckpt
from hpc_llm.checkpoint import format as fmt
from hpc_llm.checkpoint import slabs, writers
from hpc_llm.errors import UserError
from hpc_llm.parallel.comm import Comm
from hpc_llm.plan.memory import Bytes, Layout, rank_memory
from hpc_llm.train.trainer import Trainer


def layout_params(names):
    return [
        pytest.param(n, marks=pytest.mark.parallel(nprocs=CHECKPOINT_LAYOUTS[n][0]), id=n)
        for n in names
    ]


def tensors_of(path) -> dict:
    """Every dataset of a checkpoint with its crc32 attribute."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                out.__setitem__(name, (obj[()], int(obj.attrs["crc32"])))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    return out


@contextlib.contextmanager
def count_messages():
    """Elements of every message Comm.isend sends with kind "save"."""
    sizes = []
    original = Comm.isend

    def counting(self, buf, dest, tag, kind):
        if kind == "save":
            sizes.append(int(np.asarray(buf).size))
        return original(self, buf, dest, tag, kind)

    Comm.isend = counting
    try:
        yield sizes
    finally:
        Comm.isend = original


def restored_checks(tr: Trainer, path, data_dir, out_dir, layout) -> list[str]:
    """A new trainer of the same layout restores `path` (each rank its hyperslabs) to tr's parameters, moments and
    step, bitwise: the blocks the writer assembled from every rank's pieces put each element where it belongs."""
    again = layout_trainer(data_dir, out_dir, layout)
    again.restore(path)
    bad = []
    for what, a, b in (
        ("parameters", again.model.flat, tr.model.flat),
        ("Adam m", again.opt.m, tr.opt.m),
        ("Adam v", again.opt.v, tr.opt.v),
    ):
        if not np.array_equal(a, b):
            bad.append(f"restored {what} differ from the saving trainer's")
    if again.step != tr.step or again.opt.t != tr.opt.t:
        bad.append(f"restored step {again.step}, adam t {again.opt.t}; saved {tr.step}, {tr.opt.t}")
    return bad


# the gather writer's layouts; the ZeRO-2/3 and sequence-parallel ones are the parts writer's matrix (below)
SMALL_MESSAGE_LAYOUTS = ["TP2", "DP2-zero1", "PP2", "PP2-interleaved", "DP2xTP2-zero1"]
SMALL_MESSAGE_LAYOUTS += ["PP2xDP2-zero1", "PP2xDP2-zero3"]


@pytest.mark.parametrize("layout", layout_params(SMALL_MESSAGE_LAYOUTS))
def test_small_messages_write_the_same_file(layout, data_dir, shared_tmp_path, monkeypatch):
    """With MESSAGE_ELEMS lowered to 100 every save message carries at most 100 elements (thousands of them) and the
    file is the one the default writes, dataset by dataset and checksum by checksum; it restores bitwise."""
    tr = layout_trainer(data_dir, shared_tmp_path / "run", layout, **{"train.max_iters": 2})
    tr.run()
    default = ckpt.checkpoint_path(tr.out_dir, 2)
    tr.out_dir = shared_tmp_path / "small"
    if MPI.COMM_WORLD.rank == 0:
        tr.out_dir.mkdir()
    MPI.COMM_WORLD.Barrier()
    monkeypatch.setattr(slabs, "MESSAGE_ELEMS", 100)
    with count_messages() as sizes:
        small = tr.save()
    monkeypatch.undo()
    bad = []
    sent = MPI.COMM_WORLD.allgather(sizes)
    if max(max(s, default=0) for s in sent) > 100 or sum(len(s) for s in sent) < 100:
        bad.append(
            f"messages: {sum(len(s) for s in sent)}, the largest {max(max(s, default=0) for s in sent)} "
            "elements (expected many, none over 100)"
        )
    if MPI.COMM_WORLD.rank == 0:
        ckpt.verify_checkpoint(small)
        a, b = tensors_of(small), tensors_of(default)
        if sorted(a) != sorted(b):
            bad.append(f"different datasets: {sorted(set(a) ^ set(b))[:5]}")
        bad += [
            f"{k} differs"
            for k in sorted(set(a) & set(b))
            if a[k][1] != b[k][1] or not np.array_equal(a[k][0], b[k][0], equal_nan=True)
        ]
    bad += restored_checks(tr, small, data_dir, shared_tmp_path / "again", layout)
    check(not bad, "\n".join(bad))


def restored_elsewhere_checks(path, tensors: dict, data_dir, out_dir, layout) -> list[str]:
    """A trainer of another layout on the same ranks restores `path` (each rank its hyperslabs): its parameters,
    gathered to full tensors, are the file's (`tensors`: name -> array, as plain h5py read them), bitwise."""
    again = layout_trainer(data_dir, out_dir, layout)
    again.restore(path)
    got = again.model.full_tensors(full_flat(again))
    return [
        f"restored at {layout}: {name} differs from the file's"
        for name, a in got.items()
        if not np.array_equal(a, tensors[f"params/{name}"][0])
    ]


# saving layout: another layout of as many ranks that restores its file (none: no other of that size, or
# tests/parallel/test_resume_layouts.py resumes it elsewhere already)
PARTS_MATRIX = {
    "DP2xTP2-zero1": None,
    "PP2xDP2-zero1": None,
    "PP2xDP2xTP2-zero1": None,
    "DP2-zero2": "TP2",
    "PP2xDP2-zero3": "DP2xTP2-SP-zero3-kept",
    "DP2xTP2-SP-zero3-kept": "PP2xDP2-zero1",
}


@pytest.mark.parametrize("layout", layout_params(PARTS_MATRIX))
def test_the_parts_writer_writes_the_gather_writers_tensors(
    layout, data_dir, shared_tmp_path, monkeypatch
):
    """Saved by the parts writer (every rank the elements it holds into its own file, a master file of virtual
    datasets) in the foreground, and in the background with MESSAGE_ELEMS at 100 (pieces of every tensor on every
    rank, ZeRO-1's moment ranges cut mid-row), at ZeRO 1, 2 and 3 (with and without resharding after forward),
    with pipeline, tensor and sequence parallelism: plain h5py reads from the master, opened from another
    directory, every tensor and crc32 of the gather writer's file; no tensor data crosses the network; every rank
    wrote a part; it restores bitwise at the saving layout, and at another layout to the same full tensors.
    (tests/parallel/test_resume_layouts.py resumes such files at other layouts and follows the loss curve.)"""
    tr = layout_trainer(data_dir, shared_tmp_path / "run", layout, **{"train.max_iters": 2})
    tr.run()
    default = ckpt.checkpoint_path(tr.out_dir, 2)
    tr.writer = "parts"
    saved = {}
    with count_messages() as sizes:
        for name in ("foreground", "background"):
            tr.out_dir = shared_tmp_path / name
            if MPI.COMM_WORLD.rank == 0:
                tr.out_dir.mkdir()
            MPI.COMM_WORLD.Barrier()
            if name == "foreground":
                saved[name] = tr.save()
                continue
            monkeypatch.setattr(slabs, "MESSAGE_ELEMS", 100)
            saved[name] = tr.save(background=True).finish()
            monkeypatch.undo()
    bad = [f"{len(sizes)} save messages sent"] if sizes else []
    if MPI.COMM_WORLD.rank == 0:
        want = tensors_of(default)
        for name, path in saved.items():
            try:  # an assertion, not an exception: the other ranks go on to the restore
                ckpt.verify_checkpoint(path)
            except UserError as e:
                bad.append(f"{name}: {e}")
            parts = ckpt.rundir.parts_of(path)
            if len(list(parts.iterdir())) != MPI.COMM_WORLD.size:
                bad.append(f"{name}: parts {sorted(p.name for p in parts.iterdir())}")
            with contextlib.chdir(shared_tmp_path.parent):
                got = tensors_of(path)
            if sorted(got) != sorted(want):
                bad.append(f"{name}: different datasets: {sorted(set(got) ^ set(want))[:5]}")
            bad += [
                f"{name}: {k} differs"
                for k in sorted(set(got) & set(want))
                if got[k][1] != want[k][1]
                or not np.array_equal(got[k][0], want[k][0], equal_nan=True)
            ]
    bad += restored_checks(tr, saved["foreground"], data_dir, shared_tmp_path / "again", layout)
    if PARTS_MATRIX[layout]:
        want = MPI.COMM_WORLD.bcast(want if MPI.COMM_WORLD.rank == 0 else None)
        bad += restored_elsewhere_checks(
            saved["foreground"], want, data_dir, shared_tmp_path / "other", PARTS_MATRIX[layout]
        )
    check(not bad, "\n".join(bad))


def rss_growth(save) -> int:
    """How far this process's resident memory rose above where it stood before ``save()`` (the kernel's peak RSS,
    VmHWM, reset first through /proc/self/clear_refs), in bytes: every allocation, HDF5's and threads' included."""

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    save()
    return status("VmHWM") - before


# what a save's resident memory may grow by besides what it allocates itself: HDF5's caches and a thread's stack
# and malloc arena (measured: under 1 MiB)
RSS_SLACK = 4 << 20


@pytest.mark.parallel(nprocs=2)
def test_a_parts_save_grows_a_rank_by_at_most_its_staging(data_dir, shared_tmp_path, monkeypatch):
    """A parts save (DP2 ZeRO-1, n_embd 256: 10 MB of float32 parameters and moments in all, part verification in
    64 KiB slabs), on every rank, measured twice: the resident set's peak (every byte the process touches) and
    tracemalloc's peak (the Python and NumPy allocations). In the foreground (written from the rank's own buffers)
    within two verification slabs and a fixed slack; in the background within its host staging buffer, the pieces
    it writes (its moments and its half of the parameters: under the shard it holds), plus the same (the resident
    set: 0.8 MB over the staging when measured; a second copy of the share would be 5 MB more). The staging buffer
    is the planner's (plan/memory.py staging_bytes), to the byte."""
    monkeypatch.setattr(fmt, "VERIFY_BLOCK_BYTES", 64 << 10)
    tr = layout_trainer(
        data_dir,
        shared_tmp_path / "run",
        "DP2-zero1",
        **{
            "train.max_iters": 1,
            "model.n_embd": 256,
            "checkpoint.writer": "parts",
            # a few ZeRO-1 ranges per bucket: the save's bookkeeping (a few hundred bytes a piece) stays small
            "parallel.bucket_mb": 1.0,
        },
    )
    tr.run()
    saves = {"foreground": tr.save, "background": lambda: tr.save(background=True).finish()}
    rss, peaks = {}, {}
    for name, save in [*saves.items(), *saves.items()]:
        tr.out_dir = shared_tmp_path / f"{name}{len(rss)}"
        if MPI.COMM_WORLD.rank == 0:
            tr.out_dir.mkdir()
        MPI.COMM_WORLD.Barrier()
        if name not in rss:  # first: the resident set, from a process that never staged a save
            rss[name] = rss_growth(save)
            continue
        tr.staging = ckpt.parts.HostStaging()  # allocated again, as in a first save
        tracemalloc.start()
        try:
            save()
            peaks[name] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    # its moments (ZeRO-1: the half it owns) and about half the parameters (the replicas share their writing)
    moments, params, staging = (
        tr.opt.m.nbytes + tr.opt.v.nbytes,
        tr.model.flat.nbytes,
        tr.staging.buf.nbytes,
    )
    # the part's read-back (two verification slabs) and the slack
    fixed = 2 * (64 << 10) + SAVE_SLACK
    bad = []
    if not (peaks["foreground"] <= fixed and peaks["background"] <= staging + fixed):
        bad.append(f"tracemalloc peaks {peaks}, staging {staging} B, fixed {fixed} B")
    if not (
        rss["foreground"] <= fixed + RSS_SLACK and rss["background"] <= staging + fixed + RSS_SLACK
    ):
        bad.append(
            f"resident set grew by {rss}, staging {staging} B, fixed {fixed} + {RSS_SLACK} B"
        )
    if not (moments + params / 4 <= staging <= moments + 3 * params / 4):
        bad.append(f"staging {staging} B: moments {moments} B, parameters {params} B")
    planned = rank_memory(
        tr.cfg.model,
        Layout.of(tr.cfg, tr.grid.dp),
        tr.grid.pp_rank,
        Bytes.of(4),
        tr.grid.dp_rank,
        writer="parts",
        async_save=True,
    ).checkpoint_scratch
    if planned != staging:
        bad.append(f"the planner's staging {planned} B, the rank's {staging} B")
    check(not bad, "\n".join(bad))


def save_peak(data_dir, out_dir, layout, n_embd: int) -> tuple[int, int]:
    """tracemalloc's peak during a save of a freshly trained model of width n_embd, and this rank's shard (its
    parameters and Adam moments), in bytes."""
    # 1 MiB gradient buckets: the ZeRO-1 layout (a few ranges per bucket, which the save looks up) stays small
    tr = layout_trainer(
        data_dir,
        out_dir / "run",
        layout,
        **{"train.max_iters": 1, "model.n_embd": n_embd, "parallel.bucket_mb": 1.0},
    )
    tr.run()
    tr.out_dir = out_dir / "measured"
    if MPI.COMM_WORLD.rank == 0:
        tr.out_dir.mkdir()
    MPI.COMM_WORLD.Barrier()
    tracemalloc.start()
    try:
        tr.save()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, tr.model.flat.nbytes + tr.opt.m.nbytes + tr.opt.v.nbytes


@pytest.mark.parametrize("layout", layout_params(["TP2", "DP2-zero1"]))
def test_a_save_needs_its_own_shard_plus_a_fixed_buffer(
    layout, data_dir, shared_tmp_path, monkeypatch
):
    """tracemalloc's peak during a save, on every rank (rank 0 the writer), with MESSAGE_ELEMS at 4096 and the
    verification slab at 64 KiB: within the writer's buffers (two staging blocks, SEND_WINDOW sends in flight, two
    verification slabs) plus a fixed slack, a tenth of what the rank holds, and about the same for a model 16 times
    larger (n_embd 64 -> 256: 0.6 -> 10 MB of float32 parameters and moments in all; the difference, under 128 KiB,
    is h5py's caches of selections and objects): nothing in a save grows with the tensors."""
    monkeypatch.setattr(slabs, "MESSAGE_ELEMS", 4096)
    monkeypatch.setattr(fmt, "VERIFY_BLOCK_BYTES", 64 << 10)
    small, _ = save_peak(data_dir, shared_tmp_path / "small", layout, 64)
    peak, shard = save_peak(data_dir, shared_tmp_path / "large", layout, 256)
    buffers = (2 + writers.SEND_WINDOW) * 4096 * 8 + 2 * (64 << 10)
    bad = []
    if not (peak <= buffers + SAVE_SLACK and peak < shard / 10 and peak - small < 128 << 10):
        bad.append(
            f"peak {peak / 2**10:.0f} KiB during the save (n_embd 64: {small / 2**10:.0f} KiB; buffers "
            f"{buffers / 2**10:.0f} KiB + slack {SAVE_SLACK / 2**10:.0f} KiB); this rank's shard "
            f"{shard / 2**10:.0f} KiB"
        )
    check(not bad, "\n".join(bad))


WRITERS = {
    "gather": {"checkpoint.writer": "gather"},
    "parts": {"checkpoint.writer": "parts"},
    "async": {"checkpoint.writer": "parts", "checkpoint.async_save": True},
}
FAILING = [
    pytest.param(writer, rank, marks=pytest.mark.parallel(nprocs=2), id=f"{writer}-rank{rank}")
    for writer, rank in (("gather", 0), ("gather", 1), ("parts", 0), ("async", 1))
]


@pytest.mark.parametrize(("writer", "rank"), FAILING)
def test_enospc_on_one_rank_fails_the_save_on_every_rank(
    writer, rank, data_dir, shared_tmp_path, monkeypatch
):
    """ENOSPC injected as rank 0 (gather: the writer, its temporary file open; parts: the master's writer) or rank 1
    (a sender) starts its part of the step-4 save; in the background (6 steps: the step-4 save is not the final
    one) as rank 1 writes its part, found at a later step boundary: every rank raises the same SaveFailed naming
    that rank, the file and the error; no temporary file or parts are left and the step-2 checkpoint still
    verifies and is the newest."""
    monkeypatch.setenv("HPC_LLM_FAULT", f"enospc:save:{rank}:4")
    tr = layout_trainer(
        data_dir,
        shared_tmp_path / "run",
        "TP2",
        **WRITERS[writer],
        **{"train.max_iters": 6 if writer == "async" else 4, "checkpoint.interval": 2},
    )
    bad = save_failure_problems(tr, rank)
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=2)
def test_a_full_disk_under_the_background_master_fails_the_save_on_every_rank(
    data_dir, shared_tmp_path, monkeypatch
):
    """A background save of step 4 whose parts are written moves on at a step boundary (Trainer.settle_save):
    rank 0's thread writes the master while training would go on, and ENOSPC strikes as it adds the checksums; at
    the next boundary every rank raises the same SaveFailed naming rank 0, the file and the error; nothing of the
    step-4 save is left and the step-2 checkpoint still verifies and is the newest."""
    tr = layout_trainer(
        data_dir,
        shared_tmp_path / "run",
        "TP2",
        **WRITERS["async"],
        **{"train.max_iters": 2, "checkpoint.interval": 2},
    )
    tr.run()  # the step-2 checkpoint (the final save: in the foreground)
    where = []

    def full(*args, **kwargs):
        where.append(threading.current_thread() is threading.main_thread())
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    if MPI.COMM_WORLD.rank == 0:
        monkeypatch.setattr(fmt, "write_trailer", full)

    def step_4_in_the_background():
        tr.step = 4
        tr.checkpoint()
        rounds = 0
        while (
            tr.pending is not None
        ):  # each round waited for, then moved on, as at later step boundaries
            rounds += tr.pending.ready()
            tr.settle_save(wait=False)
        raise AssertionError(f"not failed after {rounds} rounds")

    bad = save_failure_problems(tr, 0, step_4_in_the_background)
    if MPI.COMM_WORLD.rank == 0 and where != [False]:
        bad.append(f"the master's checksums written on the main thread: {where}")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=2)
def test_a_vanished_directory_fails_the_save_on_every_rank(data_dir, shared_tmp_path):
    tr = layout_trainer(data_dir, shared_tmp_path / "run", "DP2-zero1", **{"train.max_iters": 2})
    tr.run()
    if MPI.COMM_WORLD.rank == 0:
        shutil.rmtree(tr.out_dir)
    MPI.COMM_WORLD.Barrier()
    try:
        tr.save()
        error = None
    except ckpt.SaveFailed as e:
        error = str(e)
        import traceback

        traceback.print_exc()
    errors = MPI.COMM_WORLD.allgather(error)
    check(
        error is not None
        and len(set(errors)) == 1
        and "rank 0 failed" in error
        and "does not exist" in error,
        f"errors: {errors}",
    )


@contextlib.contextmanager
def count_checksummed():
    """The datasets this rank checksummed by reading them (its share, less those it had read whole anyway)."""
    names = []
    original = fmt.dataset_crc

    def counting(dset):
        names.append(dset.name)
        return original(dset)

    fmt.dataset_crc = counting
    try:
        yield names
    finally:
        fmt.dataset_crc = original


@pytest.mark.parametrize("layout", layout_params(["TP2", "DP2-zero1"]))
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(
    layout, data_dir, shared_tmp_path, caplog
):
    """Checkpoints at steps 2 and 4, a byte flipped in step 4's c_fc weight: a trainer restoring the run directory
    (what --resume auto does) has its ranks find the mismatch together, logs the file skipped, and restores step 2
    exactly. No rank checksums the whole file: each reads its hyperslabs and checksums only its share (the shares
    are disjoint and cover every dataset of both files)."""
    run_dir = shared_tmp_path / "run"
    layout_trainer(
        data_dir,
        run_dir,
        layout,
        **{"train.max_iters": 4, "checkpoint.interval": 2, "checkpoint.keep_last": 2},
    ).run()
    step_2 = layout_trainer(
        data_dir, shared_tmp_path / "step2", layout, resume=ckpt.checkpoint_path(run_dir, 2)
    )
    if MPI.COMM_WORLD.rank == 0:
        flip_byte_in(ckpt.checkpoint_path(run_dir, 4), "params/h.0.mlp.c_fc.weight", index=5)
    MPI.COMM_WORLD.Barrier()
    tr = layout_trainer(data_dir, shared_tmp_path / "fresh", layout, **{"train.max_iters": 6})
    with (
        count_reads() as read,
        count_checksummed() as summed,
        caplog.at_level("WARNING", logger="hpc_llm"),
    ):
        tr.restore(run_dir)
    bad = []
    if tr.step != 2 or tr.opt.t != 2:
        bad.append(f"restored step {tr.step}, adam t {tr.opt.t}: expected step 2's checkpoint")
    for what, a, b in zip(
        ("parameters", "Adam m", "Adam v"),
        (tr.model.flat, tr.opt.m, tr.opt.v),
        (step_2.model.flat, step_2.opt.m, step_2.opt.v),
    ):
        if not np.array_equal(a, b):
            bad.append(f"{what} differ from step 2's")
    if MPI.COMM_WORLD.rank == 0 and not (
        "ckpt_00000004.h5" in caplog.text and "checksum mismatch" in caplog.text
    ):
        bad.append(f"no line on the skipped file: {caplog.text!r}")
    # both files were read: each rank its hyperslabs of each (twice its shard), and a share of the checksums
    half = collections.Counter({k: v // 2 for k, v in read.items()})
    bad += (
        hyperslab_checks(tr, half)
        if all(v % 2 == 0 for v in read.values())
        else [f"reads {dict(read)}"]
    )
    with h5py.File(ckpt.checkpoint_path(run_dir, 2), "r") as f:
        every = [d.name for d in fmt.datasets(f)]
    everyone = MPI.COMM_WORLD.allgather(summed)
    mine = collections.Counter(summed)
    if len(set(summed)) >= len(every) or any(n > 2 for n in mine.values()):
        bad.append(
            f"this rank checksummed {len(set(summed))} of the {len(every)} datasets by reading them"
        )
    if sum(len(s) for s in everyone) > 2 * len(every):
        bad.append("ranks checksummed some datasets twice")
    check(not bad, "\n".join(bad))
