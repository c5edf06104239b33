"""The run directory's policy: ``ckpt_XXXXXXXX.h5`` names (and the parts writer's parts directories), the
``latest`` pointer, listing, pruning, the temporary files interrupted saves leave, and which files a resumed run
should try (docs/checkpoint-format.md)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from pathlib import Path

from hpc_llm.checkpoint import format as fmt
from hpc_llm.checkpoint.reader import CheckpointFile, header_ok, verify_checkpoint
from hpc_llm.errors import UserError
from hpc_llm.runtime.fsio import atomic_write_bytes, fsync_dir

log = logging.getLogger("hpc_llm.checkpoint")

_CKPT_RE = re.compile(r"^ckpt_(\d+)\.h5$")
_LATEST = "latest"


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """``out_dir/ckpt_{step:08d}.h5``."""
    if int(step) < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(out_dir) / f"ckpt_{int(step):08d}.h5"


def temporary_path(path: Path, pid: int) -> Path:
    """Where a save of ``path`` writes first: ``.<name>.tmp-<pid>``, beside it (same filesystem: the rename is
    atomic); readers skip it and the next run in the directory deletes it."""
    return path.parent / f".{path.name}.tmp-{pid}"


def parts_dir(path: Path, token: str) -> Path:
    """Where a save of ``path`` by the parts writer puts its ranks' files: ``<name>.parts-<token>``, beside it (a
    new name each save: a checkpoint replaced at the same step keeps its own parts until the new one is in place)."""
    return path.parent / f"{path.name}.parts-{token}"


def parts_of(path: Path) -> Path | None:
    """The parts directory a checkpoint written in parts names (None: a single-file checkpoint, or unreadable)."""
    try:
        with fmt.open_file(path) as f:
            names = json.loads(fmt.attr_str(f.attrs.get(fmt.PARTS_ATTR)) or "[]")
    except (UserError, OSError, ValueError):
        return None
    return path.parent / names[0].split("/")[0] if names else None


def remove_checkpoint(path: Path, parts: Path | None = None) -> None:
    """Remove a checkpoint: its file, then its parts (``parts``: parts_of(path), read by a caller that locks the file
    meanwhile; a kill in between leaves parts that no file names, which remove_interrupted_saves removes)."""
    parts = parts or parts_of(path)
    path.unlink()
    if parts is not None:
        shutil.rmtree(parts, ignore_errors=True)


def _is_temporary(entry: Path) -> bool:
    return entry.name.startswith(".ckpt_") and ".tmp-" in entry.name


def _orphan_parts(out_dir: Path) -> list[Path]:
    """Parts directories that no checkpoint names: left by a save that did not finish, or a removal that did not."""
    named = {parts_of(p) for _s, p in list_checkpoints(out_dir)}
    return [e for e in out_dir.iterdir() if ".parts-" in e.name and e.is_dir() and e not in named]


def check_not_a_run_checkpoint(out: Path, flag: str) -> None:
    """An output file written by a tool (merge-lora, import-gpt2) never takes a checkpoint's name in a run directory
    (one holding ``ckpt_*.h5`` or ``latest``): it would become that run's newest checkpoint, which ``--resume auto``
    and every reader of the directory would take (a LoRA run resumed from its merged model: the adapters gone)."""
    out = Path(out)
    if not _CKPT_RE.match(out.name) or not out.parent.is_dir():
        return
    if (out.parent / _LATEST).exists() or any(p != out for _s, p in list_checkpoints(out.parent)):
        raise UserError(
            f"{flag} {out}: a checkpoint's name in the run directory {out.parent}: it would become that "
            "run's newest checkpoint; choose another name or directory"
        )


def write_latest(out_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Point ``out_dir/latest`` at ``path`` (its file name when it lies in ``out_dir``), atomically."""
    out_dir = Path(out_dir)
    path = Path(path)
    if path.parent.resolve() == out_dir.resolve():
        target = path.name
    else:
        target = str(path.resolve())
    atomic_write_bytes(out_dir / _LATEST, (target + "\n").encode("utf-8"))


def read_latest(out_dir: str | os.PathLike) -> Path | None:
    """The path ``out_dir/latest`` names (not checked), or None when there is no usable pointer."""
    pointer = Path(out_dir) / _LATEST
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("ignoring unreadable %s: %s", pointer, exc)
        return None
    if not text or "\n" in text:
        log.warning("ignoring %s: expected one checkpoint file name, found %r", pointer, text[:80])
        return None
    return Path(out_dir) / text  # an absolute path in the file stays absolute


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` for every ``ckpt_<step>.h5`` in ``out_dir``, newest (highest step) first; not verified.
    Leftover temporary files from interrupted saves are logged and skipped."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for entry in out_dir.iterdir():
        match = _CKPT_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
        elif _is_temporary(entry):
            log.warning("skipping %s: temporary file left by an interrupted save", entry)
    found.sort(key=lambda item: (item[0], item[1].name), reverse=True)
    return found


def remove_interrupted_saves(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves that were killed (``.ckpt_*.h5.tmp-<pid>``). Only for the one process
    that writes ``out_dir``'s checkpoints, before it saves: another live writer's temporary file would go too."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    stale = [e for e in out_dir.iterdir() if _is_temporary(e) and e.is_file()]
    for path in stale:
        path.unlink()
        log.info("removed %s, left by an interrupted save", path)
    for path in _orphan_parts(out_dir):
        shutil.rmtree(path)
        stale.append(path)
        log.info("removed %s, parts of an interrupted save", path)
    return stale


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except UserError as exc:
        log.warning("skipping checkpoint: %s", exc)
        return False


def _pointed_elsewhere(out_dir, listed) -> Path | None:
    """The file ``latest`` names when it is not one of ``listed`` (a checkpoint kept outside the directory)."""
    pointed = read_latest(out_dir)
    if pointed is not None and all(pointed.resolve() != p.resolve() for _s, p in listed):
        return pointed
    return None


def find_latest(out_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that verifies, read whole by this one process (``hpc-llm generate``, ``inspect``, the
    API): the newest (highest step) ``ckpt_*.h5`` that verifies, else the file ``latest`` names if it lies elsewhere
    and verifies, else None. The newest file, not the pointer, comes first: a save killed between its rename and the
    pointer's update leaves a complete, verified newer file. Each skipped file is logged as a warning. A resumed
    run does not call this (every rank would read every file): see ``resume_candidates``."""
    listed = list_checkpoints(out_dir)
    for _step, path in listed:
        if _verifies(path):
            return path
    pointed = _pointed_elsewhere(out_dir, listed)
    if pointed is not None and _verifies(pointed):
        return pointed
    return None


def open_latest(out_dir: str | os.PathLike, listings: int = 3) -> CheckpointFile | None:
    """find_latest's file, opened before it is verified and kept open (``with``/``close()``), so a live run that
    saves and prunes meanwhile never takes it from the reader: HDF5's shared lock makes the pruner leave it (and
    its parts) alone, and a file that vanished between the listing and the open is skipped for the next newest,
    the directory listed again (up to ``listings`` times) when every candidate vanished that way."""
    for _ in range(listings):
        listed = list_checkpoints(out_dir)
        pointed = _pointed_elsewhere(out_dir, listed)
        vanished = False
        for path in [p for _s, p in listed] + ([pointed] if pointed is not None else []):
            try:
                f = CheckpointFile(path)
            except UserError as exc:
                # gone, or locked by a pruner that is removing it: an older one, or a newer listing
                gone = not path.exists() or "unable to lock" in str(exc)
                vanished = vanished or gone
                if not gone:
                    log.warning("skipping checkpoint: %s", exc)
                continue
            try:
                f.verify_share(0, 1)
                return f
            except UserError as exc:
                f.close()
                log.warning("skipping checkpoint: %s", exc)
        if not vanished:
            return None
    return None


def resume_candidates(out_dir: str | os.PathLike, first_only: bool = False) -> list[Path]:
    """What ``--resume auto`` tries, in order: the ``ckpt_*.h5`` of ``out_dir`` newest first, then the file
    ``latest`` names if it lies elsewhere, each kept only if its header checks pass (ours, complete, a version we
    read: no checksums, so this is cheap). The ranks then verify the first one together while they restore it, and
    fall back to the next if it fails. Each file skipped here is logged as a warning (``first_only``: just the first
    that passes, quietly: what the ranks other than world rank 0 need)."""
    listed = list_checkpoints(out_dir)
    paths = [p for _s, p in listed]
    pointed = _pointed_elsewhere(out_dir, listed)
    if pointed is not None:
        paths.append(pointed)
    good = []
    for path in paths:
        if header_ok(path):
            good.append(path)
            if first_only:
                break
        elif path.exists() and not first_only:
            log.warning(
                "skipping checkpoint %s: not a complete hpc_llm checkpoint this version reads", path
            )
    return good


def _lock_for_removal(path: Path) -> int | None:
    """A descriptor of ``path`` holding an exclusive lock until it is closed, so no reader opens it meanwhile (HDF5
    takes a shared one when it opens a file); None when a reader holds it now (or it is gone): leave it. A
    filesystem without locks gets the descriptor anyway (a reader then takes the next newest: open_latest)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass
    return fd


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int, verified=()) -> list[Path]:
    """Remove all but the newest ``keep_last`` verified ``ckpt_*.h5`` in ``out_dir``; return the removed paths.

    Never removes the file ``latest`` names, nor one a reader holds open (open_latest: it goes at a later save).
    Files are verified newest first until ``keep_last`` good ones are
    found; a file inside that window that fails verification is left in place (logged), so a bad newer file never
    costs a good older one. Older files are removed when their header is ours and complete (their checksums are
    not read); files that are not hpc_llm checkpoints, or come from a newer hpc_llm, are never removed.
    ``verified``: paths known good (the caller wrote and verified them), counted without reading them again.
    """
    if int(keep_last) < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    pointed = read_latest(out_dir)
    protected = pointed.resolve() if pointed is not None else None
    known = {Path(p).resolve() for p in verified}
    kept = 0
    removed: list[Path] = []
    for _step, path in list_checkpoints(out_dir):
        if kept < keep_last:
            if path.resolve() in known or _verifies(path):
                kept += 1
            continue
        if protected is not None and path.resolve() == protected:
            continue
        if not header_ok(path):
            log.warning(
                "not pruning %s: not a complete hpc_llm checkpoint this version understands", path
            )
            continue
        parts = parts_of(path)  # before the lock: reading it takes HDF5's own
        fd = _lock_for_removal(path)
        if fd is None:
            log.info("not pruning %s now: a reader has it open", path)
            continue
        try:
            remove_checkpoint(path, parts)
        finally:
            os.close(fd)
        removed.append(path)
        log.info("pruned old checkpoint %s", path)
    if removed:
        fsync_dir(Path(out_dir))
    return removed
