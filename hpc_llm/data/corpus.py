"""Finding and reading the source text: the input files a prepare is given (files, folders, a pattern), the
embedded standard-library corpus, and the bytes of a piece of a file as text."""

from __future__ import annotations

import logging
import os
import sysconfig
from pathlib import Path

from hpc_llm.errors import UserError

log = logging.getLogger(__name__)

# The standard library's tests, IDE and installed packages are excluded: they are big, repetitive or not stdlib.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def expand_inputs(inputs, pattern: str, exclude=None) -> list[Path]:
    """Files named directly are always taken; folders contribute their files matching `pattern`, sorted. `exclude`
    (prepare's output directory): a folder's files under it are skipped, with one log line: prepare into a folder
    inside its input must never read its own token files (or a previous run's) as text."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    skip = Path(exclude).resolve() if exclude is not None else None
    files: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                (f for f in p.rglob(pattern) if f.is_file()),
                key=lambda f: f.relative_to(p).as_posix(),
            )
            if skip is not None and skip.is_relative_to(p.resolve()):
                kept = [f for f in found if not f.resolve().is_relative_to(skip)]
                log.info(
                    "prepare: skipping the output directory %s inside input folder %s (%d files not read)",
                    exclude,
                    item,
                    len(found) - len(kept),
                )
                found = kept
        elif p.is_file():
            found = [p]
        else:
            raise UserError(
                f"prepare: input {str(p)!r} does not exist (expected a file or a folder)"
            )
        for f in found:
            key = f.resolve()
            if key not in seen:  # a file named both directly and through its folder is read once
                seen.add(key)
                files.append(f)
    return files


def read_text(path: Path, start: int, end: int) -> str | None:
    """Bytes start..end of a file as text, or None when they are not UTF-8."""
    try:
        with open(path, "rb") as fh:
            fh.seek(start)
            raw = fh.read(end - start)
    except OSError as e:
        raise UserError(f"prepare: cannot read input {str(path)!r} ({e.strerror or e})") from None
    if len(raw) != end - start:
        raise UserError(
            f"prepare: input {str(path)!r} changed while it was read (expected {end} bytes)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None  # binaries and other encodings: skip rather than corrupt the token stream


def stdlib_root() -> str:
    """This Python's standard-library folder."""
    return sysconfig.get_paths()["stdlib"]


def stdlib_corpus_files(max_bytes: int = 8_000_000) -> list[Path]:
    """The embedded default corpus: this Python's own standard-library .py sources, up to max_bytes in total.

    Every machine with Python has it, so a first run needs no download; sorted order makes it the same corpus on
    every rank and every run of the same Python version.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise UserError(f"stdlib corpus: max_bytes is {max_bytes!r}, expected a positive integer")
    root = Path(stdlib_root())
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath) / name)
    found.sort(key=lambda f: f.relative_to(root).as_posix())

    files, total = [], 0
    for f in found:
        size = f.stat().st_size
        if total + size > max_bytes:
            break  # stop at the first file that does not fit, so the prefix is the same whatever max_bytes is
        files.append(f)
        total += size
    return files
