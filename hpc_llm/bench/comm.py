"""Collective benchmark: our `Comm` wrappers swept over message sizes, reported as nccl-tests reports them.

    mpiexec -n 2 hpc-llm bench comm                                  # world, 1 KiB .. 256 MiB in steps of 4x
    mpiexec -n 4 hpc-llm bench comm --tp 2 --comms world,tp,dp --sizes 1K..16M --json bench.json

What is measured: for each communicator (the world, or the tp / dp groups of a grid made by `make_grid`), each
collective and each size S (bytes of float32), K timed iterations after a warm-up:

    allreduce       Comm.allreduce_(buf)                   plain: comm.Allreduce(MPI.IN_PLACE, buf)
    iallreduce      Comm.iallreduce_(buf).wait()           plain: comm.Iallreduce(MPI.IN_PLACE, buf).Wait()
    allgather       Comm.allgather_(buf, counts)           plain: comm.Allgatherv(MPI.IN_PLACE, [buf, (counts, displs)])
    reduce_scatter  Comm.ireduce_scatter_(buf, counts)     plain: comm.Ireduce_scatter(buf, recv, counts).Wait()
                    .wait()
    allreduce_bf16  compression.Reduce16(buf, bf16).wait() plain: comm.Allreduce(MPI.IN_PLACE, buf) (fp32, the
    allreduce_fp16  (the same with fp16)                          reduction it replaces)

The 16-bit reductions (parallel.grad_comm = bf16/fp16 without ZeRO-1: the buffer rounded to 16 bits, an alltoallv of
the pieces, fp32 sums, an allgatherv of the rounded sums) reduce the same S/4 float32 values, but their S, the bytes
actually sent, is the 16-bit buffer's: S/2 (the `bytes` column; `fp32_bytes` in --json keeps the float32 size); busbw
is counted as an allreduce's, algbw * 2(n-1)/n, of those bytes. Their ours/plain is the time against the fp32
Allreduce of the same values: below 1, the 16-bit reduction is faster than the uncompressed one.

`buf` is the full S-byte buffer in every case; for allgather and reduce-scatter each rank's piece is S/n, so S is the
total size as nccl-tests counts it (`count per rank * sizeof(float) * n`). Comm has no blocking reduce-scatter, so
reduce-scatter is its nonblocking form, started and waited at once.

Timing: a barrier over the world before each timed iteration, each rank times its own call, the iteration's time is
the max over all world ranks (all groups of a kind run at once, as in training), and the reported time is the median
over the K iterations. Our call and the plain mpi4py call alternate iteration by iteration on the same buffer, so drift
in the machine's load hits both alike. Bandwidths follow nccl-tests (doc/PERFORMANCE.md), in GB/s = 1e9 B/s:

    algbw = S / t
    busbw = algbw * 2(n-1)/n   (allreduce)         busbw = algbw * (n-1)/n   (allgather, reduce-scatter)

This module calls mpi4py directly only for the plain baseline (and to reach COMM_WORLD); everything else, barriers and
the max over ranks included, goes through `Comm`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

from hpc_llm.errors import UserError
from hpc_llm.parallel.compression import Reduce16, comm_dtype
from hpc_llm.parallel.grid import make_grid
from hpc_llm.runtime.fsio import atomic_write_bytes

REDUCE16 = ("allreduce_bf16", "allreduce_fp16")
COLLECTIVES = ("allreduce", "iallreduce", "allgather", "reduce_scatter", *REDUCE16)
COMMS = ("world", "tp", "dp")
# the size at which the wrapper is held to the plain call (within FLOOR_TOLERANCE)
FLOOR_BYTES = 64 << 20
FLOOR_TOLERANCE = 1.05
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


# -- arithmetic (nccl-tests' definitions) ------------------------------------------------------------------------------


def bus_factor(collective: str, n: int) -> float:
    """busbw / algbw for a collective over n ranks (nccl-tests' PERFORMANCE.md)."""
    if collective in ("allreduce", "iallreduce") + REDUCE16:
        return 2.0 * (n - 1) / n
    if collective in ("allgather", "reduce_scatter"):
        return (n - 1) / n
    raise ValueError(f"unknown collective {collective!r}")


def bandwidths(nbytes: int, seconds: float, collective: str, n: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 bytes/s) for `nbytes` (the full buffer; per-rank size * n for allgather and
    reduce-scatter) moved in `seconds`."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * bus_factor(collective, n)


def parse_size(text: str) -> int:
    """'1K' -> 1024, '64M' -> 67108864, '4096' -> 4096 (binary units: K = KiB)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    if not m:
        raise UserError(f"--sizes: cannot read {text!r} as a size (e.g. 4096, 1K, 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_sizes(spec: str, factor: int = 4) -> list[int]:
    """'1K..256M' -> 1K, 1K*factor, ... up to 256M; '1K,64M' -> exactly those. Sizes are bytes of float32."""
    if factor < 2:
        raise UserError(f"--factor: expected an integer >= 2, got {factor}")
    if ".." in spec:
        lo, hi = (parse_size(s) for s in spec.split("..", 1))
        if lo > hi:
            raise UserError(f"--sizes: {spec!r} runs backwards")
        sizes, s = [], lo
        while s <= hi:
            sizes.append(s)
            s *= factor
    else:
        sizes = [parse_size(s) for s in spec.split(",") if s.strip()]
    if not sizes:
        raise UserError(f"--sizes: {spec!r} names no size")
    for s in sizes:
        if s < 4 or s % 4:
            raise UserError(f"--sizes: {s} bytes is not a whole number of float32 values")
    return sizes


def human(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


# -- measurement -------------------------------------------------------------------------------------------------------


def _calls(comm, collective: str, buf: np.ndarray, counts: list[int]):
    """(ours, plain): two zero-argument callables doing the collective through Comm and through bare mpi4py."""
    # here, not at the top: importing mpi4py.MPI initialises MPI (the CLI imports this module)
    from mpi4py import MPI

    raw = comm.mpi
    if collective in REDUCE16:
        # as GradientSync: the allgathers apart
        low, gather = (comm_dtype(collective[-4:]), comm.dup(comm.name))
        counts = [len(buf) // comm.size + (r < len(buf) % comm.size) for r in range(comm.size)]
        return (
            lambda: Reduce16(comm, buf, counts, low, False, collective, gather).wait(),
            lambda: raw.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
        )
    if collective == "allreduce":
        return (lambda: comm.allreduce_(buf), lambda: raw.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
    if collective == "iallreduce":
        return (
            lambda: comm.iallreduce_(buf).wait(),
            lambda: raw.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM).Wait(),
        )
    displs = [int(d) for d in np.concatenate([[0], np.cumsum(counts)[:-1]])]
    if collective == "allgather":
        return (
            lambda: comm.allgather_(buf, counts),
            lambda: raw.Allgatherv(MPI.IN_PLACE, [buf, (counts, displs)]),
        )
    if collective == "reduce_scatter":
        recv = np.empty(counts[comm.rank], dtype=buf.dtype)
        return (
            lambda: comm.ireduce_scatter_(buf, counts).wait(),
            lambda: raw.Ireduce_scatter(buf, recv, counts, op=MPI.SUM).Wait(),
        )
    raise ValueError(f"unknown collective {collective!r}")


def time_pair(world, ours, plain, iters: int, warmup: int) -> np.ndarray:
    """(2, iters) seconds: row 0 ours, row 1 plain; each iteration's time is the max over the world's ranks.

    Every timed call follows a world barrier; ours and plain alternate, iteration by iteration."""
    for _ in range(warmup):
        ours()
        plain()
    t = np.zeros((2, iters))
    for i in range(iters):
        for j, fn in enumerate((ours, plain)):
            world.barrier()
            t0 = time.perf_counter()
            fn()
            t[j, i] = time.perf_counter() - t0
    world.allreduce_(t, op="max")  # through our wrapper; outside the timed region
    return t


def measure(world, comm, collective: str, nbytes: int, iters: int, warmup: int) -> dict | None:
    """One row: `collective` on `comm` with an nbytes float32 buffer (None where a rank's piece would be empty)."""
    n = comm.size
    count = nbytes // 4
    if collective in ("allgather", "reduce_scatter"):
        per_rank = count // n
        if per_rank == 0:
            return None
        counts = [per_rank] * n
        count = per_rank * n  # what nccl-tests does too: the total is per-rank count * n
    else:
        counts = []
    buf = np.empty(count, dtype=np.float32)
    buf.fill(0.0)  # touch every page before timing; zeros stay finite under repeated sums
    ours, plain = _calls(comm, collective, buf, counts)
    t = time_pair(world, ours, plain, iters, warmup)
    med, med_plain = float(np.median(t[0])), float(np.median(t[1]))
    size = count * (2 if collective in REDUCE16 else 4)  # the bytes actually sent
    algbw, busbw = bandwidths(size, med, collective, n)
    palgbw, pbusbw = bandwidths(count * 4, med_plain, collective, n)  # plain: the float32 buffer
    return {
        "comm": comm.name,
        "n": n,
        "groups": world.size // n,
        "collective": collective,
        "bytes": size,
        "fp32_bytes": count * 4,
        "count": count,
        "time_us": med * 1e6,
        "algbw": algbw,
        "busbw": busbw,
        "plain_time_us": med_plain * 1e6,
        "plain_algbw": palgbw,
        "plain_busbw": pbusbw,
        "ratio": med / med_plain,
        "iters": iters,
        "time_us_all": [x * 1e6 for x in t[0]],
        "plain_time_us_all": [x * 1e6 for x in t[1]],
    }


# -- the run -----------------------------------------------------------------------------------------------------------

_REDUCE16_LABEL = "16-bit reduction (alltoallv, fp32 sums, allgatherv)"
# collective -> (our call, the plain mpi4py call it is timed against), for the headings
_LABELS = {
    "allreduce": ("Comm.allreduce_", "Allreduce(IN_PLACE)"),
    "iallreduce": ("Comm.iallreduce_ + wait", "Iallreduce(IN_PLACE).Wait()"),
    "allgather": ("Comm.allgather_", "Allgatherv(IN_PLACE)"),
    "reduce_scatter": ("Comm.ireduce_scatter_ + wait", "Ireduce_scatter().Wait()"),
    "allreduce_bf16": (f"{_REDUCE16_LABEL} in bf16", "fp32 Allreduce(IN_PLACE)"),
    "allreduce_fp16": (f"{_REDUCE16_LABEL} in fp16", "fp32 Allreduce(IN_PLACE)"),
}
_HEAD = (
    f"{'size':>10} {'bytes':>11} {'count':>10} {'time(us)':>11} {'algbw(GB/s)':>11} {'busbw(GB/s)':>11}"
    f" {'plain(us)':>11} {'plain busbw':>11} {'ours/plain':>10}"
)


def _row_line(r: dict) -> str:
    return (
        f"{human(r['bytes']):>10} {r['bytes']:>11} {r['count']:>10} {r['time_us']:>11.1f} {r['algbw']:>11.3f}"
        f" {r['busbw']:>11.3f} {r['plain_time_us']:>11.1f} {r['plain_busbw']:>11.3f} {r['ratio']:>10.3f}"
    )


def environment(world_size: int) -> dict:
    import mpi4py
    from mpi4py import MPI

    cores = os.cpu_count() or 1
    return {
        "host": platform.node(),
        "cores": cores,
        "world_size": world_size,
        "oversubscribed": world_size > cores,
        "mpi": MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0],
        "mpi4py": mpi4py.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def _check(iters: int, warmup: int, comms, collectives) -> None:
    if iters < 1 or warmup < 0:
        raise UserError(f"--iters must be >= 1 and --warmup >= 0 (got {iters}, {warmup})")
    bad = [c for c in comms if c not in COMMS]
    if bad:
        raise UserError(
            f"--comms: unknown communicator(s) {', '.join(bad)}; choose from {', '.join(COMMS)}"
        )
    bad = [c for c in collectives if c not in COLLECTIVES]
    if bad:
        raise UserError(
            f"--collectives: unknown {', '.join(bad)}; choose from {', '.join(COLLECTIVES)}"
        )


def _say_header(say, grid, env: dict, iters: int, warmup: int) -> None:
    say(
        f"# hpc-llm bench comm: {grid.describe()}; {env['mpi'].split(',')[0]}; "
        f"mpi4py {env['mpi4py']}, numpy {env['numpy']}; "
        f"{env['cores']} cores{' (OVERSUBSCRIBED)' if env['oversubscribed'] else ''}"
    )
    say(
        f"# float32; {iters} timed iterations after {warmup} warm-up, world barrier before each; time = median over "
        f"iterations of the max over ranks; algbw = bytes/time, busbw = algbw*2(n-1)/n (allreduce), "
        f"*(n-1)/n (allgather, reduce-scatter); GB/s = 1e9 B/s; ours/plain = time ratio to bare mpi4py"
    )


def _sweep(say, grid, result: dict, comms, collectives, sizes, iters: int, warmup: int) -> None:
    """Every (communicator, collective, size) row into result["rows"]; size-1 communicators into "skipped"."""
    by_name = {"world": grid.world, "tp": grid.tp_comm, "dp": grid.dp_comm}
    for name in comms:
        comm = by_name[name]
        if comm.size == 1:
            note = (
                f"{name}: a size-1 communicator with --tp {result['tp']} on {grid.world.size} ranks; "
                f"skipped (no MPI call to time)"
            )
            result["skipped"].append(note)
            say(f"\n# {note}")
            continue
        for collective in collectives:
            say(
                f"\n# {name} (n={comm.size}, {grid.world.size // comm.size} group(s) at once) {collective}: "
                f"{_LABELS[collective][0]} vs plain {_LABELS[collective][1]}"
            )
            say(_HEAD)
            for nbytes in sizes:
                row = measure(grid.world, comm, collective, nbytes, iters, warmup)
                if row is None:
                    say(f"{human(nbytes):>10}  (less than one float32 per rank; skipped)")
                    continue
                result["rows"].append(row)
                say(_row_line(row))


def _floor(say, rows: list[dict]) -> list[dict] | None:
    """The wrapper held to the plain call: the allreduce rows at the size nearest FLOOR_BYTES."""
    floor = [r for r in rows if r["collective"] == "allreduce"]
    if not floor:
        return None
    at = min(floor, key=lambda r: (abs(np.log2(r["bytes"] / FLOOR_BYTES)), -r["bytes"]))["bytes"]
    say(f"\n# floor: Comm.allreduce_ vs plain comm.Allreduce(MPI.IN_PLACE, buf) at {human(at)}")
    out = []
    for r in floor:
        if r["bytes"] != at:
            continue
        ok = r["ratio"] <= FLOOR_TOLERANCE
        out.append(
            {
                "comm": r["comm"],
                "bytes": at,
                "ours_us": r["time_us"],
                "plain_us": r["plain_time_us"],
                "ours_busbw": r["busbw"],
                "plain_busbw": r["plain_busbw"],
                "ratio": r["ratio"],
                "ok": ok,
            }
        )
        slower = f"WRAPPER SLOWER THAN PLAIN BY MORE THAN {100 * (FLOOR_TOLERANCE - 1):.0f}%"
        say(
            f"#   {r['comm']:>5} n={r['n']}: ours {r['time_us']:.1f} us ({r['busbw']:.3f} GB/s busbw), plain "
            f"{r['plain_time_us']:.1f} us ({r['plain_busbw']:.3f} GB/s), ours/plain {r['ratio']:.3f}: "
            f"{'within 5%' if ok else slower}"
        )
    return out


def run(
    mpi_comm=None,
    *,
    sizes: list[int],
    iters: int = 20,
    warmup: int = 3,
    comms=("world",),
    tp: int = 1,
    collectives=COLLECTIVES,
    json_path: str | None = None,
    out=None,
) -> dict:
    """Run the sweep on every rank of `mpi_comm` (default COMM_WORLD); rank 0 prints and writes --json.

    Returns {"env": ..., "rows": [...], "skipped": [...], "floor": ...} on every rank (the same rows everywhere:
    the per-iteration times are max-reduced over the world)."""
    if mpi_comm is None:
        from mpi4py import MPI

        mpi_comm = MPI.COMM_WORLD
    _check(iters, warmup, comms, collectives)
    size = mpi_comm.Get_size()
    rank0 = mpi_comm.Get_rank() == 0

    def say(text: str = "") -> None:
        if rank0:
            print(text, file=out or sys.stdout, flush=True)

    env = environment(size)
    result = {"env": env, "iters": iters, "warmup": warmup, "tp": tp}
    result.update(rows=[], skipped=[], floor=None)
    if size == 1:
        say(
            "bench comm: only 1 MPI rank, so there is no collective to measure (a size-1 Comm skips MPI). "
            "Run it under mpiexec, e.g. `mpiexec -n 2 hpc-llm bench comm`."
        )
        return result
    grid = make_grid(mpi_comm, tp)
    _say_header(say, grid, env, iters, warmup)
    _sweep(say, grid, result, comms, collectives, sizes, iters, warmup)
    result["floor"] = _floor(say, result["rows"])
    for note in result["skipped"]:
        say(f"# note: {note}")
    if json_path and rank0:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(result, indent=1) + "\n").encode())
        say(f"# wrote {path}")
    return result


# -- command line (`hpc-llm bench comm`) ------------------------------------------------------------------------------


# (flag, type, default, help) of `hpc-llm bench comm`'s options
_OPTIONS = (
    (
        "--sizes",
        str,
        "1K..256M",
        "LO..HI (stepping by --factor) or a comma list; bytes with K/M/G = KiB/MiB/GiB",
    ),
    ("--factor", int, 4, "step between sizes in a LO..HI range"),
    ("--iters", int, 20, "timed iterations per size"),
    ("--warmup", int, 3, "untimed iterations per size first"),
    ("--comms", str, "world", "comma list of world,tp,dp"),
    ("--tp", int, 1, "tensor-parallel size of the grid that gives tp and dp comms"),
    ("--collectives", str, ",".join(COLLECTIVES), f"comma list of {','.join(COLLECTIVES)}"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    for flag, type_, default, text in _OPTIONS:
        p.add_argument(flag, type=type_, default=default, help=f"{text} (default {default})")
    p.add_argument(
        "--json", metavar="PATH", help="write the rows (and environment) as JSON (rank 0)"
    )


def run_from_args(args: argparse.Namespace) -> dict:
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    return run(
        sizes=parse_sizes(args.sizes, args.factor),
        iters=args.iters,
        warmup=args.warmup,
        comms=split(args.comms),
        tp=args.tp,
        collectives=split(args.collectives),
        json_path=args.json,
    )
