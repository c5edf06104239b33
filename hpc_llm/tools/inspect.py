"""`hpc-llm inspect`: print what a checkpoint holds, or compare two checkpoints tensor by tensor.

Each argument is a checkpoint file or a run directory (its newest verified checkpoint). The file is verified
(checksums) first, so a corrupt file gives the usual one-line UserError; tensors are then read one at a time with
h5py and their statistics computed in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from hpc_llm.api import resolve_checkpoint
from hpc_llm.checkpoint import verify_checkpoint
from hpc_llm.checkpoint.format import attr_str
from hpc_llm.errors import UserError


def open_verified(arg) -> tuple[Path, h5py.File]:
    """Resolve ``arg`` (file or run directory), verify it, and open it read-only."""
    path = Path(arg)
    if path.is_dir():
        path = resolve_checkpoint(path)  # already verified by find_latest
    else:
        verify_checkpoint(path)
    try:
        return path, h5py.File(path, "r")
    except OSError as exc:
        raise UserError(
            f"{path}: cannot open checkpoint: {str(exc).splitlines()[0] if str(exc) else exc}"
        ) from None


def tensor_names(f: h5py.File) -> list[str]:
    """Every tensor dataset: ``params/<name>`` then ``optimizer/<slot>/<name>``, in creation order."""
    names = [f"params/{n}" for n in f["params"]]
    for slot, group in f["optimizer"].items():
        names += [f"optimizer/{slot}/{n}" for n in group]
    return names


def _json_attr(obj, key: str):
    return json.loads(attr_str(obj.attrs[key]))


def _shape(shape: tuple) -> str:
    return "x".join(str(n) for n in shape) if shape else "scalar"


def _num(x: float) -> str:
    return "-" if np.isnan(x) else f"{x:.6g}"


def tensor_stats(a: np.ndarray) -> dict[str, float]:
    """L2 norm, mean, std, min, max in float64 (NaN for the last four when the tensor is empty)."""
    x = np.asarray(a, dtype=np.float64)
    if x.size == 0:
        return {"norm": 0.0, "mean": np.nan, "std": np.nan, "min": np.nan, "max": np.nan}
    return {
        "norm": float(np.linalg.norm(x.ravel())),
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
    }


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"n_layer": 2}} -> {"model.n_layer": 2}."""
    out: dict[str, object] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def describe(arg) -> list[str]:
    """The report for one checkpoint, as lines."""
    path, f = open_verified(arg)
    with f:
        state = _json_attr(f["state"], "state_json")
        config = _json_attr(f, "config_json")
        lines = [
            f"checkpoint        {path}",
            f"step              {state.get('step', '-')}",
            f"tokens_seen       {state.get('tokens_seen', '-')}",
            f"layout            {json.dumps(state['layout']) if 'layout' in state else '-'}",
            f"software_version  {attr_str(f.attrs.get('software_version')) or '-'}",
            f"format_version    {int(f.attrs['format_version'])}",
            f"created           {attr_str(f.attrs.get('created')) or '-'}",
            "model config:",
        ]
        model = config.get("model")
        if isinstance(model, dict) and model:
            lines += [f"  {k} = {json.dumps(v)}" for k, v in flatten(model).items()]
        else:
            lines.append("  (none)")

        rows = [["name", "shape", "dtype", "l2_norm", "mean", "std", "min", "max"]]
        for name in tensor_names(f):
            dset = f[name]
            s = tensor_stats(dset[()])  # one tensor in memory at a time
            rows.append(
                [name, _shape(dset.shape), str(dset.dtype)]
                + [_num(s[k]) for k in ("norm", "mean", "std", "min", "max")]
            )
        lines.append(f"tensors ({len(rows) - 1}):")
        lines += _table(rows) if len(rows) > 1 else ["  (none)"]

        lines.append("metrics:")
        if not len(f["metrics"]):
            lines.append("  (none)")
        for table, group in f["metrics"].items():
            lengths = {col: d.shape[0] for col, d in group.items()}
            last = ", ".join(
                f"{col}={_num(float(d[-1]))}" for col, d in group.items() if d.shape[0]
            )
            n = sorted(set(lengths.values()))
            rows_text = (
                str(n[0]) if len(n) == 1 else ", ".join(f"{c}={k}" for c, k in lengths.items())
            )
            lines.append(f"  {table}: rows {rows_text or 0}; last {last or '-'}")
    return lines


def compare_tensors(a: np.ndarray, b: np.ndarray) -> dict:
    """Bitwise identity, max |a-b| and ||a-b|| / max(||a||, ||b||), in float64; shapes must be equal."""
    a = np.ascontiguousarray(a)
    b = np.ascontiguousarray(b)
    identical = a.dtype == b.dtype and a.tobytes() == b.tobytes()
    x = a.astype(np.float64).ravel()
    y = b.astype(np.float64).ravel()
    diff = x - y
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    scale = max(float(np.linalg.norm(x)), float(np.linalg.norm(y)))
    dnorm = float(np.linalg.norm(diff))
    rel = dnorm / scale if scale > 0 else (0.0 if dnorm == 0 else np.inf)
    return {"identical": identical, "max_abs": max_abs, "rel_l2": rel}


def compare(arg_a, arg_b) -> list[str]:
    """The report comparing two checkpoints, as lines; the last line is the one-line summary."""
    path_a, fa = open_verified(arg_a)
    path_b, fb = open_verified(arg_b)
    with fa, fb:
        steps = [_json_attr(f["state"], "state_json").get("step", "-") for f in (fa, fb)]
        lines = [f"A  {path_a}  (step {steps[0]})", f"B  {path_b}  (step {steps[1]})"]

        ca, cb = (flatten(_json_attr(f, "config_json")) for f in (fa, fb))
        missing = "<missing>"
        diffs = [
            (k, ca.get(k, missing), cb.get(k, missing))
            for k in sorted(set(ca) | set(cb))
            if ca.get(k, missing) != cb.get(k, missing)
        ]
        lines.append(f"config differences ({len(diffs)}):")
        lines += [
            f"  {k}: {v if v is missing else json.dumps(v)} -> {w if w is missing else json.dumps(w)}"
            for k, v, w in diffs
        ] or ["  (none)"]

        names_a, names_b = tensor_names(fa), tensor_names(fb)
        set_a, set_b = set(names_a), set(names_b)
        common = [n for n in names_a if n in set_b]
        only = [(n, "A") for n in names_a if n not in set_b] + [
            (n, "B") for n in names_b if n not in set_a
        ]
        n_same = n_diff = 0
        rows = [["name", "shape", "result", "max_abs_diff", "rel_l2_diff"]]
        for name in common:
            da, db = fa[name], fb[name]
            if da.shape != db.shape:
                n_diff += 1
                rows.append(
                    [name, f"{_shape(da.shape)} vs {_shape(db.shape)}", "shape differs", "-", "-"]
                )
                continue
            c = compare_tensors(da[()], db[()])
            n_same += c["identical"]
            n_diff += not c["identical"]
            rows.append(
                [
                    name,
                    _shape(da.shape),
                    "identical" if c["identical"] else "differs",
                    _num(c["max_abs"]),
                    _num(c["rel_l2"]),
                ]
            )
        lines.append(f"tensors in both ({len(common)}):")
        lines += _table(rows) if common else ["  (none)"]
        if only:
            lines.append(f"tensors only in one ({len(only)}):")
            lines += [f"  {name}  only in {side}" for name, side in only]
        lines.append(f"{n_same} tensors identical, {n_diff} differ, {len(only)} only in one")
    return lines


def run(paths: list[str]) -> None:
    """`hpc-llm inspect CKPT` or `hpc-llm inspect A B`: print the report to stdout."""
    if len(paths) not in (1, 2):
        raise UserError(f"inspect: expected one checkpoint or two to compare, got {len(paths)}")
    try:
        lines = describe(paths[0]) if len(paths) == 1 else compare(paths[0], paths[1])
    except (
        OSError,
        KeyError,
        ValueError,
        TypeError,
    ) as exc:  # the file changed under us, or an odd attribute
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"inspect: cannot read checkpoint: {reason}") from None
    print("\n".join(lines))
