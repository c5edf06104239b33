"""The serial API: a checkpoint written by one process from arrays in memory (tests, tools, the API), through the
same engine as a run's saves (writers.py), with one rank and its own exceptions."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from hpc_llm.checkpoint import format as fmt
from hpc_llm.checkpoint.slabs import Out, whole
from hpc_llm.checkpoint.writers import Save
from hpc_llm.parallel.comm import Comm


def _arrays(params, optimizer, metrics) -> dict[str, np.ndarray]:
    """Validated arrays by dataset path, in file order (parameters, optimizer slots, metrics columns)."""
    tensors: dict[str, np.ndarray] = {}
    for name, value in params.items():
        fmt.check_name(name, "parameter")
        tensors[f"params/{name}"] = fmt.as_array(value, f"params[{name!r}]")
    for slot, named in optimizer.items():
        fmt.check_name(slot, "optimizer slot")
        for name, value in named.items():
            if f"params/{name}" not in tensors:
                raise ValueError(
                    f"checkpoint: optimizer[{slot!r}] has {name!r}, which is not a parameter"
                )
            arr = fmt.as_array(value, f"optimizer[{slot!r}][{name!r}]")
            if arr.shape != tensors[f"params/{name}"].shape:
                raise ValueError(
                    f"checkpoint: optimizer[{slot!r}][{name!r}] has shape {arr.shape}, "
                    f"expected the parameter's {tensors[f'params/{name}'].shape}"
                )
            tensors[f"optimizer/{slot}/{name}"] = arr
    for table, columns in metrics.items():
        fmt.check_name(table, "metrics table")
        for column, values in columns.items():
            fmt.check_name(column, "metrics column")
            arr = fmt.contiguous(np.asarray(values, dtype=np.float64))
            if arr.ndim != 1:
                raise ValueError(
                    f"checkpoint: metrics[{table!r}][{column!r}] must be 1-D, got shape {arr.shape}"
                )
            tensors[f"metrics/{table}/{column}"] = arr
    return tensors


def save_checkpoint(
    path: str | os.PathLike,
    *,
    params: dict[str, np.ndarray],
    optimizer: dict[str, dict[str, np.ndarray]],
    state: dict,
    config: dict,
    metrics: dict[str, dict[str, Any]],
) -> None:
    """Write a checkpoint from this one process, atomically: temp file, fsync, verify, ``os.replace``, fsync of the
    directory. A failure raises the original exception after the temporary file is removed.

    ``params``: name -> array (full logical shape). ``optimizer``: slot -> name -> array, names and shapes a subset
    of ``params``. ``state``: JSON-able dict (ints of any size, floats, str, lists, tuples, small arrays).
    ``config``: plain JSON dict. ``metrics``: table -> column -> 1-D sequence, stored as float64.
    Dtypes of params/optimizer arrays are kept exactly, so a load is bitwise.
    """
    tensors = _arrays(params, optimizer, metrics)
    header = fmt.make_header(state, config)
    outs = [
        Out(p, a.shape, a.dtype, 0, whole(0, lambda lo, hi, a=a: a.reshape(-1)[lo:hi]))
        for p, a in tensors.items()
    ]
    Save(path, outs, header, Comm(None), mpio=False, step=state.get("step"), agree=False).run()


def save_fresh_checkpoint(path, params: dict, state: dict, config: dict) -> None:
    """Weights alone, as a fresh trainer saves them at step 0: zero Adam moments, no history, step, tokens_seen and
    adam_t 0 (``state`` adds the rest: tokenizer, data_path, ...). What import-gpt2 and merge-lora write, so that
    --resume, train.init_from and load_model take it like any checkpoint."""
    optimizer = {
        slot: {name: np.zeros_like(p) for name, p in params.items()} for slot in ("m", "v")
    }
    save_checkpoint(
        path,
        params=params,
        optimizer=optimizer,
        state={"step": 0, "tokens_seen": 0, "adam_t": 0, **state},
        config=config,
        metrics=fmt.empty_metrics(),
    )
