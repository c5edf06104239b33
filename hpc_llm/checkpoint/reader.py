"""Reading a checkpoint: in pieces (``CheckpointFile``: what each rank of a resumed run uses, reading only its
hyperslabs and checksumming only its share of the datasets), whole (``load_checkpoint``: analysis, inference,
`hpc-llm inspect`), or just checking it (``verify_checkpoint``)."""

from __future__ import annotations

import collections
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_llm.checkpoint import format as fmt
from hpc_llm.errors import UserError

_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)


@dataclass
class Checkpoint:
    """A loaded checkpoint: plain dicts of NumPy arrays and plain Python values."""

    params: dict[str, np.ndarray]
    optimizer: dict[str, dict[str, np.ndarray]]
    state: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, dict[str, np.ndarray]]
    path: Path
    format_version: int
    software_version: str = ""
    created: str = ""


class CheckpointFile:
    """A checkpoint open for reading in pieces: what every rank of a resumed run uses, each reading only its
    hyperslabs. Opening checks the header and reads the small parts (state, config, metrics, each checksummed);
    ``shapes`` lists the tensors. Verification is shared: with ``share(part, parts)`` each of ``parts`` ranks takes
    a share of the datasets (dealt out by size, the same on every rank); ``read`` returns any hyperslab, and when it
    reads a whole dataset of this rank's share it checksums it on the side (the file is read once); then
    ``verify_share()`` checks the rest of the share and raises UserError on a mismatch. The ranks must agree on the
    verdict before they use what they read."""

    def __init__(self, path: str | os.PathLike, locking: bool = True):
        self.path = Path(path)
        self._f = fmt.open_file(self.path, locking)
        try:
            f = self._f
            self.format_version, self._datasets = fmt.check_header(f, self.path)
            self.state = fmt.load_state(fmt.attr_str(f["state"].attrs["state_json"]))
            self.config = json.loads(fmt.attr_str(f.attrs["config_json"]))
            self.metrics = {
                table: {
                    col: self._read_checked(d).astype(np.float64, copy=False)
                    for col, d in g.items()
                }
                for table, g in f["metrics"].items()
            }
            self.shapes = {
                "params": {name: d.shape for name, d in f["params"].items()},
                **{
                    f"optimizer/{slot}": {name: d.shape for name, d in g.items()}
                    for slot, g in f["optimizer"].items()
                },
            }
            self.software_version = fmt.attr_str(f.attrs.get("software_version")) or ""
            self.created = fmt.attr_str(f.attrs.get("created")) or ""
            self._mine: dict[str, h5py.Dataset] = {}  # this rank's share to verify, by dataset path
            self._pending: dict[
                str, Future
            ] = {}  # checksums of whole datasets read, being computed
            self._pool = ThreadPoolExecutor(1)
            self._inflight: collections.deque[Future] = collections.deque()
        except BaseException as exc:
            self._f.close()
            if isinstance(exc, _READ_ERRORS):
                raise fmt.unreadable(self.path, exc) from None
            raise

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._f.close()

    def read_all(self, verify: bool = True, optimizer: bool = True) -> Checkpoint:
        """The whole checkpoint in memory. With ``verify`` every dataset's crc32 is checked as it is read; without
        it the header checks (format, version, complete) still apply. ``optimizer=False`` skips the Adam moments (two
        thirds of the file; inference needs none of it): ``Checkpoint.optimizer`` is then empty."""
        # stray datasets outside the groups read below must still carry a correct checksum
        if verify:
            for dset in self._datasets:
                if dset.name.split("/")[1] not in fmt.GROUPS:
                    fmt.check_crc(dset, fmt.dataset_crc(dset), self.path)
        params = {name: self.read_whole("params", name, verify) for name in self.shapes["params"]}
        moments = {}
        if optimizer:
            for group, names in self.shapes.items():
                if group.startswith("optimizer/"):
                    moments[group.split("/", 1)[1]] = {
                        name: self.read_whole(group, name, verify) for name in names
                    }
        return Checkpoint(
            params=params,
            optimizer=moments,
            state=self.state,
            config=self.config,
            metrics=self.metrics,
            path=self.path,
            format_version=self.format_version,
            software_version=self.software_version,
            created=self.created,
        )

    def _read_checked(self, dset: h5py.Dataset) -> np.ndarray:
        arr = fmt.contiguous(dset[()])
        fmt.check_crc(dset, fmt.crc(arr), self.path)
        return arr

    def names(self, group: str) -> list[str]:
        """The datasets directly in ``/<group>`` (none when the file has no such group)."""
        g = self._f.get(group)
        return (
            [n for n, d in g.items() if isinstance(d, h5py.Dataset)]
            if isinstance(g, h5py.Group)
            else []
        )

    def read(
        self, group: str, name: str, index: tuple = (), out: np.ndarray | None = None
    ) -> np.ndarray:
        """``/<group>/<name>[index]`` (group "params" or "optimizer/m", ...): only that hyperslab is read; into
        ``out`` (C-contiguous, the slab's shape, any float dtype: HDF5 converts) when given, else a new array.
        ``out`` must then stay unchanged until ``verify_share`` (its checksum may be computed from it)."""
        try:
            dset = self._f[group][name]
            if out is None:
                out = np.asarray(dset[index])
            else:
                dset.read_direct(out, source_sel=index or None)
        except _READ_ERRORS as exc:
            raise fmt.unreadable(self.path, exc) from None
        key = f"/{group}/{name}"
        if (
            key in self._mine
            and key not in self._pending
            and out.shape == dset.shape
            and out.dtype == dset.dtype
        ):
            # read whole: checksum those bytes, on the side
            self._pending[key] = self._pool.submit(fmt.crc, out)
            self._inflight.append(self._pending[key])
            # the checksums fell behind: don't keep more arrays alive for them
            while len(self._inflight) > 4:
                self._inflight.popleft().result()
        return out

    def settle(self) -> None:
        """Wait for the checksums being computed from arrays ``read`` returned, so the caller may reuse them."""
        while self._inflight:
            self._inflight.popleft().result()

    def share(self, part: int, parts: int) -> None:
        """Make this rank part ``part`` of ``parts`` for ``verify_share``: the datasets are dealt out by size."""
        dsets = sorted(self._datasets, key=lambda d: d.name)
        owners = fmt.deal([d.size * d.dtype.itemsize for d in dsets], parts)
        self._mine = {d.name: d for d, who in zip(dsets, owners) if who == part}

    def read_whole(self, group: str, name: str, verify: bool = True) -> np.ndarray:
        try:
            dset = self._f[group][name]
            return self._read_checked(dset) if verify else fmt.contiguous(dset[()])
        except UserError:
            raise
        except _READ_ERRORS as exc:
            raise fmt.unreadable(self.path, exc) from None

    def verify_share(self, part: int | None = None, parts: int | None = None) -> None:
        """Checksum this rank's share of the datasets (``share(part, parts)`` first, or pass them here): those read
        whole by ``read`` from their bytes then, the others now. ``parts`` ranks together check every dataset once."""
        if part is not None:
            self.share(part, parts)
        try:
            for key, value in self._pending.items():
                fmt.check_crc(self._mine[key], value.result(), self.path)
            fmt.check_crcs(
                [d for key, d in self._mine.items() if key not in self._pending], self.path
            )
        except UserError:
            raise
        except _READ_ERRORS as exc:
            raise fmt.unreadable(self.path, exc) from None


def verify_checkpoint(path: str | os.PathLike, locking: bool = True) -> None:
    """Raise UserError unless ``path`` is a complete hpc_llm checkpoint whose every dataset matches its crc32
    (``locking``: format.open_file's)."""
    with CheckpointFile(path, locking) as f:  # one rank checking the whole file is a share of one
        f.verify_share(0, 1)


def load_checkpoint(
    path: str | os.PathLike, verify: bool = True, optimizer: bool = True
) -> Checkpoint:
    """Read a whole checkpoint into memory (CheckpointFile.read_all; a run directory's newest, held open from its
    choice on: api.open_checkpoint, then read_all)."""
    with CheckpointFile(path) as f:
        return f.read_all(verify, optimizer)


def header_ok(path: Path) -> bool:
    """Cheap check (no checksums): ours, complete, a format this version understands."""
    try:
        with fmt.open_file(path) as f:
            fmt.check_header(f, path)
        return True
    except (UserError, *_READ_ERRORS):
        return False
