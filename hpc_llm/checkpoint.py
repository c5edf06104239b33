"""Checkpoints: one HDF5 file per save, logical (unsharded) tensors, a CRC32 per dataset, atomic write.

Layout (docs/checkpoint-format.md has the full description)::

    /                      attrs: format, format_version, software_version, created, step, config_json,
                                  manifest_json, complete (written last)
    /params/<name>         one dataset per parameter, full logical shape, dtype as given
    /optimizer/<slot>/<name>   e.g. slot "m", "v": same names and shapes as /params
    /state                 attrs: state_json (the whole state dict) + each top-level scalar as its own attr
    /config                attrs: config_json (same JSON as the root attribute)
    /metrics/<table>/<column>  1-D float64, chunked, maxshape=(None,) so a later writer can extend it

Every dataset carries ``crc32`` = ``zlib.crc32`` of its C-contiguous bytes. ``save_checkpoint`` writes to
``.<name>.tmp-<pid>`` in the destination directory, closes it, fsyncs it while verifying it read-only, then
``os.replace``-s it onto the final name and fsyncs the directory: an existing checkpoint at the destination is
never touched before the new one is known good. ``save_checkpoint_mpio`` writes the same file from all ranks
(parallel HDF5). ``CheckpointFile`` reads one in pieces: each rank of a resumed run its own hyperslabs.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_llm import __version__
from hpc_llm.errors import UserError
from hpc_llm.fsio import atomic_write_bytes, fsync_dir

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "load_checkpoint",
    "CheckpointFile",
    "mpio_available",
    "save_checkpoint_mpio",
    "checkpoint_path",
    "write_latest",
    "read_latest",
    "find_latest",
    "list_checkpoints",
    "prune_checkpoints",
    "remove_interrupted_saves",
]

FORMAT = "hpc_llm-checkpoint"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)

# HDF5 1.8 object headers are the oldest that allow attributes over 64 KiB (dense attribute storage); capping the
# newest format at 1.10 keeps files readable by the HDF5 1.10 that Debian's MPI-enabled h5py links against.
_LIBVER = ("v108", "v110")
_METRIC_CHUNK = 1024  # elements per chunk of a /metrics column
_VERIFY_BLOCK_BYTES = 64 << 20  # verification reads datasets in slabs of about this size
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.h5$")
_LATEST = "latest"


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


# ---------------------------------------------------------------------------------------------------------------
# JSON for state (exact round trip of big ints, tuples, small ndarrays, numpy scalars)
# ---------------------------------------------------------------------------------------------------------------

_TUPLE_TAG = "__tuple__"
_ARRAY_TAG = "__ndarray__"


def _to_json_tree(obj: Any, where: str) -> Any:
    """Turn ``obj`` into something ``json.dumps`` writes and ``_from_json_tree`` turns back into ``obj``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint state: key {key!r} in {where} is not a string")
            out[key] = _to_json_tree(value, f"{where}.{key}")
        return out
    if isinstance(obj, list):
        return [_to_json_tree(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {_TUPLE_TAG: [_to_json_tree(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"checkpoint state: array {where} has unsupported dtype {obj.dtype}")
        return {_ARRAY_TAG: obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
    raise TypeError(f"checkpoint state: {where} has type {type(obj).__name__}, which cannot be stored as JSON")


def _from_json_tree(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_from_json_tree(v) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {_TUPLE_TAG}:
            return tuple(_from_json_tree(v) for v in obj[_TUPLE_TAG])
        if set(obj) == {_ARRAY_TAG, "shape", "data"}:
            return np.array(obj["data"], dtype=np.dtype(obj[_ARRAY_TAG])).reshape(obj["shape"])
        return {k: _from_json_tree(v) for k, v in obj.items()}
    return obj


def _dump_state(state: dict) -> str:
    return json.dumps(_to_json_tree(state, "state"))


def _load_state(text: str) -> dict:
    return _from_json_tree(json.loads(text))


# ---------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"checkpoint: {what} name {name!r} must be a non-empty string without '/'")


def _as_array(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(f"checkpoint: {where} is a {type(value).__name__}, expected a numpy.ndarray (host memory)")
    if value.dtype.kind not in "biufc":
        raise TypeError(f"checkpoint: {where} has unsupported dtype {value.dtype}")
    return _contiguous(value)


def _contiguous(value: Any) -> np.ndarray:
    """C-contiguous array; unlike np.ascontiguousarray it keeps 0-d arrays 0-d."""
    arr = np.asarray(value)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _crc(arr: np.ndarray, value: int = 0) -> int:
    arr = _contiguous(arr)
    if arr.size == 0:
        return value
    return zlib.crc32(arr.reshape(-1).view(np.uint8), value)


def _dataset_crc(dset: h5py.Dataset) -> int:
    """CRC32 of a dataset's C-order bytes, read in slabs along axis 0 so memory stays bounded."""
    if dset.ndim == 0 or dset.size == 0:
        return _crc(np.asarray(dset[()]))
    row_bytes = max(1, dset.dtype.itemsize * (dset.size // dset.shape[0]))
    rows = max(1, _VERIFY_BLOCK_BYTES // row_bytes)
    value = 0
    for start in range(0, dset.shape[0], rows):
        value = _crc(dset[start : start + rows], value)
    return value


def _attr_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "SUO":
        return _attr_str(value.item())
    return value if isinstance(value, str) else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_during(path: Path, work) -> None:
    """fsync ``path`` in a thread while ``work()`` runs, and wait for both: the fsync waits on the disk, while
    verification (the usual work) reads the same bytes back from the page cache and checksums them on the CPU."""
    with ThreadPoolExecutor(1) as pool:
        synced = pool.submit(_fsync_path, path)
        try:
            work()
        finally:
            synced.result()


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # pragma: no cover - best effort clean-up
        log.warning("could not remove temporary file %s: %s", path, exc)


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Payload:
    """What a save writes, validated and serialised before a byte touches the disk. ``tensors``: dataset path ->
    array, in file order (parameters, optimizer slots, metrics columns)."""

    tensors: dict[str, np.ndarray]
    state: dict
    state_json: str
    config_json: str
    created: str


def _prepare(params, optimizer, state, config, metrics) -> _Payload:
    tensors: dict[str, np.ndarray] = {}
    for name, value in params.items():
        _check_name(name, "parameter")
        tensors[f"params/{name}"] = _as_array(value, f"params[{name!r}]")
    for slot, named in optimizer.items():
        _check_name(slot, "optimizer slot")
        for name, value in named.items():
            if f"params/{name}" not in tensors:
                raise ValueError(f"checkpoint: optimizer[{slot!r}] has {name!r}, which is not a parameter")
            arr = _as_array(value, f"optimizer[{slot!r}][{name!r}]")
            if arr.shape != tensors[f"params/{name}"].shape:
                raise ValueError(
                    f"checkpoint: optimizer[{slot!r}][{name!r}] has shape {arr.shape}, "
                    f"expected the parameter's {tensors[f'params/{name}'].shape}"
                )
            tensors[f"optimizer/{slot}/{name}"] = arr
    for table, columns in metrics.items():
        _check_name(table, "metrics table")
        for column, values in columns.items():
            _check_name(column, "metrics column")
            arr = _contiguous(np.asarray(values, dtype=np.float64))
            if arr.ndim != 1:
                raise ValueError(f"checkpoint: metrics[{table!r}][{column!r}] must be 1-D, got shape {arr.shape}")
            tensors[f"metrics/{table}/{column}"] = arr
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return _Payload(tensors, state, _dump_state(state), json.dumps(config), created)


def _deal(sizes: list[int], parts: int) -> list[int]:
    """Which of ``parts`` ranks takes each item: largest first, each to the rank with the fewest bytes so far.
    The same on every rank, so ranks can share the datasets of a file without talking."""
    load, owner = [0] * parts, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(parts), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


def _write_file(f: h5py.File, payload: _Payload, crcs: dict, mine) -> None:
    """Create every attribute, group and dataset in one fixed order (under mpio these calls are collective: every
    rank makes them alike), write the data of the datasets ``mine(path)`` says are this rank's, then each dataset's
    checksum (``crcs``: path -> int, or a Future of one)."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = np.int64(FORMAT_VERSION)
    f.attrs["software_version"] = __version__
    f.attrs["created"] = payload.created
    step = payload.state.get("step")
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
        f.attrs["step"] = np.int64(step)
    f.attrs["config_json"] = payload.config_json
    for group in ("params", "optimizer", "metrics"):
        f.create_group(group, track_order=True)
    dsets = {}
    for path, arr in payload.tensors.items():
        parent = path.rsplit("/", 1)[0]
        if parent not in f:
            f.create_group(parent, track_order=True)
        if path.startswith("metrics/"):  # extendable by a later writer
            dset = f.create_dataset(path, shape=arr.shape, maxshape=(None,), chunks=(_METRIC_CHUNK,), dtype=arr.dtype)
        else:
            dset = f.create_dataset(path, shape=arr.shape, dtype=arr.dtype)
        dsets[path] = dset
    g = f.create_group("state")
    g.attrs["state_json"] = payload.state_json
    for key, value in payload.state.items():
        if key == "state_json":
            continue
        if isinstance(value, (bool, np.bool_, str)):
            g.attrs[key] = value
        elif isinstance(value, (int, np.integer)) and -(2**63) <= int(value) < 2**63:
            g.attrs[key] = np.int64(value)
        elif isinstance(value, (float, np.floating)):
            g.attrs[key] = np.float64(value)
    f.create_group("config").attrs["config_json"] = payload.config_json
    for path, arr in payload.tensors.items():
        if mine(path) and arr.size:
            dsets[path][...] = arr
    for path, dset in dsets.items():  # after the data: the serial writer's checksums are computed meanwhile
        crc = crcs[path]
        dset.attrs["crc32"] = np.int64(crc.result() if isinstance(crc, Future) else crc)
    f.attrs["manifest_json"] = json.dumps(["/" + p for p in payload.tensors])
    f.attrs["complete"] = True  # last: a file without it was not finished


def _check_directory(path: Path) -> None:
    if not path.parent.is_dir():
        raise UserError(f"{path}: cannot write checkpoint, directory {path.parent} does not exist")


def save_checkpoint(
    path: str | os.PathLike,
    *,
    params: dict[str, np.ndarray],
    optimizer: dict[str, dict[str, np.ndarray]],
    state: dict,
    config: dict,
    metrics: dict[str, dict[str, Any]],
) -> None:
    """Write a checkpoint atomically: temp file, fsync, verify, ``os.replace``, fsync of the directory.

    ``params``: name -> array (full logical shape). ``optimizer``: slot -> name -> array, names and shapes a subset
    of ``params``. ``state``: JSON-able dict (ints of any size, floats, str, lists, tuples, small arrays).
    ``config``: plain JSON dict. ``metrics``: table -> column -> 1-D sequence, stored as float64.
    Dtypes of params/optimizer arrays are kept exactly, so a load is bitwise.
    """
    path = Path(path)
    _check_directory(path)
    payload = _prepare(params, optimizer, state, config, metrics)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        # checksums in a thread while h5py writes (zlib and HDF5 both release the GIL)
        with ThreadPoolExecutor(1) as pool, h5py.File(tmp, "w", libver=_LIBVER) as f:
            crcs = {p: pool.submit(_crc, a) for p, a in payload.tensors.items()}
            _write_file(f, payload, crcs, mine=lambda _path: True)
        _fsync_during(tmp, lambda: verify_checkpoint(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        _remove_quietly(tmp)
        raise


def mpio_available() -> bool:
    """Whether this h5py was built with MPI (parallel HDF5), so ranks can write one file together."""
    return bool(h5py.get_config().mpi)


def save_checkpoint_mpio(path: str | os.PathLike, comm, **payload_args) -> None:
    """``save_checkpoint`` written by all ranks of ``comm`` (a hpc_llm.parallel.comm.Comm) together: parallel HDF5,
    driver "mpio", on its mpi4py communicator. Every rank passes the same payload. The datasets are dealt out by
    size; each rank checksums and writes its own share (independent I/O), fsyncs while it verifies its share of the
    closed file, and rank 0 renames it. The file is the same as the serial writer's. A UserError on any rank is
    raised on every rank."""
    path = Path(path)
    rank, size = comm.rank, comm.size
    payload = comm.agree(lambda: (_check_directory(path), _prepare(**payload_args))[1])
    names = list(payload.tensors)
    owner = dict(zip(names, _deal([payload.tensors[p].nbytes for p in names], size)))
    crcs = {}
    for part in comm.allgather_objects({p: _crc(a) for p, a in payload.tensors.items() if owner[p] == rank}):
        crcs.update(part)
    # attributes and the file name must be the same on every rank: rank 0's
    payload.created, pid = comm.allgather_objects((payload.created, os.getpid()))[0]
    tmp = path.parent / f".{path.name}.tmp-{pid}"
    try:
        with h5py.File(tmp, "w", driver="mpio", comm=comm.mpi, libver=_LIBVER) as f:
            _write_file(f, payload, crcs, mine=lambda p: owner[p] == rank)

        def verify_mine():
            with CheckpointFile(tmp) as f:
                f.verify_share(rank, size)

        # each rank: fsync its own writes (from its own node's cache) while it verifies its share of the file
        comm.agree(lambda: _fsync_during(tmp, verify_mine))
        if rank == 0:
            os.replace(tmp, path)
            fsync_dir(path.parent)
        comm.barrier()
    except BaseException:
        if rank == 0:
            _remove_quietly(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------------
# verify / load
# ---------------------------------------------------------------------------------------------------------------


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise UserError(f"{path}: checkpoint file does not exist")
    if not path.is_file():
        raise UserError(f"{path}: is not a regular file (expected an hpc_llm checkpoint .h5 file)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated file" in reason:
            raise UserError(f"{path}: checkpoint file is truncated ({reason})") from None
        raise UserError(f"{path}: not a readable HDF5 file (expected an hpc_llm checkpoint): {reason}") from None


def _check_header(f: h5py.File, path: Path) -> tuple[int, list[h5py.Dataset]]:
    """Format, version, completeness and structure; returns the format version and every dataset of the file."""
    fmt = _attr_str(f.attrs.get("format"))
    if fmt != FORMAT:
        raise UserError(f"{path}: not an hpc_llm checkpoint (root attribute format is {fmt!r}, expected {FORMAT!r})")
    version = f.attrs.get("format_version")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise UserError(f"{path}: attribute format_version is {version!r}, expected an integer") from None
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format_version {version} was written by a newer hpc_llm "
            f"(this is {__version__}, which reads format_version <= {FORMAT_VERSION})"
        )
    if version < 1:
        raise UserError(f"{path}: checkpoint format_version {version} is invalid, expected 1..{FORMAT_VERSION}")
    if not bool(f.attrs.get("complete", False)):
        raise UserError(f"{path}: checkpoint is incomplete (attribute complete is not set; the save was interrupted)")
    for group in ("params", "optimizer", "state", "config", "metrics"):
        if not isinstance(f.get(group), h5py.Group):
            raise UserError(f"{path}: checkpoint has no /{group} group")
    for obj, attr in ((f, "config_json"), (f["state"], "state_json"), (f, "manifest_json")):
        text = _attr_str(obj.attrs.get(attr))
        if text is None:
            raise UserError(f"{path}: checkpoint is missing attribute {attr} on {obj.name}")
        try:
            json.loads(text)
        except ValueError:
            raise UserError(f"{path}: attribute {attr} on {obj.name} is not valid JSON") from None
    manifest = json.loads(_attr_str(f.attrs["manifest_json"]))
    datasets = _datasets(f)  # one walk of the file; the checks below are lookups in it
    shapes = {d.name: d.shape for d in datasets}
    for name in manifest:
        if name not in shapes:
            raise UserError(f"{path}: checkpoint is missing dataset {name}")
    for name in f["params"]:
        if f"/params/{name}" not in shapes:
            raise UserError(f"{path}: /params/{name} is not a dataset")
    for table, group in f["metrics"].items():
        if not isinstance(group, h5py.Group) or not all(f"/metrics/{table}/{c}" in shapes for c in group):
            raise UserError(f"{path}: /metrics/{table} is not a group of 1-D datasets")
    for slot, group in f["optimizer"].items():
        if not isinstance(group, h5py.Group):
            raise UserError(f"{path}: /optimizer/{slot} is not a group of per-parameter datasets")
        for name in group:
            if shapes.get(f"/optimizer/{slot}/{name}", 0) != shapes.get(f"/params/{name}", 1):
                raise UserError(f"{path}: /optimizer/{slot}/{name} has no parameter /params/{name} of the same shape")
    return version, datasets


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    f.visititems(lambda _name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _check_crc(dset: h5py.Dataset, actual: int, path: Path) -> None:
    expected = dset.attrs.get("crc32")
    if expected is None:
        raise UserError(f"{path}: dataset {dset.name} has no crc32 attribute")
    if int(expected) != actual:
        raise UserError(
            f"{path}: checksum mismatch in dataset {dset.name} (stored crc32 {int(expected):#010x}, "
            f"data gives {actual:#010x}); the file is corrupt"
        )


def _check_crcs(datasets: list[h5py.Dataset], path: Path) -> None:
    """_check_crc of every dataset, two at a time: h5py reading one and zlib checksumming another both release the
    GIL, so the disk (or page cache) and the CPU work at once."""
    with ThreadPoolExecutor(2) as pool:
        for dset, crc in zip(datasets, pool.map(_dataset_crc, datasets)):
            _check_crc(dset, crc, path)


def _unreadable(path: Path, exc: Exception) -> UserError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"{path}: checkpoint is unreadable (truncated or corrupt?): {reason}")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise UserError unless ``path`` is a complete hpc_llm checkpoint whose every dataset matches its crc32."""
    with CheckpointFile(path) as f:  # one rank checking the whole file is a share of one
        f.verify_share(0, 1)


class CheckpointFile:
    """A checkpoint open for reading in pieces: what every rank of a resumed run uses, each reading only its
    hyperslabs. Opening checks the header and reads the small parts (state, config, metrics, each checksummed);
    ``shapes`` lists the tensors. Verification is shared: with ``share(part, parts)`` each of ``parts`` ranks takes
    a share of the datasets (dealt out by size, the same on every rank); ``read`` returns any hyperslab, and when it
    reads a whole dataset of this rank's share it checksums it on the side (the file is read once); then
    ``verify_share()`` checks the rest of the share and raises UserError on a mismatch. The ranks must agree on the
    verdict before they use what they read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = _open(self.path)
        try:
            f = self._f
            self.format_version, self._datasets = _check_header(f, self.path)
            self.state = _load_state(_attr_str(f["state"].attrs["state_json"]))
            self.config = json.loads(_attr_str(f.attrs["config_json"]))
            self.metrics = {table: {col: self._read_checked(d).astype(np.float64, copy=False) for col, d in g.items()}
                            for table, g in f["metrics"].items()}
            self.shapes = {"params": {name: d.shape for name, d in f["params"].items()},
                           **{f"optimizer/{slot}": {name: d.shape for name, d in g.items()}
                              for slot, g in f["optimizer"].items()}}
            self.software_version = _attr_str(f.attrs.get("software_version")) or ""
            self.created = _attr_str(f.attrs.get("created")) or ""
            self._mine: dict[str, h5py.Dataset] = {}  # this rank's share to verify, by dataset path
            self._pending: dict[str, Future] = {}  # checksums of whole datasets read, being computed
            self._pool = ThreadPoolExecutor(1)
            self._inflight: collections.deque[Future] = collections.deque()
        except BaseException as exc:
            self._f.close()
            if isinstance(exc, (OSError, KeyError, ValueError, RuntimeError, TypeError)):
                raise _unreadable(self.path, exc) from None
            raise

    def __enter__(self) -> "CheckpointFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._f.close()

    def _read_checked(self, dset: h5py.Dataset) -> np.ndarray:
        arr = _contiguous(dset[()])
        _check_crc(dset, _crc(arr), self.path)
        return arr

    def read(self, group: str, name: str, index: tuple = (), out: np.ndarray | None = None) -> np.ndarray:
        """``/<group>/<name>[index]`` (group "params" or "optimizer/m", ...): only that hyperslab is read; into
        ``out`` (C-contiguous, the slab's shape, any float dtype: HDF5 converts) when given, else a new array.
        ``out`` must then stay unchanged until ``verify_share`` (its checksum may be computed from it)."""
        try:
            dset = self._f[group][name]
            if out is None:
                out = np.asarray(dset[index])
            else:
                dset.read_direct(out, source_sel=index or None)
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise _unreadable(self.path, exc) from None
        key = f"/{group}/{name}"
        if key in self._mine and key not in self._pending and out.shape == dset.shape and out.dtype == dset.dtype:
            self._pending[key] = self._pool.submit(_crc, out)  # read whole: checksum those bytes, on the side
            self._inflight.append(self._pending[key])
            while len(self._inflight) > 4:  # the checksums fell behind: don't keep more arrays alive for them
                self._inflight.popleft().result()
        return out

    def settle(self) -> None:
        """Wait for the checksums being computed from arrays ``read`` returned, so the caller may reuse them."""
        while self._inflight:
            self._inflight.popleft().result()

    def share(self, part: int, parts: int) -> None:
        """Make this rank part ``part`` of ``parts`` for ``verify_share``: the datasets are dealt out by size."""
        datasets = sorted(self._datasets, key=lambda d: d.name)
        owners = _deal([d.size * d.dtype.itemsize for d in datasets], parts)
        self._mine = {d.name: d for d, who in zip(datasets, owners) if who == part}

    def read_whole(self, group: str, name: str, verify: bool = True) -> np.ndarray:
        try:
            dset = self._f[group][name]
            return self._read_checked(dset) if verify else _contiguous(dset[()])
        except UserError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise _unreadable(self.path, exc) from None

    def verify_share(self, part: int | None = None, parts: int | None = None) -> None:
        """Checksum this rank's share of the datasets (``share(part, parts)`` first, or pass them here): those read
        whole by ``read`` from their bytes then, the others now. ``parts`` ranks together check every dataset once."""
        if part is not None:
            self.share(part, parts)
        try:
            for key, crc in self._pending.items():
                _check_crc(self._mine[key], crc.result(), self.path)
            _check_crcs([d for key, d in self._mine.items() if key not in self._pending], self.path)
        except UserError:
            raise
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise _unreadable(self.path, exc) from None


def load_checkpoint(path: str | os.PathLike, verify: bool = True, optimizer: bool = True) -> Checkpoint:
    """Read a whole checkpoint into memory. With ``verify`` every dataset's crc32 is checked as it is read;
    without it the header checks (format, version, complete) still apply. ``optimizer=False`` skips the Adam moments
    (two thirds of the file; inference needs none of it): ``Checkpoint.optimizer`` is then empty."""
    with CheckpointFile(path) as f:
        if verify:  # stray datasets outside the groups read below must still carry a correct checksum
            for dset in f._datasets:
                if dset.name.split("/")[1] not in {"params", "optimizer", "metrics"}:
                    _check_crc(dset, _dataset_crc(dset), f.path)
        params = {name: f.read_whole("params", name, verify) for name in f.shapes["params"]}
        moments = {}
        if optimizer:
            for group, names in f.shapes.items():
                if group.startswith("optimizer/"):
                    moments[group.split("/", 1)[1]] = {name: f.read_whole(group, name, verify) for name in names}
        return Checkpoint(params=params, optimizer=moments, state=f.state, config=f.config, metrics=f.metrics,
                          path=f.path, format_version=f.format_version, software_version=f.software_version,
                          created=f.created)


# ---------------------------------------------------------------------------------------------------------------
# run directory: ckpt_XXXXXXXX.h5, the `latest` pointer, --resume auto, retention
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """``out_dir/ckpt_{step:08d}.h5``."""
    if int(step) < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return Path(out_dir) / f"ckpt_{int(step):08d}.h5"


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
        elif ".tmp-" in entry.name and entry.name.startswith(".ckpt_"):
            log.warning("skipping %s: temporary file left by an interrupted save", entry)
    found.sort(key=lambda item: (item[0], item[1].name), reverse=True)
    return found


def remove_interrupted_saves(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves that were killed (``.ckpt_*.h5.tmp-<pid>``). Only for the one process
    that writes ``out_dir``'s checkpoints, before it saves: another live writer's temporary file would go too."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    stale = [e for e in out_dir.iterdir() if e.name.startswith(".ckpt_") and ".tmp-" in e.name and e.is_file()]
    for path in stale:
        path.unlink()
        log.info("removed %s, left by an interrupted save", path)
    return stale


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except UserError as exc:
        log.warning("skipping checkpoint: %s", exc)
        return False


def find_latest(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from (``--resume auto``): the newest (highest step) ``ckpt_*.h5`` that verifies, else
    the file ``latest`` names if it lies elsewhere and verifies, else None. The newest file, not the pointer, comes
    first: a save killed between its rename and the pointer's update leaves a complete, verified newer file.
    Each skipped file is logged as a warning."""
    listed = list_checkpoints(out_dir)
    for _step, path in listed:
        if _verifies(path):
            return path
    pointed = read_latest(out_dir)
    if pointed is not None and all(pointed.resolve() != p.resolve() for _s, p in listed) and _verifies(pointed):
        return pointed
    return None


def _header_ok(path: Path) -> bool:
    """Cheap check (no checksums): ours, complete, a format this version understands."""
    try:
        f = _open(path)
        with f:
            _check_header(f, path)
        return True
    except (UserError, OSError, KeyError, ValueError, RuntimeError):
        return False


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int, verified=()) -> list[Path]:
    """Remove all but the newest ``keep_last`` verified ``ckpt_*.h5`` in ``out_dir``; return the removed paths.

    Never removes the file ``latest`` names. Files are verified newest first until ``keep_last`` good ones are
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
        if not _header_ok(path):
            log.warning("not pruning %s: not a complete hpc_llm checkpoint this version understands", path)
            continue
        path.unlink()
        removed.append(path)
        log.info("pruned old checkpoint %s", path)
    if removed:
        fsync_dir(Path(out_dir))
    return removed
