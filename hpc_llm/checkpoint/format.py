"""The checkpoint file format: layout, manifest, checksums, header checks (docs/checkpoint-format.md).

Everything here is about one HDF5 file and nothing about who writes it: what the root, /state and /config attributes
hold, how datasets are created (contiguous tensors, extendable metrics columns), the JSON of the training state, the
CRC32 of a dataset's C-order bytes, and the checks a reader makes before it trusts a file.
"""

from __future__ import annotations

import collections
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpc_llm import __version__
from hpc_llm.errors import UserError

FORMAT = "hpc_llm-checkpoint"
FORMAT_VERSION = 1

# HDF5 1.8 object headers are the oldest that allow attributes over 64 KiB (dense attribute storage); capping the
# newest format at 1.10 keeps files readable by the HDF5 1.10 that Debian's MPI-enabled h5py links against.
LIBVER = ("v108", "v110")
METRIC_CHUNK = 1024  # elements per chunk of a /metrics column
VERIFY_BLOCK_BYTES = 64 << 20  # verification reads datasets in slabs of about this size
GROUPS = ("params", "optimizer", "metrics")
# root attribute of a checkpoint written in parts (checkpoint/parts.py): its part files, relative to its directory
PARTS_ATTR = "parts_json"
# the /metrics tables of a training checkpoint and their columns: the trainer's Metrics keeps rows of these, and the
# tools that write a step-0 checkpoint (import-gpt2, merge-lora) store them empty, as a fresh run would
METRICS_COLUMNS = {
    "train": (
        "step",
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "mfu",
        "comm_seconds",
        "comm_bytes",
        "loss_scale",
        "skipped_steps",
    ),
    "eval": ("step", "train_loss", "val_loss"),
}


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
    raise TypeError(
        f"checkpoint state: {where} has type {type(obj).__name__}, which cannot be stored as JSON"
    )


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


def dump_state(state: dict) -> str:
    return json.dumps(_to_json_tree(state, "state"))


def load_state(text: str) -> dict:
    return _from_json_tree(json.loads(text))


# ---------------------------------------------------------------------------------------------------------------
# names, arrays, checksums
# ---------------------------------------------------------------------------------------------------------------


def check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"checkpoint: {what} name {name!r} must be a non-empty string without '/'")


def contiguous(value: Any) -> np.ndarray:
    """C-contiguous array; unlike np.ascontiguousarray it keeps 0-d arrays 0-d."""
    arr = np.asarray(value)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def as_array(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"checkpoint: {where} is a {type(value).__name__}, expected a numpy.ndarray (host memory)"
        )
    if value.dtype.kind not in "biufc":
        raise TypeError(f"checkpoint: {where} has unsupported dtype {value.dtype}")
    return contiguous(value)


def crc(arr: np.ndarray, value: int = 0) -> int:
    """zlib.crc32 of the array's C-order bytes, continuing from ``value``: the checksum of a dataset is the crc of its
    blocks in file order, so a writer can compute it block by block as it writes."""
    arr = contiguous(arr)
    if arr.size == 0:
        return value
    return zlib.crc32(arr.reshape(-1).view(np.uint8), value)


# zlib's CRC-32 polynomial (reflected) and x^(2^k) mod it, k = 0..31: what crc_combined needs, as in zlib's
# crc32_combine, vectorised over many segments at once
_CRC_POLY = np.uint64(0xEDB88320)


def _multmodp(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a(x) b(x) modulo the CRC polynomial, elementwise (reflected bit order, as zlib's multmodp)."""
    a, b = np.asarray(a, np.uint64), np.array(b, np.uint64)
    p = np.zeros(np.broadcast(a, b).shape, np.uint64)
    one = np.uint64(1)
    for i in range(32):
        p ^= np.where(a & np.uint64(1 << (31 - i)), b, np.uint64(0))
        b = np.where(b & one, (b >> one) ^ _CRC_POLY, b >> one)
    return p


def _x2n_table() -> list[np.uint64]:
    table = [np.uint64(1 << 30)]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1])[()])
    return table


_X2N = _x2n_table()


def crc_shifted(crcs, after_bytes) -> np.ndarray:
    """Each segment's share of the CRC32 of a whole byte string, from the segment's own crc
    (``zlib.crc32(segment)``) and the number of bytes that follow it in the string: crc32_combine's algebra,
    crc(A + B) = crc(A) x^(8|B|) + crc(B), makes the whole's crc the XOR of every segment's crc(S) x^(8 after), in
    any order. Ranks that each write some segments of a dataset compute their shares apart."""
    crcs = np.asarray(crcs, np.uint64).reshape(-1)
    n = np.asarray(after_bytes, np.uint64).reshape(-1)
    p = np.full(n.shape, 1 << 31, np.uint64)  # x^0
    k = 0
    while n.size and (n >> np.uint64(k)).any():
        bit = (n >> np.uint64(k)) & np.uint64(1)
        if bit.any():
            p = np.where(bit, _multmodp(_X2N[(k + 3) & 31], p), p)
        k += 1
    return _multmodp(p, crcs)


def crc_combined(crcs, after_bytes) -> int:
    """The CRC32 of a byte string from its segments' (crc_shifted)."""
    return int(np.bitwise_xor.reduce(crc_shifted(crcs, after_bytes), initial=np.uint64(0)))


def dataset_crc(dset: h5py.Dataset) -> int:
    """CRC32 of a dataset's C-order bytes, read in slabs along axis 0 so memory stays bounded."""
    if dset.ndim == 0 or dset.size == 0:
        return crc(np.asarray(dset[()]))
    row_bytes = max(1, dset.dtype.itemsize * (dset.size // dset.shape[0]))
    rows = max(1, VERIFY_BLOCK_BYTES // row_bytes)
    value = 0
    for start in range(0, dset.shape[0], rows):
        value = crc(dset[start : start + rows], value)
    return value


def attr_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "SUO":
        return attr_str(value.item())
    return value if isinstance(value, str) else None


def deal(sizes: list[int], parts: int) -> list[int]:
    """Which of ``parts`` ranks takes each item: largest first, each to the rank with the fewest bytes so far.
    The same on every rank, so ranks can share the datasets of a file without talking."""
    load, owner = [0] * parts, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner[i] = min(range(parts), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


# ---------------------------------------------------------------------------------------------------------------
# writing a file's structure (under mpio every call here is collective: every rank makes them alike)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Header:
    """The small parts of a checkpoint, serialised before the file is touched: the same on every writing rank."""

    state: dict
    state_json: str
    config_json: str
    created: str


def make_header(state: dict, config: dict) -> Header:
    """The header of a save made now: ``state`` (the trainer's counters, JSON-able) and ``config`` (a plain dict)."""
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return Header(state, dump_state(state), json.dumps(config), created)


def empty_metrics() -> dict[str, dict[str, list]]:
    """The metrics tables (METRICS_COLUMNS) with no rows, as save_checkpoint takes them."""
    return {table: {column: [] for column in columns} for table, columns in METRICS_COLUMNS.items()}


def write_header(f: h5py.File, header: Header) -> None:
    """The root attributes (but manifest_json and complete, which come last), /state and /config, the groups."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = np.int64(FORMAT_VERSION)
    f.attrs["software_version"] = __version__
    f.attrs["created"] = header.created
    step = header.state.get("step")
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
        f.attrs["step"] = np.int64(step)
    f.attrs["config_json"] = header.config_json
    for group in GROUPS:
        f.create_group(group, track_order=True)
    g = f.create_group("state")
    g.attrs["state_json"] = header.state_json
    for key, value in header.state.items():
        if key == "state_json":
            continue
        if isinstance(value, (bool, np.bool_, str)):
            g.attrs[key] = value
        elif isinstance(value, (int, np.integer)) and -(2**63) <= int(value) < 2**63:
            g.attrs[key] = np.int64(value)
        elif isinstance(value, (float, np.floating)):
            g.attrs[key] = np.float64(value)
    f.create_group("config").attrs["config_json"] = header.config_json


def create_dataset(f: h5py.File, path: str, shape: tuple, dtype) -> h5py.Dataset:
    """Tensors contiguous (a reader takes hyperslabs; get_offset works); /metrics columns chunked and extendable."""
    parent = path.rsplit("/", 1)[0]
    if parent not in f:
        f.create_group(parent, track_order=True)
    if path.startswith("metrics/"):
        return f.create_dataset(
            path, shape=shape, maxshape=(None,), chunks=(METRIC_CHUNK,), dtype=dtype
        )
    return f.create_dataset(path, shape=shape, dtype=dtype)


def write_trailer(f: h5py.File, dsets: dict[str, h5py.Dataset], crcs: dict[str, int]) -> None:
    """Each dataset's crc32, the manifest, and ``complete`` last: a file without it was not finished."""
    for path, dset in dsets.items():
        dset.attrs["crc32"] = np.int64(crcs[path])
    f.attrs["manifest_json"] = json.dumps(["/" + p for p in dsets])
    f.attrs["complete"] = True


# ---------------------------------------------------------------------------------------------------------------
# checks a reader makes
# ---------------------------------------------------------------------------------------------------------------


def open_file(path: Path, locking: bool = True) -> h5py.File:
    """``path`` opened read-only (serial driver), or a one-line UserError that names it. HDF5's shared lock is held
    while it is open (the pruner leaves such a file alone), except with ``locking=False``: a save's own temporary
    file, whose name no one else knows (a lock there only collides with a copy of the writer's descriptor that a
    subprocess forked meanwhile still holds: "unable to lock file, errno = 11")."""
    if not path.exists():
        raise UserError(f"{path}: checkpoint file does not exist")
    if not path.is_file():
        raise UserError(f"{path}: is not a regular file (expected an hpc_llm checkpoint .h5 file)")
    try:
        # locking=True is HDF5's default (None), not h5py's True: the two differ in "ignore disabled locks", and one
        # process opening a file twice with different flags (inspect A A, a reader beside the API) is refused
        return h5py.File(path, "r", locking=None if locking else False)
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "truncated file" in reason:
            raise UserError(f"{path}: checkpoint file is truncated ({reason})") from None
        raise UserError(
            f"{path}: not a readable HDF5 file (expected an hpc_llm checkpoint): {reason}"
        ) from None


def datasets(f: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    f.visititems(lambda _name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _check_version(f: h5py.File, path: Path) -> int:
    """An hpc_llm checkpoint of a format version this code reads, completely written; returns the version."""
    fmt = attr_str(f.attrs.get("format"))
    if fmt != FORMAT:
        raise UserError(
            f"{path}: not an hpc_llm checkpoint (root attribute format is {fmt!r}, expected {FORMAT!r})"
        )
    version = f.attrs.get("format_version")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise UserError(
            f"{path}: attribute format_version is {version!r}, expected an integer"
        ) from None
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path}: checkpoint format_version {version} was written by a newer hpc_llm "
            f"(this is {__version__}, which reads format_version <= {FORMAT_VERSION})"
        )
    if version < 1:
        raise UserError(
            f"{path}: checkpoint format_version {version} is invalid, expected 1..{FORMAT_VERSION}"
        )
    if not bool(f.attrs.get("complete", False)):
        raise UserError(
            f"{path}: checkpoint is incomplete (attribute complete is not set; the save was interrupted)"
        )
    return version


def _check_structure(f: h5py.File, path: Path) -> list[h5py.Dataset]:
    """The groups, the JSON attributes, and every dataset the manifest names; returns every dataset of the file."""
    for group in ("params", "optimizer", "state", "config", "metrics"):
        if not isinstance(f.get(group), h5py.Group):
            raise UserError(f"{path}: checkpoint has no /{group} group")
    for obj, attr in ((f, "config_json"), (f["state"], "state_json"), (f, "manifest_json")):
        text = attr_str(obj.attrs.get(attr))
        if text is None:
            raise UserError(f"{path}: checkpoint is missing attribute {attr} on {obj.name}")
        try:
            json.loads(text)
        except ValueError:
            raise UserError(f"{path}: attribute {attr} on {obj.name} is not valid JSON") from None
    manifest = json.loads(attr_str(f.attrs["manifest_json"]))
    for name in json.loads(attr_str(f.attrs.get(PARTS_ATTR)) or "[]"):
        # a missing part would read as zeros through its virtual datasets
        if not (path.parent / name).is_file():
            raise UserError(f"{path}: checkpoint part {name} is missing")
    found = datasets(f)  # one walk of the file; the checks below are lookups in it
    shapes = {d.name: d.shape for d in found}
    for name in manifest:
        if name not in shapes:
            raise UserError(f"{path}: checkpoint is missing dataset {name}")
    for name in f["params"]:
        if f"/params/{name}" not in shapes:
            raise UserError(f"{path}: /params/{name} is not a dataset")
    for table, group in f["metrics"].items():
        if not isinstance(group, h5py.Group) or not all(
            f"/metrics/{table}/{c}" in shapes for c in group
        ):
            raise UserError(f"{path}: /metrics/{table} is not a group of 1-D datasets")
    for slot, group in f["optimizer"].items():
        if not isinstance(group, h5py.Group):
            raise UserError(f"{path}: /optimizer/{slot} is not a group of per-parameter datasets")
        for name in group:
            if shapes.get(f"/optimizer/{slot}/{name}", 0) != shapes.get(f"/params/{name}", 1):
                raise UserError(
                    f"{path}: /optimizer/{slot}/{name} has no parameter /params/{name} of the same shape"
                )
    return found


def check_header(f: h5py.File, path: Path) -> tuple[int, list[h5py.Dataset]]:
    """Format, version, completeness and structure; returns the format version and every dataset of the file."""
    version = _check_version(f, path)
    return version, _check_structure(f, path)


def check_crc(dset: h5py.Dataset, actual: int, path: Path) -> None:
    expected = dset.attrs.get("crc32")
    if expected is None:
        raise UserError(f"{path}: dataset {dset.name} has no crc32 attribute")
    if int(expected) != actual:
        raise UserError(
            f"{path}: checksum mismatch in dataset {dset.name} (stored crc32 {int(expected):#010x}, "
            f"data gives {actual:#010x}); the file is corrupt"
        )


def check_crcs(dsets: list[h5py.Dataset], path: Path) -> None:
    """check_crc of every dataset, two at a time: h5py reading one and zlib checksumming another both release the
    GIL, so the disk (or page cache) and the CPU work at once (never more than two slabs in memory)."""
    with ThreadPoolExecutor(2) as pool:
        pending: collections.deque = collections.deque()
        for dset in dsets:
            pending.append((dset, pool.submit(dataset_crc, dset)))
            # two being read, one queued: no thread waits, no more slabs in memory
            if len(pending) > 2:
                done, value = pending.popleft()
                check_crc(done, value.result(), path)
        for done, value in pending:
            check_crc(done, value.result(), path)


def unreadable(path: Path, exc: Exception) -> UserError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"{path}: checkpoint is unreadable (truncated or corrupt?): {reason}")
