"""prepare's output directory: the checks before anything is written, its lock's name, and the temporary files a run
names (its tag) and a killed run leaves (removed by the next prepare into it: module docstring of prepare.py).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from hpc_llm.data.tokens import SPLITS, split_file
from hpc_llm.errors import UserError
from hpc_llm.runtime.fsio import same_file

log = logging.getLogger(__name__)

LOCK_NAME = ".prepare.lock"
# a prepare's temporary files: this version's (the run's tag in the name) and, without a tag, those of earlier ones
_TEMPORARY = re.compile(
    r"\.prepare\.[0-9a-f]{8}\.(part[0-9]+|(train|val)\.bin\.[a-z0-9_]{8})\.tmp|\.(train|val)\.bin\.[a-z0-9_]{8}\.tmp"
)


def temp_prefix(tag: str) -> str:
    """How this run's temporary files begin (the tag: the run's identity, the same on every rank)."""
    return f".prepare.{tag}."


def remove_stale_temporaries(out: Path) -> None:
    """Rank 0, holding the output directory's lock: the temporary files a killed prepare left, and only those."""
    n, size = 0, 0
    for entry in os.scandir(out):
        if _TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                size += entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
                n += 1
            except FileNotFoundError:
                pass
    if n:
        log.info(
            "prepare: removed %d temporary file%s (%.1f MB) left in %s by an interrupted prepare",
            n,
            "" if n == 1 else "s",
            size / 1e6,
            out,
        )


def output_names() -> list[str]:
    """The files prepare writes in its output directory."""
    return [split_file(split) for split in SPLITS] + ["meta.json"]


def check_out_dir(out: Path, inputs: list, files: list, force: bool) -> None:
    """The output directory is never an input, nor holds a file prepare writes that is an input (given by name: an
    output directory inside an input folder is left out of `files`); one holding an earlier preparation's files
    (train.bin, val.bin or meta.json; anything else in it is never touched) is refused unless ``force``."""
    outputs = [out / name for name in output_names()]
    for given in inputs:
        if same_file(out, Path(given)):
            raise UserError(
                f"prepare --out {out}: is the input {given}; choose another output directory"
            )
    for f in [Path(g) for g in inputs] + list(files):
        for o in outputs:
            if same_file(f, o):
                raise UserError(
                    f"prepare --out {out}: its {o.name} is the input {f}; writing it would destroy it: "
                    "choose another output directory"
                )
    held = [o.name for o in outputs if o.exists() or o.is_symlink()]
    if held and not force:
        raise UserError(
            f"prepare --out {out}: holds {', '.join(held)} of an earlier preparation: give --force to "
            "replace them"
        )


def remove_created(created: list[str]) -> None:
    for d in created:  # deepest first
        try:
            os.rmdir(d)
        except OSError:
            pass
