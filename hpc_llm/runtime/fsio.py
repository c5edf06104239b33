"""Durable file writes shared by token files and checkpoints: temp name in the same directory, fsync, atomic rename."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import tempfile
import time
from contextlib import contextmanager
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


@contextmanager
def atomic_output(path: Path):
    """For writers that want a path (savefig, h5py): yields a temporary path beside ``path`` (its suffix kept, so
    a writer that reads the format from it still can); on success it is fsynced and renamed over ``path``, on any
    failure removed. A crash mid-write leaves ``path`` as it was and at most a ``.NAME.*.tmp`` file beside it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}"
    )
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def _files_of(path: Path) -> list[Path]:
    """An input as the files it names: a file itself, a directory the files directly in it."""
    if path.is_dir():
        try:
            return [p for p in path.iterdir() if p.is_file()]
        except OSError:
            return []
    return [path] if path.exists() else []


def same_file(a: Path, b: Path) -> bool:
    """Whether a and b are one file (through symbolic and hard links); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    path, flag: str, inputs=(), force: bool = False, parent_must_exist: bool = True
) -> Path:
    """An output file path checked before any work, each refusal one line (a UserError) naming ``flag`` (e.g.
    "generate --out"): never one of ``inputs`` (a file, or a directory: every file directly in it), compared as
    files (os.path.samefile: through symbolic and hard links), whatever ``force`` says; not a directory; its
    directory existing (unless not ``parent_must_exist``: the verb makes it); and not an existing file unless
    ``force`` (then the verb replaces it atomically: a temporary name beside it, fsync, rename). Returns the path."""
    path = Path(path)
    for given in inputs:
        if given is None:
            continue
        for f in _files_of(Path(given)):
            if same_file(path, f):
                named = "" if str(f) == str(given) else f" (in {given})"
                raise UserError(
                    f"{flag} {path}: is the input {f}{named}; writing it would destroy it: choose "
                    "another output path"
                )
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file path")
    if parent_must_exist and not path.parent.is_dir():
        raise UserError(f"{flag} {path}: directory {path.parent} does not exist")
    if (path.exists() or path.is_symlink()) and not force:
        raise UserError(f"{flag} {path}: file exists: give --force to replace it")
    return path


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
