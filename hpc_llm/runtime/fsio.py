"""Durable file writes shared by token files and checkpoints: temp name in the same directory, fsync, atomic rename."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from hpc_llm.errors import UserError


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable. Some filesystems refuse fsync on a directory: the rename is still atomic."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a part: write a temp file, fsync it, rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


class DirectoryLock:
    """One live run per directory: a POSIX lock (lockf) on DIR/.lock, held while the process lives. The kernel drops it
    when the process ends however it ends, so a crashed or killed run never leaves it stuck; the file's text (host,
    pid, start time, Slurm job) only names the holder in the refusal. Filesystems without locks get a warning.

    `lock(dir, what, create=False)` only tests an existing lock file (a refused run changes nothing on disk);
    `claim()` then records this process as the holder."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def lock(
        cls, directory: Path, what: str, create: bool = True, name: str = ".lock"
    ) -> DirectoryLock | None:
        path = Path(directory) / name
        try:
            fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return None  # no run has locked this directory
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise UserError(
                f"{what}={directory} is in use by a live run ({holder}): wait for it to end, or choose "
                "another directory"
            ) from None
        except OSError as e:  # ENOLCK, EOPNOTSUPP: this filesystem does not lock
            logging.getLogger("hpc_llm").warning(
                "%s: cannot lock %s (%s): nothing stops a second run from using "
                "it at the same time",
                what,
                path,
                e.strerror,
            )
        return cls(fd, path)

    def claim(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        text = (
            f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            + (f", Slurm job {job}" if job else "")
        )
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode() + b"\n", 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None
