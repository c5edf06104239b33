"""Each rank's record of what it is doing, so that the rank whose watchdog fires names the rank that is behind, not
only itself (docs/reliability.md).

A rank counts the MPI waits it enters (comm.py brackets each with the watchdog's enter/leave, which tell this record)
and keeps the one it is in, or the last one it left. The watchdog's thread writes that, with a heartbeat (the wall
time), to `<run directory>/.ranks/rank<R>.json` about once a second (written to a temporary name and renamed, so a
reader never sees half a record). When a wait lasts past the timeout, the firing rank reads its peers' records and
says which one is behind: one whose heartbeat stopped (a process stopped or dead: no thread writes), else the one
outside MPI the longest (stuck in its own work), else the one with the fewest operations (waiting in an earlier
collective). Ranks on several nodes need the run directory on a filesystem they share and clocks in step, as a
cluster's are.

The verbs with no run directory (generate, eval, prepare at several ranks) keep theirs beside their output, or in the
current directory when they write none (records_beside).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

# a heartbeat older than this many of the writer's intervals (and at least STALE_MIN_S) is a rank that no longer runs:
# a live one writes every interval, a second or so late on a loaded machine
STALE_INTERVALS, STALE_MIN_S = 3, 2.0


class RankRecord:
    def __init__(self):
        self.dir: Path | None = None
        self.rank, self.size = 0, 1
        self.seq = 0  # MPI waits entered
        self.op: str | None = None  # the one this rank is in, None outside MPI
        self.last_op: str | None = None
        self.changed = time.time()  # when it entered or left the last one
        # the watchdog's thread writes while the rank's own thread may stop: a write begun before stop() must not put
        # the file back after stop() removed it (a record left behind, its folder with it)
        self._lock = threading.Lock()

    def start(self, directory: Path, rank: int, size: int) -> None:
        """Write this rank's record into `directory` from now on (created by world rank 0 beforehand): the first
        at once, so a rank stopped before the watchdog's next beat still has one."""
        self.dir, self.rank, self.size = Path(directory), rank, size
        self.write("start-up")

    def stop(self) -> None:
        """No more records; this rank's file removed (the run ended normally)."""
        with self._lock:
            path, self.dir = self._path(self.rank), None
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()

    def entered(self, op: str) -> None:
        self.seq += 1
        self.op = self.last_op = op
        self.changed = time.time()

    def left(self) -> None:
        self.op = None
        self.changed = time.time()

    def _path(self, rank: int) -> Path | None:
        return None if self.dir is None else self.dir / f"rank{rank}.json"

    def write(self, phase: str) -> None:
        """The heartbeat: this rank's state now (the watchdog's thread, about once a second)."""
        with self._lock:
            path = self._path(self.rank)
            if path is None:
                return
            state = {
                "rank": self.rank,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "seq": self.seq,
                "op": self.op,
                "last_op": self.last_op,
                "changed": self.changed,
                "phase": phase,
                "beat": time.time(),
            }
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            # a full or vanished directory must not kill the rank: the record is a diagnostic
            with contextlib.suppress(OSError):
                tmp.write_text(json.dumps(state))
                os.replace(tmp, path)

    def peers(self) -> list[dict]:
        out = []
        for r in range(self.size):
            path = self._path(r)
            if r == self.rank or path is None:
                continue
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                out.append({"rank": r, "missing": True})
        return out

    def behind(self, interval: float) -> str | None:
        """Which peer is behind, as a phrase for the watchdog's line (None: no records, or none stands out)."""
        if self.dir is None:
            return None
        now, peers = time.time(), self.peers()
        stale = max(STALE_MIN_S, STALE_INTERVALS * interval)

        def where(p) -> str:
            last = p.get("op") or p.get("last_op") or "no operation yet"
            inside = "in" if p.get("op") else "after"
            return (
                f"{inside} {last} (#{p.get('seq', 0)}, {p.get('phase', '?')}, {p.get('host', '?')})"
            )

        dead = [p for p in peers if not p.get("missing") and now - p["beat"] > stale]
        if dead:
            p = max(dead, key=lambda p: now - p["beat"])
            return (
                f"rank {p['rank']} is behind: no heartbeat for {now - p['beat']:.0f} s (stopped or dead); "
                f"its last one: {where(p)}"
            )
        missing = [p for p in peers if p.get("missing")]
        if missing:
            return f"rank {missing[0]['rank']} is behind: no record of it (it never reached this point)"
        outside = [p for p in peers if not p.get("op")]
        if outside:
            p = min(outside, key=lambda p: p["changed"])
            return f"rank {p['rank']} is behind: outside MPI for {now - p['changed']:.0f} s, {where(p)}"
        if peers:
            p = min(peers, key=lambda p: p["seq"])
            if p["seq"] < self.seq:
                return (
                    f"rank {p['rank']} is behind: waiting {where(p)} (this rank is at #{self.seq})"
                )
        return None


# the folder of a verb with no run directory: one per job (world rank 0's host and pid), removed when it ends normally
RECORDS_BESIDE = ".hpc-llm-ranks.{verb}.{host}.{pid}"


@contextlib.contextmanager
def records_beside(record: RankRecord, comm, output, verb: str):
    """`record` written, while the block runs, into a folder beside `output` (a file or folder the verb writes; None:
    the current directory), so a rank whose watchdog fires there names the rank behind as in a run directory. World
    rank 0 makes the folder and broadcasts it (a directory it cannot write: no records, the verb runs anyway); the
    last rank to finish removes it. One process: nothing (no peers)."""
    if comm.size == 1:
        yield
        return
    where = None
    if comm.rank == 0:
        base = Path(output).absolute().parent if output else Path.cwd()
        name = RECORDS_BESIDE.format(verb=verb, host=socket.gethostname(), pid=os.getpid())
        try:
            (base / name).mkdir()
            where = str(base / name)
        except OSError:
            pass
    where = comm.bcast_object(where)
    if where is None:
        yield
        return
    record.start(Path(where), comm.rank, comm.size)
    try:
        yield
    finally:
        record.stop()
        # a peer's file still there: that peer removes the folder
        with contextlib.suppress(OSError):
            Path(where).rmdir()
