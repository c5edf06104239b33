"""`hpc-llm bench comm`: nccl-tests' bandwidth arithmetic, size parsing, the single-process note, and a tiny sweep
under mpiexec (fields checked, never timings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hpc_llm.bench.comm import COLLECTIVES, REDUCE16, bandwidths, bus_factor, parse_sizes
from hpc_llm.errors import UserError


def test_bandwidths_by_hand():
    # allreduce, 2 ranks: 64 MiB in 10 ms -> algbw 6.7108864 GB/s; busbw factor 2(n-1)/n = 1
    assert bandwidths(67108864, 0.010, "allreduce", 2) == pytest.approx((6.7108864, 6.7108864))
    # allreduce, 4 ranks: 1 GB in 1 s -> algbw 1; busbw factor 2*3/4 = 1.5
    assert bandwidths(10**9, 1.0, "allreduce", 4) == pytest.approx((1.0, 1.5))
    assert bandwidths(10**9, 1.0, "iallreduce", 4) == pytest.approx((1.0, 1.5))
    # allgather, 4 ranks: total 1 GB (250 MB per rank) in 0.5 s -> algbw 2; busbw factor 3/4 -> 1.5
    assert bandwidths(10**9, 0.5, "allgather", 4) == pytest.approx((2.0, 1.5))
    # reduce-scatter, 8 ranks: total 4 GB in 2 s -> algbw 2; busbw factor 7/8 -> 1.75
    assert bandwidths(4 * 10**9, 2.0, "reduce_scatter", 8) == pytest.approx((2.0, 1.75))
    # 2 ranks: allgather and reduce-scatter move half the buffer per rank
    assert bus_factor("allgather", 2) == bus_factor("reduce_scatter", 2) == 0.5
    assert bus_factor("allreduce", 8) == pytest.approx(1.75)
    with pytest.raises(ValueError):
        bus_factor("alltoall", 2)


def test_parse_sizes():
    assert parse_sizes("1K..256M") == [1024 * 4**k for k in range(10)]
    assert parse_sizes("1K..8K", factor=2) == [1024, 2048, 4096, 8192]
    assert parse_sizes("4096,64M,1G") == [4096, 64 << 20, 1 << 30]
    assert parse_sizes("1KiB..4KB") == [1024, 4096]
    for bad in ("1X", "6", "8K..1K", ""):
        with pytest.raises(UserError):
            parse_sizes(bad)


def test_single_process_prints_a_note_and_exits_0():
    proc = subprocess.run(
        [sys.executable, "-m", "hpc_llm", "bench", "comm", "--sizes", "1K"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "only 1 MPI rank" in proc.stdout and "mpiexec" in proc.stdout


@pytest.mark.parallel(nprocs=2)
def test_tiny_sweep_under_mpi(tmp_path, capsys):
    from mpi4py import MPI

    from hpc_llm.cli import main

    rank = MPI.COMM_WORLD.Get_rank()
    out = tmp_path / "comm.json"  # each rank has its own tmp_path; rank 0 writes
    rc = main(
        [
            "bench",
            "comm",
            "--sizes",
            "1K..16K",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--tp",
            "2",
            "--comms",
            "world,tp,dp",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    if rank != 0:
        assert not out.exists()
        return
    printed = capsys.readouterr().out
    assert (
        "busbw(GB/s)" in printed and "floor" in printed and "dp: a size-1 communicator" in printed
    )
    result = json.loads(out.read_text())
    rows = result["rows"]
    # world and tp (both 2 ranks) x 4 collectives x 3 sizes; dp is size 1 with tp=2 on 2 ranks, so skipped
    assert len(rows) == 2 * len(COLLECTIVES) * 3
    assert {r["comm"] for r in rows} == {"world", "tp"}
    assert len(result["skipped"]) == 1 and result["skipped"][0].startswith("dp")
    for r in rows:
        assert r["n"] == 2 and r["iters"] == 2 and len(r["time_us_all"]) == 2
        assert r["fp32_bytes"] in (1024, 4096, 16384) and r["fp32_bytes"] == 4 * r["count"]
        # the 16-bit reductions send 2 bytes per value (bench_comm.REDUCE16)
        assert r["bytes"] == (2 if r["collective"] in REDUCE16 else 4) * r["count"]
        assert r["time_us"] > 0 and r["plain_time_us"] > 0 and r["ratio"] > 0
        assert r["algbw"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3)  # B/us -> GB/s
        factor = 1.0 if r["collective"] in ("allreduce", "iallreduce") + REDUCE16 else 0.5
        assert r["busbw"] == pytest.approx(r["algbw"] * factor)
        assert r["plain_busbw"] == pytest.approx(r["plain_algbw"] * factor)
        # the plain baseline is the fp32 allreduce of the same values
        if r["collective"] in REDUCE16:
            assert r["plain_algbw"] == pytest.approx(r["fp32_bytes"] / r["plain_time_us"] / 1e3)
    floor = result["floor"]
    assert {f["comm"] for f in floor} == {"world", "tp"} and all(f["bytes"] == 16384 for f in floor)
