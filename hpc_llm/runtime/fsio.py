"""Durable file writes shared by token files and checkpoints: temp name in the same directory, fsync, atomic rename."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
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


_FALLOC_FL_KEEP_SIZE = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def reserve_space(path: Path, nbytes: int) -> None:
    """Allocate ``nbytes`` of disk to the (just created) file ``path`` without changing its size, so that a full disk
    or an exhausted quota fails here, as a plain OSError, and not inside a library that writes it afterwards: HDF5,
    meeting ENOSPC while it flushes at close, keeps dataset ids it can no longer close and crashes the process at
    exit (H5D_close, status 139). A filesystem without fallocate gets the free-space check of statvfs instead."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, int(nbytes)) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, f"{os.strerror(err)} (reserving {nbytes / 1e6:.1f} MB)", str(path))
        st = os.fstatvfs(fd)
        if st.f_bavail * st.f_frsize < nbytes:
            free = st.f_bavail * st.f_frsize
            raise OSError(
                errno.ENOSPC,
                f"No space left on device ({nbytes / 1e6:.1f} MB needed, {free / 1e6:.1f} MB free)",
                str(path),
            )
    finally:
        os.close(fd)


def release_reserve(path: Path) -> None:
    """Give back what reserve_space allocated beyond the file's end (a truncation to its own size)."""
    try:
        os.truncate(path, os.path.getsize(path))
    except OSError:
        pass


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


def check_writable(path, what: str) -> None:
    """One line (a UserError naming ``what``) when nothing can be created at ``path``: its nearest existing directory
    (itself, or an ancestor the writer would create it in) is on a read-only filesystem or not writable by us.
    Checked before any work, so a read-only run or output directory is bad input, not a fault mid-run."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.is_dir() and os.access(p, os.W_OK | os.X_OK):
        return
    if p.is_dir():
        readonly = bool(os.statvfs(p).f_flag & os.ST_RDONLY)
        reason = "is on a read-only filesystem" if readonly else "is not writable (no permission)"
        raise UserError(f"{what}: cannot write in {p}: the directory {reason}")


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
    check_writable(path.parent, f"{flag} {path}")
    if (path.exists() or path.is_symlink()) and not force:
        raise UserError(f"{flag} {path}: file exists: give --force to replace it")
    return path


def _is_open_as(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


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
        # a holder that ends removes the file (prepare's lock): one opened before that and locked after locks a
        # name no one else sees, so the lock must be on the file the name still points to
        while True:
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
                    f"{what}={directory} is in use by a live run ({holder}): wait for it to end, or "
                    "choose another directory"
                ) from None
            except OSError as e:  # ENOLCK, EOPNOTSUPP: this filesystem does not lock
                logging.getLogger("hpc_llm").warning(
                    "%s: cannot lock %s (%s): nothing stops a second run from using "
                    "it at the same time",
                    what,
                    path,
                    e.strerror,
                )
            if _is_open_as(fd, path):
                return cls(fd, path)
            os.close(fd)

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
