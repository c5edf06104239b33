"""The bad-input table: every CLI verb and every config field given a value of the wrong type, out of range
or inconsistent with another field; a missing, empty, truncated or foreign file (config, token files, meta.json,
checkpoint, Hugging Face directory, cluster file); generate options out of range.

Each row of ROWS is run as a real process, `python -m hpc_llm ARGV` in its own fresh directory (the cwd, holding
the row's files), once alone and once as `mpiexec -n 2` (each rank's stdout, stderr and exit status captured apart).
Every run must: exit 2 on every rank; print on stderr exactly one line, `hpc-llm: error: ...`, containing the row's
expected text (the same line on both ranks); print no traceback; and leave its directory exactly as it was (every
file's bytes, no file or directory added or removed).

The runs are independent processes, so they run a few at a time (they mostly wait on MPI start-up); the one test per
(row, ranks) then checks its run's record. `pytest -k ID` runs only the selected rows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from helpers import FIXTURES, REPO, kill_session

import hpc_llm
from hpc_llm.config import Config
from hpc_llm.data.prepare import prepare

HF_FIXTURE = FIXTURES / "hf_gpt2_tiny"
CLUSTER = REPO / "inputs" / "clusters" / "h100_nvlink_ib400.toml"
RUN_TIMEOUT = 120  # seconds for one run (a hang at 2 ranks is a failure, not a stuck suite)
WORKERS = 8  # concurrent runs: each mostly waits on process and MPI start-up
TEST_TIMEOUT = 600  # the first test also waits for every run (about 2 minutes on 2 cores)


# -- the files a row creates in its directory ------------------------------------------------------------------------
#
# A recipe's make(path, base) writes one file or directory at `path`; a str or bytes is written as it is.

BASE_CONFIG = {
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16},
    "data": {"path": "{data}"},
    "train": {
        "batch_size": 4,
        "max_iters": 2,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "warmup_iters": 1,
        "lr_decay_iters": 2,
        "eval_interval": 1000,
        "eval_iters": 2,
        "log_interval": 1000,
        "peak_tflops": 1.0,
        "out_dir": "run",
    },
}


class Cfg:
    """A tiny valid train config (2 steps) with `changes` = {"section.key": value (None: remove the key)} applied;
    values are written as JSON writes them (TOML's strings, numbers, booleans, arrays)."""

    def __init__(self, changes: dict | None = None, extra: str = ""):
        self.changes, self.extra = changes or {}, extra

    def make(self, path: Path, base: dict) -> None:
        cfg = {section: dict(values) for section, values in BASE_CONFIG.items()}
        for key, value in self.changes.items():
            section, name = key.split(".", 1)
            if value is None:
                cfg.get(section, {}).pop(name, None)
            else:
                cfg.setdefault(section, {})[name] = value
        lines = []
        for section, values in cfg.items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                if isinstance(value, str):
                    value = value.format(**base)
                lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        path.write_text("\n".join(lines) + self.extra)


class Data:
    """A copy of the base byte-tokenized data directory (vocab 256), edited: meta = {field: value (None: remove)}
    or meta_text (the whole file); train/val = bytes, or a function of the file's bytes; drop = files to remove."""

    def __init__(
        self,
        src: str = "data",
        meta: dict | None = None,
        meta_text: str | bytes | None = None,
        train=None,
        val=None,
        drop: tuple = (),
    ):
        self.src, self.meta, self.meta_text, self.train, self.val, self.drop = (
            src,
            meta,
            meta_text,
            train,
            val,
            drop,
        )

    def make(self, path: Path, base: dict) -> None:
        shutil.copytree(base[self.src], path)
        meta_path = path / "meta.json"
        if self.meta is not None:
            meta = json.loads(meta_path.read_text())
            for key, value in self.meta.items():
                if value is None:
                    meta.pop(key, None)
                else:
                    meta[key] = value
            meta_path.write_text(json.dumps(meta))
        if self.meta_text is not None:
            write(meta_path, self.meta_text)
        for name, edit in (("train.bin", self.train), ("val.bin", self.val)):
            if edit is not None:
                f = path / name
                f.write_bytes(edit(f.read_bytes()) if callable(edit) else edit)
        for name in self.drop:
            (path / name).unlink()


def tokens(ids) -> bytes:
    return np.asarray(ids, dtype="<u2").tobytes()


class Ckpt:
    """The base checkpoint (a char-tokenized 1-layer model, 2 steps), copied, then made bad: "empty", "text",
    "truncated" (its first half), "foreign" (an HDF5 file of another program), "corrupt" (a tensor changed, its crc32
    not), "incomplete" (the complete flag unset), "future" (format_version 99), "dir" (a directory)."""

    def __init__(self, kind: str = "copy"):
        self.kind = kind

    def make(self, path: Path, base: dict) -> None:
        import h5py

        kind = self.kind
        if kind == "dir":
            path.mkdir()
        elif kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("step 100, loss 1.5\n")
        elif kind == "foreign":
            with h5py.File(path, "w") as f:
                f["data"] = np.arange(10.0)
                f.attrs["creator"] = "another program"
        else:
            shutil.copyfile(base["ckpt"], path)
            if kind == "truncated":
                with open(path, "r+b") as f:
                    f.truncate(path.stat().st_size // 2)
            elif kind != "copy":
                with h5py.File(path, "r+") as f:
                    if kind == "corrupt":
                        d = f["params/wte.weight"]
                        d[0, 0] = d[0, 0] + 1.0
                    elif kind == "incomplete":
                        f.attrs["complete"] = False
                    elif kind == "future":
                        f.attrs["format_version"] = 99
                    else:
                        raise ValueError(kind)


class Hf:
    """A copy of the tiny Hugging Face GPT-2 directory (tests/fixtures/hf_gpt2_tiny), edited: config = {key: value
    (None: remove)} or config_text; weights = "drop", "empty", "text", "truncated", or ("drop", tensor name)."""

    def __init__(
        self,
        config: dict | None = None,
        config_text: str | None = None,
        weights=None,
        drop_config: bool = False,
    ):
        self.config, self.config_text, self.weights, self.drop_config = (
            config,
            config_text,
            weights,
            drop_config,
        )

    def make(self, path: Path, base: dict) -> None:
        shutil.copytree(HF_FIXTURE, path)
        cfg, weights = path / "config.json", path / "model.safetensors"
        if self.config is not None:
            hf = json.loads(cfg.read_text())
            for key, value in self.config.items():
                if value is None:
                    hf.pop(key, None)
                else:
                    hf[key] = value
            cfg.write_text(json.dumps(hf))
        if self.config_text is not None:
            cfg.write_text(self.config_text)
        if self.drop_config:
            cfg.unlink()
        w = self.weights
        if w == "drop":
            weights.unlink()
        elif w == "empty":
            weights.write_bytes(b"")
        elif w == "text":
            weights.write_text("not a safetensors file\n")
        elif w == "truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        elif isinstance(w, tuple):
            from safetensors.numpy import load_file, save_file

            tensors = load_file(str(weights))
            del tensors[w[1]]
            save_file(tensors, str(weights))


class Copy:
    """A copy of a shared input (a file or a directory): base[src]."""

    def __init__(self, src: str):
        self.src = src

    def make(self, path: Path, base: dict) -> None:
        src = Path(base[self.src])
        if src.is_dir():
            shutil.copytree(src, path)
        else:
            shutil.copyfile(src, path)


class Link:
    """A symbolic link to `target` (a path relative to the link's directory)."""

    def __init__(self, target: str):
        self.target = target

    def make(self, path: Path, base: dict) -> None:
        path.symlink_to(self.target)


class Cl:
    """The shared cluster file's text with each (old, new) of `subs` replaced (each must occur), after `head` (top-level
    keys, before the file's first table)."""

    def __init__(self, *subs, head: str = ""):
        self.subs, self.head = subs, head

    def make(self, path: Path, base: dict) -> None:
        text = CLUSTER.read_text()
        for old, new in self.subs:
            assert old in text, old
            text = text.replace(old, new)
        path.write_text(self.head + text)


class RunDir:
    """A run directory for `plan --compare`: the base run's config.json (`config` = {"section.key": value} applied,
    or `config_text` the whole file) and metrics.jsonl (`metrics`: its text)."""

    def __init__(
        self, config: dict | None = None, config_text: str | None = None, metrics: str = ""
    ):
        self.config, self.config_text, self.metrics = config or {}, config_text, metrics

    def make(self, path: Path, base: dict) -> None:
        path.mkdir()
        cfg = json.loads((Path(base["run"]) / "config.json").read_text())
        for key, value in self.config.items():
            section, name = key.split(".", 1)
            cfg[section][name] = value
        text = self.config_text if self.config_text is not None else json.dumps(cfg)
        (path / "config.json").write_text(text)
        (path / "metrics.jsonl").write_text(self.metrics)


class Empty:
    """An empty directory."""

    def make(self, path: Path, base: dict) -> None:
        path.mkdir()


def write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        content.make(path, _BASE)


# -- the table -------------------------------------------------------------------------------------------------------


class Row(NamedTuple):
    id: str
    # shlex-split after {data} {chardata} {ckpt} {run} {gpt2} {hf} {cluster} are filled in
    argv: str
    expect: str  # a substring of the one error line
    files: dict = {}  # path in the row's directory -> str, bytes or a recipe
    ranks: tuple = (1, 2)
    skip: str = ""  # why this environment cannot run the row ("" : it runs)


def T(
    id: str,
    expect: str,
    sets=(),
    toml: dict | None = None,
    args: str = "",
    files: dict | None = None,
    extra: str = "",
    **kw,
) -> Row:
    """A `train` row: the tiny config with `toml` changes in the file, then `--set` overrides and `args`."""
    argv = (
        "train cfg.toml"
        + "".join(f" --set {shlex.quote(s)}" for s in sets)
        + (f" {args}" if args else "")
    )
    return Row(id, argv, expect, {"cfg.toml": Cfg(toml, extra), **(files or {})}, **kw)


def D(id: str, expect: str, data, **kw) -> Row:
    """A `train` row whose data.path is a row-local data directory ("data")."""
    return T(id, expect, toml={"data.path": "data"}, files={"data": data}, **kw)


def F(field: str, bad_type, bad_range=None, range_expect: str = "") -> list[Row]:
    """Rows for one config field: a TOML value of the wrong type in the file, and (unless bad_range is None) a
    `--set` value out of range."""
    typ = type(getattr(getattr(Config(), field.split(".")[0]), field.split(".")[1])).__name__
    rows = [
        T(
            f"{field}-type",
            f"config field {field}: expected {typ}, got {bad_type!r}",
            toml={field: bad_type},
        )
    ]
    if bad_range is not None:
        rows.append(
            T(
                f"{field}-range",
                f"config field {field}: expected {range_expect}",
                sets=[f"{field}={bad_range}"],
            )
        )
    return rows


def _cupy_missing() -> tuple[str, str]:
    """(what train.backend = "cupy" is refused for here, why a row cannot run: "" where it can): CuPy absent, or
    present without a usable GPU (CI installs CuPy for NVRTC), or a GPU machine, where the backend is valid."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed", ""
    import cupy

    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - any CUDA failure: no usable GPU
        return "but no usable GPU", ""
    return "", "a GPU is here: the cupy backend is valid"


CUPY_MISSING, NO_CUPY = _cupy_missing()


def _h5py_has_mpi() -> bool:
    import h5py

    return bool(h5py.get_config().mpi)


def _rows() -> list[Row]:
    rows: list[Row] = []
    add = rows.append

    # the config file
    add(Row("config-missing", "train nope.toml", "config file nope.toml: not found"))
    add(Row("config-empty", "train cfg.toml", "config file cfg.toml: empty", {"cfg.toml": ""}))
    add(
        Row(
            "config-not-toml",
            "train cfg.toml",
            "config file cfg.toml: invalid TOML",
            {"cfg.toml": "[model\nn_layer = = 2\n"},
        )
    )
    add(
        Row(
            "config-not-text",
            "train cfg.toml",
            "config file cfg.toml: not UTF-8 text",
            {"cfg.toml": b"\x89HDF\r\n\x1a\n\xff\xfe\x00\x00"},
        )
    )
    add(
        Row(
            "config-directory",
            "train cfg.toml",
            "config file cfg.toml: is a directory",
            {"cfg.toml": Empty()},
        )
    )
    add(
        T("config-unknown-section", "cfg.toml: unknown section [nosuch]", extra="[nosuch]\nx = 1\n")
    )
    add(T("config-unknown-key", "cfg.toml: unknown key model.n_layers", toml={"model.n_layers": 2}))
    add(
        Row(
            "config-section-not-table",
            "train cfg.toml",
            "cfg.toml: [model] must be a table",
            {"cfg.toml": "model = 3\n"},
        )
    )
    add(T("set-unknown-key", "--set: unknown key train.nope", sets=["train.nope=1"]))
    add(T("set-unknown-section", "--set: unknown section [optim]", sets=["optim.lr=1"]))
    add(T("set-no-equals", "--set 'train.lr': expected section.key=value", sets=["train.lr"]))
    add(T("set-no-section", "--set 'lr=1': expected section.key=value", sets=["lr=1"]))

    # every config field: a wrong type in the file, out of range on the command line
    for row in (
        F("model.n_layer", "two", 0, "a positive integer"),
        F("model.n_head", 2.5, -1, "a positive integer"),
        F("model.n_embd", True, 0, "a positive integer"),
        F("model.block_size", [16], 0, "a positive integer"),
        F("model.vocab_size", "many", -1, "0 (from data) or a positive integer"),
        F("model.dropout", "none", 1.0, "a value in [0, 1)"),
        F("model.dtype", 32, "float16", '"float32" or "float64"'),
        F("model.bias", 1),
        F("train.batch_size", "four", 0, "a positive integer"),
        F("train.grad_accum", 1.5, 0, "a positive integer"),
        F("train.max_iters", "many", -1, "a non-negative integer"),
        F("train.lr", "fast", 0, "a positive number"),
        F("train.min_lr", [0], -1e-4, "a number in [0, train.lr="),
        F("train.warmup_iters", 1.5, -1, "a non-negative integer"),
        F("train.lr_decay_iters", "x"),  # its range is train.warmup_iters's: a row below
        F("train.weight_decay", "x", -0.1, "a non-negative number"),
        F("train.beta1", "x", 1.0, "a value in [0, 1)"),
        F("train.beta2", True, -0.5, "a value in [0, 1)"),
        F("train.eps", "x", 0, "a positive number"),
        F("train.grad_clip", "x", -1, "a non-negative number"),
        F("train.eval_interval", "x", 0, "a positive integer"),
        F("train.eval_iters", "x", -1, "a non-negative integer"),
        F("train.log_interval", "x", 0, "a positive integer"),
        F("train.seed", "x", -1, "a non-negative integer"),
        F("train.out_dir", 5, "", "a directory path"),
        F("train.backend", 1, "torch", '"numpy" or "cupy"'),
        F("train.recompute", True, "all", '"none", "selective" or "block"'),
        F("train.precision", 16, "fp8", '"fp32", "bf16" or "fp16"'),
        F("train.loss_scale_init", "x", 0, "a positive number"),
        F("train.loss_scale_window", 1.5, 0, "a positive integer"),
        F("train.peak_tflops", "x", -1, "a non-negative number"),
        F("train.max_bad_steps", "x", 0, "a positive integer"),
        F("train.spike_sigma", "x", -1, "a non-negative number"),
        F("data.path", 5, "", "a directory path"),
        F("parallel.layout", 1, "best", '"auto" or "" (as set)'),
        F("parallel.tp", "x", 0, "a positive integer"),
        F("parallel.pp", 1.5, 0, "a positive integer"),
        F("parallel.virtual_stages", "x", 0, "a positive integer"),
        F("parallel.schedule", 1, "zigzag", '"1f1b", "interleaved", "gpipe", "zb-h1" or "zbv"'),
        F("parallel.sequence_parallel", 1),
        F("parallel.act_comm", 16, "int8", '"fp32", "bf16" or "fp16"'),
        F("parallel.zero", "x", 4, "0, 1, 2 or 3"),
        F("parallel.reshard_after_forward", 1),
        F("parallel.bucket_mb", "x", 0, "a positive number"),
        F("parallel.comm_timeout_s", "x", -1, "a non-negative number of seconds"),
        F("parallel.grad_comm", 16, "int8", '"fp32", "bf16", "fp16" or "powersgd"'),
        F("parallel.powersgd_rank", "x", 0, "a positive integer"),
        F("parallel.powersgd_start", 1.5, -1, "a non-negative integer"),
        F("checkpoint.interval", "x", -1, "a non-negative integer"),
        F("checkpoint.keep_last", "x", 0, "a positive integer"),
        F("checkpoint.writer", 1, "fast", '"auto", "gather", "mpio" or "parts"'),
        F("checkpoint.async_save", 1),
        F("checkpoint.on_error", 1, "ignore", '"stop" or "continue"'),
        F("model.lora_rank", "x", -1, "0 (off) or an integer in [1, model.n_embd=32]"),
        F("model.lora_alpha", "x", 0, "a positive number"),
        F("train.init_from", 5),  # its values: the init_from rows below
        F("train.teacher", 5),  # its values: the teacher rows below
        F("train.distill_alpha", "x", 1.5, "a value in [0, 1]"),
        F("train.distill_temperature", "x", 0, "a positive number"),
        F("model.head_dim", "x", -1, "0 (n_embd / n_head) or a positive integer"),
        F("model.n_inner", 1.5, -1, "0 (4 n_embd) or a positive integer"),
        [
            T(
                "model.lora_targets-type",
                "config field model.lora_targets: expected a list of non-empty strings, got 5",
                toml={"model.lora_targets": 5},
            )
        ],
        [
            T(
                "train.freeze-type",
                "config field train.freeze: expected a list of non-empty strings, got [1]",
                toml={"train.freeze": [1]},
            )
        ],
    ):
        rows += row
    add(
        T(
            "model.bias-set",
            "config field model.bias: expected bool, got 'maybe'",
            sets=["model.bias=maybe"],
        )
    )
    add(
        T(
            "parallel.pp_layers-type",
            "config field parallel.pp_layers: expected a list of integers",
            toml={"parallel.pp_layers": "1,a"},
        )
    )
    add(
        T(
            "parallel.pp_layers-entries",
            "config field parallel.pp_layers: expected 1 entries (parallel.pp=1 x "
            "parallel.virtual_stages=1), got [1, 1, 1]",
            sets=["parallel.pp_layers=1,1,1"],
        )
    )
    add(
        T(
            "parallel.pp_layers-zero",
            "config field parallel.pp_layers: expected at least one layer in every stage, got [0, 2]",
            sets=["parallel.pp=2", "parallel.pp_layers=0,2"],
        )
    )
    add(
        T(
            "parallel.pp_layers-sum",
            "config field parallel.pp_layers: expected entries summing to model.n_layer=2 (they sum "
            "to 4), got [2, 2]",
            sets=["parallel.pp=2", "parallel.pp_layers=2,2"],
        )
    )
    # numbers that are not finite
    for field in (
        "train.lr",
        "train.weight_decay",
        "train.grad_clip",
        "train.peak_tflops",
        "train.spike_sigma",
        "parallel.comm_timeout_s",
        "parallel.bucket_mb",
        "model.dropout",
    ):
        add(T(f"{field}-nan", f"config field {field}: expected ", sets=[f"{field}=nan"]))
    for field in (
        "train.lr",
        "train.grad_clip",
        "train.loss_scale_init",
        "parallel.comm_timeout_s",
    ):
        add(
            T(
                f"{field}-inf",
                f"config field {field}: expected a finite number",
                sets=[f"{field}=inf"],
            )
        )

    # fields inconsistent with each other, the data, the environment or the number of ranks
    add(
        T(
            "n_embd-not-multiple-of-n_head",
            "config field model.n_embd: expected a multiple of model.n_head=2",
            sets=["model.n_embd=33"],
        )
    )
    add(
        T(
            "min_lr-above-lr",
            "config field train.min_lr: expected a number in [0, train.lr=0.01]",
            sets=["train.min_lr=0.1"],
        )
    )
    add(
        T(
            "lr_decay-before-warmup",
            "config field train.lr_decay_iters: expected >= train.warmup_iters=5",
            sets=["train.warmup_iters=5", "train.lr_decay_iters=2"],
        )
    )
    add(
        T(
            "fp16-with-float64",
            'config field train.precision: expected "fp32" with model.dtype=float64',
            sets=["train.precision=fp16", "model.dtype=float64"],
        )
    )
    add(
        T(
            "grad_comm-16-bit-with-float64",
            'config field parallel.grad_comm: expected "fp32" or "powersgd" with '
            "model.dtype=float64",
            sets=["parallel.grad_comm=fp16", "model.dtype=float64"],
        )
    )
    add(
        T(
            "zero-3-with-zero-bubble",
            'config field parallel.zero: expected 0 or 1 with parallel.schedule="zb-h1"',
            sets=["parallel.zero=3", "parallel.schedule=zb-h1", "parallel.pp=2"],
        )
    )
    add(
        T(
            "grad_comm-16-bit-with-zero-2",
            'config field parallel.grad_comm: expected "fp32" with parallel.zero=2',
            sets=["parallel.grad_comm=bf16", "parallel.zero=2"],
        )
    )
    add(
        T(
            "sequence-parallel-without-tp",
            "config field parallel.sequence_parallel: expected false with parallel.tp = 1",
            sets=["parallel.sequence_parallel=true"],
        )
    )
    add(
        T(
            "sequence-parallel-uneven-slices",
            "config field parallel.sequence_parallel: expected model.block_size=9 divisible by "
            "parallel.tp=2",
            sets=["parallel.sequence_parallel=true", "parallel.tp=2", "model.block_size=9"],
        )
    )
    add(
        T(
            "sequence-parallel-with-lora",
            "config field parallel.sequence_parallel: expected false with LoRA adapters",
            sets=["parallel.sequence_parallel=true", "parallel.tp=2", "model.lora_rank=2"],
        )
    )
    add(
        T(
            "act_comm-16-bit-with-float64",
            'config field parallel.act_comm: expected "fp32" with model.dtype=float64',
            sets=["parallel.act_comm=bf16", "model.dtype=float64"],
        )
    )
    add(
        T(
            "interleaved-one-chunk",
            'config field parallel.virtual_stages: expected >= 2 with parallel.schedule="interleaved", got 1',
            sets=["parallel.schedule=interleaved"],
        )
    )
    add(
        T(
            "interleaved-one-stage",
            'config field parallel.pp: expected >= 2 with parallel.schedule="interleaved", got 1',
            sets=["parallel.schedule=interleaved", "parallel.virtual_stages=2"],
        )
    )
    add(
        T(
            "interleaved-micro-batches",
            "config field train.grad_accum: expected a multiple of parallel.pp=2 with "
            'parallel.schedule="interleaved" (the micro-batches), got 3',
            sets=[
                "parallel.schedule=interleaved",
                "parallel.virtual_stages=2",
                "parallel.pp=2",
                "model.n_layer=4",
                "train.grad_accum=3",
            ],
        )
    )
    add(
        T(
            "virtual-stages-without-interleaved",
            'config field parallel.virtual_stages: expected 1 with parallel.schedule="1f1b"',
            sets=["parallel.virtual_stages=2"],
        )
    )
    add(
        T(
            "zb-h1-virtual-stages",
            'config field parallel.virtual_stages: expected 1 with parallel.schedule="zb-h1" (only '
            "interleaved and zbv run several chunks a rank), got 2",
            sets=["parallel.schedule=zb-h1", "parallel.virtual_stages=2"],
        )
    )
    add(
        T(
            "zbv-one-chunk",
            'config field parallel.virtual_stages: expected 2 with parallel.schedule="zbv"',
            sets=["parallel.schedule=zbv", "parallel.pp=2"],
        )
    )
    add(
        T(
            "pp-not-dividing-layers",
            "config field parallel.pp: expected a divisor of model.n_layer=2 with "
            "parallel.virtual_stages=1 (or parallel.pp_layers for an uneven split), got 3",
            sets=["parallel.pp=3"],
        )
    )
    add(
        T(
            "tp-not-dividing-ranks",
            "parallel.tp=3 x parallel.pp=1 does not divide the number of ranks",
            sets=["parallel.tp=3"],
        )
    )
    add(
        T(
            "pp-not-dividing-ranks",
            "parallel.tp=1 x parallel.pp=4 does not divide the number of ranks",
            sets=["parallel.pp=4", "model.n_layer=4"],
        )
    )
    add(
        T(
            "tp-not-dividing-heads",
            "parallel.tp=2 does not divide model.n_head=1",
            sets=["parallel.tp=2", "model.n_head=1"],
            ranks=(2,),
        )
    )
    add(
        T(
            "batch-not-dividing-dp",
            "train.batch_size=3 is not divisible by the data-parallel size 2",
            sets=["train.batch_size=3"],
            ranks=(2,),
        )
    )
    add(
        T(
            "vocab-below-data",
            "model.vocab_size=100 is smaller than the data's vocabulary (256",
            sets=["model.vocab_size=100"],
        )
    )
    add(
        T(
            "block-longer-than-train-split",
            "corpus split 'train' has",
            sets=["model.block_size=8192"],
        )
    )
    add(T("cupy-unusable", CUPY_MISSING, sets=["train.backend=cupy"], skip=NO_CUPY))
    add(
        T(
            "async-save-with-the-gather-writer",
            'config field checkpoint.async_save: expected false with checkpoint.writer="gather"',
            sets=["checkpoint.writer=gather", "checkpoint.async_save=true"],
        )
    )
    add(
        T(
            "mpio-without-parallel-h5py",
            "checkpoint.writer=mpio, but this h5py has no MPI support",
            sets=["checkpoint.writer=mpio"],
            skip="this h5py has MPI" if _h5py_has_mpi() else "",
        )
    )
    add(
        T(
            "out_dir-is-a-file",
            "train.out_dir",
            sets=["train.out_dir=notes.txt"],
            files={"notes.txt": "notes\n"},
        )
    )
    add(
        T(
            "out_dir-has-checkpoints",
            "already holds checkpoints of another run",
            files={"run/ckpt_00000002.h5": Ckpt()},
        )
    )

    # the data directory
    add(
        T(
            "data-missing",
            "data.path: data directory 'nodata' does not exist",
            sets=["data.path=nodata"],
        )
    )
    add(
        T(
            "data-is-a-file",
            "data.path: data directory 'tokens.bin' is not a directory",
            sets=["data.path=tokens.bin"],
            files={"tokens.bin": b"\x00\x01"},
        )
    )
    add(D("meta-missing", "meta.json: missing", Data(drop=("meta.json",))))
    add(D("meta-empty", "meta.json: not valid JSON", Data(meta_text="")))
    add(
        D(
            "meta-truncated",
            "meta.json: not valid JSON",
            Data(meta_text='{"format": "hpc_llm-tokens", "form'),
        )
    )
    add(D("meta-not-text", "meta.json: not valid JSON", Data(meta_text=b"\xff\xfe\x00{")))
    add(
        D(
            "meta-foreign-object",
            "meta.json: \"format\" is None, expected 'hpc_llm-tokens'",
            Data(meta_text='{"name": "my dataset", "size": 100}'),
        )
    )
    add(
        D(
            "meta-foreign-list",
            "meta.json: \"format\" is 'list', expected 'hpc_llm-tokens'",
            Data(meta_text="[1, 2]"),
        )
    )
    add(
        D(
            "meta-future-version",
            "meta.json: format_version 99 is newer",
            Data(meta={"format_version": 99}),
        )
    )
    add(
        D(
            "meta-vocab-string",
            "meta.json: field 'vocab_size' is '256', expected a non-negative integer",
            Data(meta={"vocab_size": "256"}),
        )
    )
    add(
        D(
            "meta-vocab-missing",
            "meta.json: field 'vocab_size' is None",
            Data(meta={"vocab_size": None}),
        )
    )
    add(
        D(
            "meta-vocab-too-large",
            "meta.json: vocab_size 4294967297 is outside 1..4294967296",
            Data(meta={"vocab_size": 2**32 + 1}),
        )
    )
    add(D("meta-n_train-negative", "meta.json: field 'n_train' is -5", Data(meta={"n_train": -5})))
    add(
        D(
            "meta-tokenizer-unknown",
            'field "tokenizer" is \'wordpiece\', expected "byte", "char", "bpe" or "gpt2-bpe"',
            Data(meta={"tokenizer": "wordpiece"}),
        )
    )
    add(
        D(
            "meta-bpe-without-json",
            "tokenizer 'bpe' needs a string field \"tokenizer_json\"",
            Data(meta={"tokenizer": "bpe"}),
        )
    )
    add(
        D(
            "meta-dtype-unknown",
            'meta.json: field "dtype" is \'int8\', expected "uint16" or "uint32"',
            Data(meta={"dtype": "int8"}),
        )
    )
    add(
        D(
            "meta-vocab-disagrees",
            'field "vocab_size" is 300, but the byte tokenizer has 256 tokens',
            Data(meta={"vocab_size": 300}),
        )
    )
    add(
        D(
            "meta-char-without-chars",
            'tokenizer "char" needs a non-empty string field "chars"',
            Data(src="chardata", meta={"chars": None}),
        )
    )
    add(
        D(
            "meta-char-chars-edited",
            'field "chars" must be sorted unique characters',
            Data(src="chardata", meta={"chars": "ba"}),
        )
    )
    add(D("train-bin-missing", "train.bin: missing", Data(drop=("train.bin",))))
    add(D("train-bin-empty", "train.bin: 0 bytes, expected", Data(train=b"")))
    # not a whole number of tokens
    add(D("train-bin-odd-size", "train.bin: ", Data(train=lambda b: b[:-1])))
    add(
        D(
            "train-bin-truncated",
            "the file is truncated or from another run",
            Data(train=lambda b: b[: len(b) // 2]),
        )
    )
    add(D("val-bin-missing", "val.bin: missing", Data(drop=("val.bin",))))
    add(
        D(
            "train-too-short",
            "corpus split 'train' has 10 tokens, fewer than block_size+1 = 17",
            Data(train=tokens(range(10)), meta={"n_train": 10}),
        )
    )
    add(
        D(
            "val-too-short",
            "corpus split 'val' has 5 tokens, fewer than block_size+1 = 17",
            Data(val=tokens(range(5)), meta={"n_val": 5}),
        )
    )
    # ids beyond the vocabulary: prepare records the largest in meta.json (max_id), checked at start-up without
    # reading the token files; an id edited into a file afterwards is found by the batch that gathers it, a fault
    # (tests/data/test_data.py::test_token_out_of_vocab_found_by_the_batch)
    add(
        D(
            "token-beyond-vocab",
            "meta.json: max_id is 300: the token files contain token id 300, but vocab_size in "
            "meta.json is 256",
            Data(meta={"max_id": 300}),
        )
    )
    add(
        D(
            "token-beyond-char-vocab",
            "the token files contain token id 999",
            Data(src="chardata", meta={"max_id": 999}),
        )
    )
    add(
        D(
            "meta-max_id-negative",
            "meta.json: field 'max_id' is -1, expected a non-negative integer",
            Data(meta={"max_id": -1}),
        )
    )
    # version 1 records no max_id: its splits are read once at start-up (in bounded chunks)
    add(
        D(
            "token-beyond-vocab-version-1",
            "val.bin: contains token id 300, but vocab_size in meta.json is 256 (a "
            "format version 1 directory",
            Data(
                meta={"format_version": 1, "dtype": None, "max_id": None},
                val=lambda b: b[:-2] + tokens([300]),
            ),
        )
    )

    # fine-tuning (docs/fine-tuning.md): train.init_from, train.freeze, LoRA, merge-lora
    one_layer = {"data.path": "{chardata}", "model.n_layer": 1}
    add(
        T(
            "init_from-missing",
            "train.init_from: ck.h5: checkpoint file does not exist",
            toml={**one_layer, "train.init_from": "ck.h5"},
        )
    )
    add(
        T(
            "init_from-not-a-checkpoint",
            "train.init_from: ck.h5: not an hpc_llm checkpoint",
            toml={**one_layer, "train.init_from": "ck.h5"},
            files={"ck.h5": Ckpt("foreign")},
        )
    )
    add(
        T(
            "init_from-corrupt",
            "train.init_from: ck.h5: checksum mismatch in dataset /params/wte.weight",
            toml={**one_layer, "train.init_from": "ck.h5"},
            files={"ck.h5": Ckpt("corrupt")},
        )
    )
    add(
        T(
            "init_from-other-model",
            "model.n_layer=1 but the config says 2",
            toml={"data.path": "{chardata}", "train.init_from": "{ckpt}"},
        )
    )
    add(
        T(
            "init_from-other-data",
            "was trained on data with the char tokenizer",
            toml={"model.n_layer": 1, "train.init_from": "{ckpt}"},
        )
    )
    add(
        T(
            "init_from-larger-block_size",
            "model.block_size=32 is larger than the checkpoint's 16",
            toml={**one_layer, "model.block_size": 32, "train.init_from": "{ckpt}"},
        )
    )
    add(
        T(
            "init_from-empty-run-dir",
            "train.init_from=empty: no verified checkpoint in this directory",
            toml={**one_layer, "train.init_from": "empty"},
            files={"empty": Empty()},
        )
    )
    # distillation and pruning (docs/compression.md)
    add(
        T(
            "teacher-missing",
            "train.teacher: ck.h5: checkpoint file does not exist",
            toml={**one_layer, "train.teacher": "ck.h5"},
        )
    )
    add(
        T(
            "teacher-other-vocabulary",
            "its vocabulary has 23 tokens, the run's 256: a teacher must share the student's tokenizer",
            toml={"train.teacher": "{ckpt}"},
        )
    )
    add(
        T(
            "teacher-smaller-block_size",
            "its block_size=16 is smaller than model.block_size=32",
            toml={**one_layer, "model.block_size": 32, "train.teacher": "{ckpt}"},
        )
    )
    add(
        T(
            "tp-not-dividing-pruned-mlp",
            "parallel.tp=2 does not divide the MLP width (33, model.n_inner)",
            sets=["parallel.tp=2", "model.n_inner=33"],
            ranks=(2,),
        )
    )
    for flag, value, expect in (
        ("--heads", "1.5", "prune --heads 1.5: expected a fraction in (0, 1)"),
        ("--mlp", "0", "prune --mlp 0.0: expected a fraction in (0, 1)"),
        ("--heads", "0.8", "prune --heads 0.8: removes all 2 heads of each block"),
        (
            "--layers",
            "0,3",
            "prune --layers 0,3: expected the blocks to keep, increasing, each in [0, 1)",
        ),
    ):
        add(
            Row(
                f"prune{flag}-{value}",
                f"prune {{ckpt}} {flag} {value} --out p.h5",
                expect,
                ranks=(1,),
            )
        )
    add(Row("prune-nothing", "prune {ckpt} --out p.h5", "prune: nothing to remove", ranks=(1,)))
    add(
        Row(
            "prune-on-two-ranks",
            "prune {ckpt} --heads 0.5 --out p.h5",
            "hpc-llm prune runs on one process, got 2 ranks",
            ranks=(2,),
        )
    )
    add(
        T(
            "freeze-matches-nothing",
            "config field train.freeze: pattern 'h.9.*' matches no parameter",
            sets=["train.freeze=h.9.*"],
        )
    )
    add(
        T(
            "freeze-second-matches-nothing",
            "config field train.freeze: pattern 'lm_head.weight' matches no parameter",
            sets=["train.freeze=wte.weight,lm_head.weight"],
        )
    )
    add(
        T(
            "lora-targets-match-nothing",
            "config field model.lora_targets: expected distinct names among",
            sets=["model.lora_rank=2", "model.lora_targets=attn.q"],
        )
    )
    add(
        T(
            "lora-targets-empty",
            "(at least one with model.lora_rank > 0)",
            sets=["model.lora_rank=2", "model.lora_targets=[]"],
        )
    )
    add(
        T(
            "lora-rank-above-n_embd",
            "config field model.lora_rank: expected 0 (off) or an integer in [1, "
            "model.n_embd=32], got 33",
            sets=["model.lora_rank=33"],
        )
    )
    # merge-lora at 2 ranks is refused first, whatever its arguments (merge-lora-on-two-ranks below)
    add(
        Row(
            "merge-lora-without-lora",
            "merge-lora {ckpt} --out m.h5",
            "has no LoRA adapters (model.lora_rank = 0)",
            ranks=(1,),
        )
    )
    add(
        Row(
            "merge-lora-out-dir-missing",
            "merge-lora {ckpt} --out nodir/m.h5",
            "merge-lora --out nodir/m.h5: directory nodir does not exist",
            ranks=(1,),
        )
    )
    add(
        Row(
            "merge-lora-out-is-a-directory",
            "merge-lora {ckpt} --out outdir",
            "merge-lora --out outdir: is a directory",
            {"outdir": Empty()},
            ranks=(1,),
        )
    )
    add(
        Row(
            "merge-lora-missing",
            "merge-lora ck.h5 --out m.h5",
            "ck.h5: checkpoint file does not exist",
            ranks=(1,),
        )
    )
    add(
        Row(
            "merge-lora-corrupt",
            "merge-lora ck.h5 --out m.h5",
            "ck.h5: checksum mismatch in dataset",
            {"ck.h5": Ckpt("corrupt")},
            ranks=(1,),
        )
    )
    add(
        T(
            "freeze-everything",
            "config field train.freeze: ['*'] freezes every parameter: nothing left to train",
            sets=["train.freeze=*"],
        )
    )
    add(
        T(
            "lora-freeze-every-adapter",
            "config field train.freeze: ['h.*.lora_A', 'h.*.lora_B'] freezes every "
            "parameter (model.lora_rank > 0 freezes the base: these patterns also cover every LoRA adapter)",
            sets=["model.lora_rank=2", "train.freeze=h.*.lora_A,h.*.lora_B"],
        )
    )
    # every rank would write the same file: refused alike on each (only a 2-rank run can show it); import-gpt2 after
    # its inputs' checks (the hf-* rows keep their errors at 2 ranks)
    add(
        Row(
            "merge-lora-on-two-ranks",
            "merge-lora {ckpt} --out m.h5",
            "hpc-llm merge-lora runs on one process, got 2 ranks: run it without mpiexec",
            ranks=(2,),
        )
    )
    add(
        Row(
            "import-gpt2-on-two-ranks",
            "import-gpt2 {hf} --out out.h5",
            "hpc-llm import-gpt2 runs on one process, got 2 ranks: run it without mpiexec",
            ranks=(2,),
        )
    )
    # newdir is not created
    add(
        Row(
            "import-gpt2-on-two-ranks-new-dir",
            "import-gpt2 {hf} --out newdir/out.h5",
            "hpc-llm import-gpt2 runs on one process, got 2 ranks",
            ranks=(2,),
        )
    )

    # export-hf: the checkpoint missing, corrupt, or a run directory without one; --out not empty, an input, a file;
    # --dtype unknown; two ranks (after the inputs' checks: newdir is not created)
    destroy = "writing it would destroy it"
    for id, argv, expect, files, ranks in (
        ("missing", "ck.h5 --out hf", "ck.h5: checkpoint file does not exist", {}, (1,)),
        (
            "corrupt",
            "ck.h5 --out hf",
            "ck.h5: checksum mismatch in dataset",
            {"ck.h5": Ckpt("corrupt")},
            (1,),
        ),
        ("no-checkpoint", "run --out hf", "run: no verified checkpoint", {"run": Empty()}, (1,)),
        (
            "out-not-empty",
            "{ckpt} --out hf",
            "export-hf --out hf: directory exists and is not empty: give --force to replace it",
            {"hf/config.json": "{}"},
            (1,),
        ),
        (
            "out-is-the-input",
            "ck.h5 --out ck.h5 --force",
            f"is the input ck.h5; {destroy}",
            {"ck.h5": Ckpt()},
            (1,),
        ),
        (
            "out-is-the-run",
            "run --out run --force",
            f"is the input run; {destroy}",
            {"run": Copy("run")},
            (1,),
        ),
        (
            "out-holds-the-input",
            "run/ck.h5 --out run --force",
            "(or holds it)",
            {"run/ck.h5": Ckpt()},
            (1,),
        ),
        (
            "out-is-a-file",
            "{ckpt} --out notes.txt",
            "is a file, expected a directory path",
            {"notes.txt": "x"},
            (1,),
        ),
        (
            "dtype",
            "{ckpt} --out hf --dtype fp8",
            "argument --dtype: invalid choice: 'fp8'",
            {},
            (1,),
        ),
        (
            "on-two-ranks",
            "{ckpt} --out newdir/hf",
            "hpc-llm export-hf runs on one process, got 2 ranks",
            {},
            (2,),
        ),
    ):
        add(Row(f"export-hf-{id}", f"export-hf {argv}", expect, files, ranks=ranks))

    # --resume: a checkpoint missing, empty, truncated, not HDF5, another program's, corrupt, or of another model
    for kind, expect in (
        ("missing", "ck.h5: checkpoint file does not exist"),
        ("empty", "ck.h5: not a readable HDF5 file"),
        ("text", "ck.h5: not a readable HDF5 file"),
        ("truncated", "ck.h5: checkpoint file is truncated"),
        ("foreign", "ck.h5: not an hpc_llm checkpoint"),
        ("incomplete", "ck.h5: checkpoint is incomplete"),
        ("future", "ck.h5: checkpoint format_version 99 was written by a newer hpc_llm"),
        ("dir", "ck.h5: is not a regular file"),
        ("corrupt", "ck.h5: checksum mismatch in dataset /params/wte.weight"),
    ):
        files = {} if kind == "missing" else {"ck.h5": Ckpt(kind)}
        add(
            T(
                f"resume-{kind}",
                expect,
                toml={"data.path": "{chardata}", "model.n_layer": 1},
                args="--resume ck.h5",
                files=files,
            )
        )
        # generate and inspect take a directory for a run directory: its newest checkpoint
        if kind == "dir":
            expect = "ck.h5: no verified checkpoint in this directory"
        add(Row(f"generate-{kind}", "generate ck.h5 --max-new-tokens 2", expect, files))
        add(Row(f"inspect-{kind}", "inspect ck.h5", expect, files))
    add(
        T(
            "resume-other-model",
            "model.n_layer=1 but the config says 2",
            toml={"data.path": "{chardata}"},
            args="--resume {ckpt}",
        )
    )
    add(
        T(
            "resume-other-data",
            "was trained on data with the char tokenizer",
            toml={"model.n_layer": 1},
            args="--resume {ckpt}",
        )
    )
    add(
        Row(
            "generate-run-dir-without-checkpoint",
            "generate empty",
            "empty: no verified checkpoint",
            {"empty": Empty()},
        )
    )
    add(
        Row(
            "inspect-run-dir-without-checkpoint",
            "inspect empty",
            "empty: no verified checkpoint",
            {"empty": Empty()},
        )
    )
    add(
        Row(
            "inspect-second-bad",
            "inspect {ckpt} ck.h5",
            "ck.h5: not an hpc_llm checkpoint",
            {"ck.h5": Ckpt("foreign")},
        )
    )
    add(
        Row(
            "inspect-three",
            "inspect {ckpt} {ckpt} {ckpt}",
            "inspect: expected one checkpoint or two to compare, got 3",
        )
    )
    add(
        Row(
            "generate-imported-gpt2",
            "generate {gpt2} --max-new-tokens 2",
            "gpt2.h5: imported GPT-2 weights, whose tokenizer (gpt2-bpe) hpc_llm does not include",
        )
    )

    # generate's options (the checkpoint is good)
    add(
        Row(
            "generate-max-new-tokens-negative",
            "generate {run} --max-new-tokens -1",
            "--max-new-tokens: expected a non-negative integer, got -1",
        )
    )
    add(
        Row(
            "generate-max-new-tokens-type",
            "generate {run} --max-new-tokens ten",
            "argument --max-new-tokens: invalid int value: 'ten'",
        )
    )
    add(
        Row(
            "generate-temperature-negative",
            "generate {run} --temperature -0.5",
            "--temperature: expected a finite non-negative number (0: greedy), got -0.5",
        )
    )
    add(
        Row(
            "generate-temperature-nan",
            "generate {run} --temperature nan",
            "--temperature: expected a finite non-negative number (0: greedy), got nan",
        )
    )
    add(
        Row(
            "generate-temperature-inf",
            "generate {run} --temperature inf",
            "--temperature: expected a finite non-negative number (0: greedy), got inf",
        )
    )
    add(
        Row(
            "generate-top-k-zero",
            "generate {run} --top-k 0",
            "--top-k: expected a positive integer, got 0",
        )
    )
    add(
        Row(
            "generate-num-samples-zero",
            "generate {run} --num-samples 0",
            "--num-samples: expected a positive integer, got 0",
        )
    )
    add(
        Row(
            "generate-num-samples-negative",
            "generate {run} --num-samples -2",
            "--num-samples: expected a positive integer, got -2",
        )
    )
    add(
        Row(
            "generate-seed-negative",
            "generate {run} --seed -1",
            "--seed: expected a non-negative integer, got -1",
        )
    )
    add(
        Row(
            "generate-prompt-outside-vocab",
            "generate {run} --prompt 'the cat☃'",
            "--prompt: char tokenizer: character '☃' (U+2603) at position 7 is not in the vocabulary",
        )
    )
    add(
        Row(
            "generate-backend-unknown",
            "generate {run} --backend torch",
            "argument --backend: invalid choice",
        )
    )
    add(
        Row(
            "generate-cupy-unusable",
            "generate {run} --backend cupy",
            CUPY_MISSING,
            skip=NO_CUPY,
        )
    )

    # generate's inference options (top-p, batched prompts, output file, int8, tensor parallelism) and eval
    class SavedModel:
        """A checkpoint of an untrained model of the base shape with `changes` (model section), the char data's
        tokenizer recorded in its state."""

        def __init__(self, **changes):
            self.changes = changes

        def make(self, path: Path, base: dict) -> None:
            from hpc_llm import checkpoint as ckpt
            from hpc_llm.config import ModelConfig
            from hpc_llm.data.tokens import TokenData
            from hpc_llm.model.gpt import GPT

            tok = TokenData(base["chardata"]).tokenizer
            cfg = Config()
            cfg.model = ModelConfig(
                **{**BASE_CONFIG["model"], "vocab_size": tok.vocab_size, **self.changes}
            )
            m = GPT(cfg.model, seed=0)
            ckpt.save_checkpoint(
                path,
                params=m.full_tensors(m.flat),
                optimizer={},
                state={"step": 0, "tokenizer": tok.meta()},
                config=cfg.to_dict(),
                metrics={},
            )

    add(
        Row(
            "generate-top-p-zero",
            "generate {run} --top-p 0",
            "--top-p: expected a number in (0, 1], got 0.0",
        )
    )
    add(
        Row(
            "generate-top-p-above-one",
            "generate {run} --top-p 1.5",
            "--top-p: expected a number in (0, 1], got 1.5",
        )
    )
    add(
        Row(
            "generate-batch-size-zero",
            "generate {run} --batch-size 0",
            "--batch-size: expected a positive integer",
        )
    )
    add(
        Row(
            "generate-prompts-missing",
            "generate {run} --prompts nope.txt",
            "--prompts nope.txt: no such file",
        )
    )
    add(
        Row(
            "generate-prompts-empty-line",
            "generate {run} --prompts p.txt",
            "--prompts p.txt: line 2 is empty",
            {"p.txt": "the\n\nthe cat\n"},
        )
    )
    add(
        Row(
            "generate-prompts-not-utf8",
            "generate {run} --prompts p.txt",
            "--prompts p.txt: not UTF-8 text",
            {"p.txt": b"the \xff\n"},
        )
    )
    add(
        Row(
            "generate-prompts-outside-vocab",
            "generate {run} --prompts p.txt",
            "--prompts p.txt: line 2: char tokenizer: character '☃'",
            {"p.txt": "the\nthe ☃\n"},
        )
    )
    add(
        Row(
            "generate-prompts-and-prompt",
            "generate {run} --prompts p.txt --prompt the",
            "generate: give --prompt or --prompts, not both",
            {"p.txt": "the\n"},
        )
    )
    add(
        Row(
            "generate-out-dir-missing",
            "generate {run} --out nodir/o.jsonl",
            "--out nodir/o.jsonl: directory nodir does not exist",
        )
    )
    add(
        Row(
            "generate-quantize-float64",
            "generate f64.h5 --quantize int8",
            "--quantize int8: needs a float32 model, this one is float64",
            {"f64.h5": SavedModel(dtype="float64")},
        )
    )
    add(
        Row(
            "generate-quantize-dtype-float64",
            "generate {run} --quantize int8 --dtype float64",
            "--quantize int8: needs a float32 model, this one is float64",
        )
    )
    add(
        Row(
            "generate-quantize-unknown",
            "generate {run} --quantize int4",
            "argument --quantize: invalid choice",
        )
    )
    add(
        Row(
            "generate-tp-not-dividing-n-head",
            "generate h3.h5 --max-new-tokens 2",
            "parallel.tp=2 does not divide model.n_head=3",
            {"h3.h5": SavedModel(n_head=3, n_embd=48)},
            ranks=(2,),
        )
    )
    add(Row("generate-tp-not-ranks", "generate {run} --set parallel.tp=4", "parallel.tp=4 but"))
    add(
        Row(
            "generate-tp-not-integer",
            "generate {run} --set parallel.tp=two",
            "--set parallel.tp=two: expected a positive integer",
        )
    )
    add(
        Row(
            "generate-set-other-key",
            "generate {run} --set train.lr=1",
            "--set train.lr: `hpc-llm generate` takes only parallel.tp",
        )
    )
    add(Row("eval-data-missing", "eval {run} --data nope", "data directory 'nope' does not exist"))
    add(
        Row(
            "eval-other-tokenizer",
            "eval {run} --data {data}",
            "data has the byte tokenizer, vocab 256",
        )
    )
    add(
        Row(
            "eval-split-unknown",
            "eval {run} --data {chardata} --split test",
            "argument --split: invalid choice",
        )
    )
    add(
        Row(
            "eval-batch-size-zero",
            "eval {run} --data {chardata} --batch-size 0",
            "--batch-size: expected a positive integer, got 0",
        )
    )
    add(
        Row(
            "eval-max-batches-zero",
            "eval {run} --data {chardata} --max-batches 0",
            "--max-batches: expected a positive integer, got 0",
        )
    )
    add(
        Row(
            "eval-quantize-float64",
            "eval {run} --data {chardata} --quantize int8 --dtype float64",
            "--quantize int8: needs a float32 model, this one is float64",
        )
    )
    add(
        Row(
            "eval-tp-not-ranks",
            "eval {run} --data {chardata} --set parallel.tp=4",
            "parallel.tp=4 but",
        )
    )
    add(
        Row(
            "eval-checkpoint-missing",
            "eval ck.h5 --data {chardata}",
            "ck.h5: checkpoint file does not exist",
        )
    )
    add(
        Row(
            "eval-tp-not-dividing-n-head",
            "eval h3.h5 --data {chardata}",
            "parallel.tp=2 does not divide model.n_head=3",
            {"h3.h5": SavedModel(n_head=3, n_embd=48)},
            ranks=(2,),
        )
    )

    # prepare
    add(
        Row(
            "prepare-missing-input",
            "prepare nope.txt --out tok",
            "prepare: input 'nope.txt' does not exist",
        )
    )
    add(Row("prepare-no-inputs", "prepare --out tok", "prepare: expected input files or folders"))
    add(
        Row(
            "prepare-no-out",
            "prepare in.txt",
            "the following arguments are required: --out",
            {"in.txt": "hello\n"},
        )
    )
    add(
        Row(
            "prepare-inputs-and-stdlib",
            "prepare in.txt --stdlib --out tok",
            "give input paths or --stdlib, not both",
            {"in.txt": "hello\n"},
        )
    )
    add(
        Row(
            "prepare-empty-file",
            "prepare in.txt --out tok",
            "prepare: the corpus is empty",
            {"in.txt": ""},
        )
    )
    add(
        Row(
            "prepare-empty-folder",
            "prepare texts --out tok",
            "prepare: the corpus is empty",
            {"texts": Empty()},
        )
    )
    add(
        Row(
            "prepare-pattern-matches-nothing",
            "prepare texts --pattern '*.md' --out tok",
            "prepare: the corpus is empty",
            {"texts/a.txt": "hello world\n"},
        )
    )
    add(
        Row(
            "prepare-not-text",
            "prepare in.bin --out tok",
            "1 skipped as not UTF-8",
            {"in.bin": b"\xff\xfe\x00\x80" * 64},
        )
    )
    add(
        Row(
            "prepare-too-small",
            "prepare in.txt --out tok",
            "the corpus has only 1 tokens, too few to split",
            {"in.txt": "a"},
        )
    )
    for value in ("0", "1", "1.5", "-0.1", "nan"):
        add(
            Row(
                f"prepare-val-fraction-{value}",
                f"prepare in.txt --val-fraction {value} --out tok",
                "--val-fraction: expected a number strictly between 0 and 1",
                {"in.txt": "hello world\n" * 20},
            )
        )
    add(
        Row(
            "prepare-val-fraction-type",
            "prepare in.txt --val-fraction half --out tok",
            "argument --val-fraction: invalid float value: 'half'",
            {"in.txt": "hello world\n" * 20},
        )
    )
    add(
        Row(
            "prepare-tokenizer-unknown",
            "prepare in.txt --tokenizer wordpiece --out tok",
            "argument --tokenizer: invalid choice: 'wordpiece'",
            {"in.txt": "hello\n"},
        )
    )
    add(
        Row(
            "prepare-max-bytes-zero",
            "prepare --stdlib --max-bytes 0 --out tok",
            "--max-bytes: expected a positive integer, got 0",
        )
    )
    add(
        Row(
            "prepare-out-is-a-file",
            "prepare in.txt --out tok",
            "output directory 'tok' is a file, expected a directory",
            {"in.txt": "hello world\n" * 20, "tok": "notes\n"},
        )
    )
    add(
        Row(
            "prepare-out-under-a-file",
            "prepare in.txt --out notes/tok",
            "cannot create output directory 'notes/tok'",
            {"in.txt": "hello world\n" * 20, "notes": "notes\n"},
        )
    )
    text = {"in.txt": "hello world\n" * 20}
    add(
        Row(
            "prepare-tokenizer-dir-without-files",
            "prepare in.txt --tokenizer-dir tokdir --out tok",
            "tokenizer directory 'tokdir' has neither tokenizer.json nor vocab.json + merges.txt",
            {**text, "tokdir": Empty()},
        )
    )
    add(
        Row(
            "prepare-tokenizer-dir-merges-missing",
            "prepare in.txt --tokenizer gpt2 --tokenizer-dir tokdir --out tok",
            "has neither tokenizer.json nor vocab.json + merges.txt",
            {**text, "tokdir/vocab.json": '{"a": 0}'},
        )
    )
    add(
        Row(
            "prepare-tokenizer-dir-missing",
            "prepare in.txt --tokenizer-dir notokdir --out tok",
            "tokenizer directory 'notokdir' does not exist",
            text,
        )
    )
    add(
        Row(
            "prepare-tokenizer-json-broken",
            "prepare in.txt --tokenizer-dir tokdir --out tok",
            "tokdir/tokenizer.json: not a readable tokenizers JSON file",
            {**text, "tokdir/tokenizer.json": "{not"},
        )
    )
    import tokenizers  # a SentencePiece-style tokenizer (Metaspace): its "▁" would be added again at every cut

    spm = tokenizers.Tokenizer(
        tokenizers.models.BPE(vocab={"<unk>": 0, "▁": 1, "h": 2}, merges=[], unk_token="<unk>")
    )
    spm.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    add(
        Row(
            "prepare-tokenizer-not-byte-level",
            "prepare in.txt --tokenizer-dir tokdir --out tok",
            "tokdir/tokenizer.json: pre-tokenizer Metaspace is not byte-level (expected ByteLevel, or Split parts then "
            "ByteLevel); hpc_llm streams the corpus in pieces and supports byte-level BPE tokenizers only",
            {**text, "tokdir/tokenizer.json": spm.to_str()},
        )
    )
    add(
        Row(
            "prepare-gpt2-without-dir",
            "prepare in.txt --tokenizer gpt2 --out tok",
            "--tokenizer gpt2 goes with --tokenizer-dir DIR",
            text,
        )
    )
    add(
        Row(
            "prepare-tokenizer-dir-with-char",
            "prepare in.txt --tokenizer char --tokenizer-dir tokdir --out tok",
            "--tokenizer-dir with --tokenizer gpt2",
            {**text, "tokdir": Empty()},
        )
    )
    add(
        Row(
            "prepare-bpe-without-vocab-size",
            "prepare in.txt --tokenizer bpe --out tok",
            "--tokenizer bpe trains a BPE and needs --vocab-size N",
            text,
        )
    )
    for value in ("256", "0", "4294967297"):
        add(
            Row(
                f"prepare-vocab-size-{value}",
                f"prepare in.txt --tokenizer bpe --vocab-size {value} --out tok",
                f"--vocab-size: expected an integer in 257..4294967296 (the 256 bytes plus at least one merge), got "
                f"{value}",
                text,
            )
        )
    add(
        Row(
            "prepare-vocab-size-type",
            "prepare in.txt --tokenizer bpe --vocab-size many --out tok",
            "argument --vocab-size: invalid int value: 'many'",
            text,
        )
    )
    add(
        Row(
            "prepare-vocab-size-without-bpe",
            "prepare in.txt --vocab-size 300 --out tok",
            "--vocab-size is for --tokenizer bpe (training), not byte",
            text,
        )
    )
    add(
        Row(
            "prepare-memory-mb-too-small",
            "prepare in.txt --memory-mb 2 --out tok",
            "--memory-mb: expected an integer of at least 4 (MB per rank), got 2",
            text,
        )
    )
    add(
        Row(
            "prepare-memory-mb-type",
            "prepare in.txt --memory-mb lots --out tok",
            "argument --memory-mb: invalid int value: 'lots'",
            text,
        )
    )
    add(
        Row(
            "prepare-bpe-corpus-empty",
            "prepare in.txt --tokenizer bpe --vocab-size 300 --out tok",
            "prepare: the corpus is empty",
            {"in.txt": ""},
        )
    )
    # found after training: new/ removed
    add(
        Row(
            "prepare-bpe-too-small",
            "prepare in.txt --tokenizer bpe --vocab-size 300 --out new/tok",
            "the corpus has only 1 tokens, too few to split",
            {"in.txt": "a"},
        )
    )

    # import-gpt2
    add(
        Row(
            "hf-dir-missing",
            "import-gpt2 nohf --out out.h5",
            "nohf: GPT-2 model directory does not exist",
        )
    )
    add(
        Row(
            "hf-dir-is-a-file",
            "import-gpt2 hf --out out.h5",
            "hf: is not a directory",
            {"hf": "x\n"},
        )
    )
    add(
        Row(
            "hf-config-missing",
            "import-gpt2 hf --out out.h5",
            "config.json: not found",
            {"hf": Hf(drop_config=True)},
        )
    )
    add(
        Row(
            "hf-config-empty",
            "import-gpt2 hf --out out.h5",
            "config.json: not readable JSON",
            {"hf": Hf(config_text="")},
        )
    )
    add(
        Row(
            "hf-config-broken",
            "import-gpt2 hf --out out.h5",
            "config.json: not readable JSON",
            {"hf": Hf(config_text='{"model_type": "gpt2", "n_embd": ')},
        )
    )
    add(
        Row(
            "hf-config-not-object",
            "import-gpt2 hf --out out.h5",
            "config.json: expected a JSON object, got list",
            {"hf": Hf(config_text="[]")},
        )
    )
    add(
        Row(
            "hf-config-foreign",
            "import-gpt2 hf --out out.h5",
            "model_type is 'bert', expected \"gpt2\"",
            {"hf": Hf(config={"model_type": "bert"})},
        )
    )
    add(
        Row(
            "hf-config-missing-field",
            "import-gpt2 hf --out out.h5",
            "config.json: missing n_layer",
            {"hf": Hf(config={"n_layer": None})},
        )
    )
    add(
        Row(
            "hf-config-bad-value",
            "import-gpt2 hf --out out.h5",
            "config.json: n_head is 0, expected a positive",
            {"hf": Hf(config={"n_head": 0})},
        )
    )
    add(
        Row(
            "hf-config-unsupported",
            "import-gpt2 hf --out out.h5",
            "activation_function is 'relu'",
            {"hf": Hf(config={"activation_function": "relu"})},
        )
    )
    add(
        Row(
            "hf-config-disagrees-with-tensors",
            "import-gpt2 hf --out out.h5",
            "has shape",
            {"hf": Hf(config={"n_positions": 32})},
        )
    )
    add(
        Row(
            "hf-weights-missing",
            "import-gpt2 hf --out out.h5",
            "model.safetensors: not found",
            {"hf": Hf(weights="drop")},
        )
    )
    add(
        Row(
            "hf-weights-empty",
            "import-gpt2 hf --out out.h5",
            "model.safetensors: not a readable safetensors file",
            {"hf": Hf(weights="empty")},
        )
    )
    add(
        Row(
            "hf-weights-not-safetensors",
            "import-gpt2 hf --out out.h5",
            "model.safetensors: not a readable safetensors file",
            {"hf": Hf(weights="text")},
        )
    )
    add(
        Row(
            "hf-weights-truncated",
            "import-gpt2 hf --out out.h5",
            "model.safetensors: not a readable safetensors file",
            {"hf": Hf(weights="truncated")},
        )
    )
    add(
        Row(
            "hf-weights-missing-tensor",
            "import-gpt2 hf --out out.h5",
            "missing tensor transformer.ln_f.weight",
            {"hf": Hf(weights=("drop", "transformer.ln_f.weight"))},
        )
    )
    add(
        Row(
            "hf-out-is-a-directory",
            "import-gpt2 {hf} --out outdir",
            "outdir: is a directory",
            {"outdir": Empty()},
        )
    )
    # at 2 ranks the refusal to run under mpiexec comes first: nothing is created
    add(
        Row(
            "hf-out-parent-is-a-file",
            "import-gpt2 {hf} --out notes.txt/out.h5",
            "notes.txt/out.h5: cannot create",
            {"notes.txt": "notes\n"},
            ranks=(1,),
        )
    )
    from hpc_llm.data.tokenizer import BPETokenizer

    # 256 bytes + merges
    bpe = BPETokenizer.train(iter(["the quick brown fox jumps over the lazy dog\n"] * 50), 300)
    add(
        Row(
            "hf-tokenizer-json-broken",
            "import-gpt2 hf --out out.h5",
            "tokenizer.json: not a readable tokenizers JSON",
            {"hf": Hf(), "hf/tokenizer.json": '{"version": '},
        )
    )
    add(
        Row(
            "hf-tokenizer-merges-broken",
            "import-gpt2 hf --out out.h5",
            "not a readable GPT-2 BPE vocabulary",
            {
                "hf": Hf(),
                "hf/vocab.json": '{"a": 0, "b": 1}',
                "hf/merges.txt": "#version: 0.2\na b c d\n",
            },
        )
    )
    add(
        Row(
            "hf-tokenizer-larger-than-model",
            "import-gpt2 hf --out out.h5",
            f"hf: the tokenizer has {bpe.vocab_size} tokens, more than the model's vocab_size 77 in config.json",
            {"hf": Hf(), "hf/tokenizer.json": bpe.json},
        )
    )
    # data prepared with another tokenizer than the checkpoint's (char, from the base run): one line naming both
    ids = np.arange(64) % bpe.vocab_size
    bpe_meta = {
        "format": "hpc_llm-tokens",
        "format_version": 2,
        **bpe.meta(),
        "dtype": "uint16",
        "max_id": 63,
        "n_train": 48,
        "n_val": 16,
        "n_files": 1,
        "n_skipped": 0,
        "sources": ["in.txt"],
    }
    add(
        T(
            "resume-other-tokenizer",
            f"but data.path=bpedata has the bpe tokenizer, vocab {bpe.vocab_size}, sha256 "
            f"{bpe.sha256[:12]}",
            toml={"data.path": "bpedata", "model.n_layer": 1},
            args="--resume {ckpt}",
            files={
                "bpedata/meta.json": json.dumps(bpe_meta),
                "bpedata/train.bin": tokens(ids[:48]),
                "bpedata/val.bin": tokens(ids[48:]),
            },
        )
    )

    # plan
    plan = {"cfg.toml": Cfg()}
    add(
        Row(
            "plan-gpus-zero",
            "plan cfg.toml --cluster {cluster} --gpus 0",
            "--gpus: expected a positive integer, got 0",
            plan,
        )
    )
    add(
        Row(
            "plan-gpus-negative",
            "plan cfg.toml --cluster {cluster} --gpus -4",
            "--gpus: expected a positive integer, got -4",
            plan,
        )
    )
    add(
        Row(
            "plan-gpus-type",
            "plan cfg.toml --cluster {cluster} --gpus many",
            "argument --gpus: invalid int value",
            plan,
        )
    )
    add(
        Row(
            "plan-no-gpus",
            "plan cfg.toml --cluster {cluster}",
            "plan: give CONFIG and --gpus N",
            plan,
        )
    )
    add(
        Row(
            "plan-cluster-missing",
            "plan cfg.toml --cluster nope.toml --gpus 8",
            "cluster file nope.toml: not found",
            plan,
        )
    )
    add(
        Row(
            "plan-cluster-not-toml",
            "plan cfg.toml --cluster cl.toml --gpus 8",
            "cluster file cl.toml: invalid TOML",
            {**plan, "cl.toml": "[compute\n"},
        )
    )
    add(
        Row(
            "plan-cluster-empty",
            "plan cfg.toml --cluster cl.toml --gpus 8",
            "cluster file cl.toml: empty",
            {**plan, "cl.toml": ""},
        )
    )
    add(
        Row(
            "plan-cluster-foreign",
            "plan cfg.toml --cluster cl.toml --gpus 8",
            "cluster file cl.toml: missing figure",
            {**plan, "cl.toml": '[tool.poetry]\nname = "x"\n'},
        )
    )
    add(
        Row(
            "plan-config-missing",
            "plan nope.toml --cluster {cluster} --gpus 8",
            "config file nope.toml: not found",
        )
    )
    add(
        Row(
            "plan-config-bad-field",
            "plan cfg.toml --cluster {cluster} --gpus 8 --set model.n_layer=0",
            "config field model.n_layer: expected a positive integer",
            plan,
        )
    )
    add(
        Row(
            "plan-global-batch-zero",
            "plan cfg.toml --cluster {cluster} --gpus 8 --global-batch 0",
            "--global-batch: expected a positive integer, got 0",
            plan,
        )
    )
    add(
        Row(
            "plan-ranks-per-device-zero",
            "plan cfg.toml --cluster {cluster} --gpus 8 --ranks-per-device 0",
            "--ranks-per-device: expected a positive number, got 0.0",
            plan,
        )
    )
    add(
        Row(
            "plan-max-micro-zero",
            "plan cfg.toml --cluster {cluster} --gpus 8 --max-micro 0",
            "--max-micro: expected a positive integer, got 0",
            plan,
        )
    )
    add(
        Row(
            "plan-top-zero",
            "plan cfg.toml --cluster {cluster} --gpus 8 --top 0",
            "--top: expected a positive integer, got 0",
            plan,
        )
    )
    add(
        Row(
            "plan-timeline-dir-missing",
            "plan cfg.toml --cluster {cluster} --gpus 8 --timeline nodir/t.png",
            "--timeline nodir/t.png: directory nodir does not exist",
            plan,
        )
    )
    add(
        Row(
            "plan-compare-missing",
            "plan --cluster {cluster} --compare norun",
            "--compare norun: config.json not found",
        )
    )

    # bench
    add(Row("bench-comm-sizes", "bench comm --sizes lots", "--sizes: cannot read 'lots' as a size"))
    add(
        Row(
            "bench-comm-factor",
            "bench comm --factor 1",
            "--factor: expected an integer >= 2, got 1",
        )
    )
    add(Row("bench-comm-iters", "bench comm --sizes 4K --iters 0", "--iters must be >= 1"))
    add(
        Row(
            "bench-comm-comms",
            "bench comm --sizes 4K --comms pipeline",
            "--comms: unknown communicator(s) pipeline",
        )
    )
    add(
        Row(
            "bench-comm-collectives",
            "bench comm --sizes 4K --collectives scan",
            "--collectives: unknown scan",
        )
    )
    add(
        Row(
            "bench-comm-json-dir-missing",
            "bench comm --sizes 4K --json nodir/b.json",
            "--json nodir/b.json: directory nodir does not exist",
        )
    )
    add(
        Row(
            "bench-calibrate-out-dir-missing",
            "bench calibrate --out nodir/c.toml",
            "--out nodir/c.toml: directory nodir does not exist",
        )
    )

    # --comm-timeout-s (the watchdog cli.main arms before the verb): refused by the parser, before any MPI
    expect = "argument --comm-timeout-s: expected a non-negative number of seconds (0: off), got "
    add(T("train-comm-timeout-s", expect + "'-1'", args="--comm-timeout-s -1"))
    for verb, argv, value, shown in (
        ("generate", "generate {run}", "nan", "'nan'"),
        ("eval", "eval {run} --data {chardata}", "soon", "'soon'"),
        ("prepare", "prepare in.txt --out tok", "inf", "'inf'"),
        ("bench-comm", "bench comm --sizes 4K", "-0.5", "'-0.5'"),
        ("bench-calibrate", "bench calibrate --out c.toml", "''", "''"),
    ):
        files = {"in.txt": "hello world\n" * 20} if verb == "prepare" else {}
        add(
            Row(f"{verb}-comm-timeout-s", f"{argv} --comm-timeout-s {value}", expect + shown, files)
        )
    rows += _output_rows() + _cluster_rows()
    return rows


def _output_rows() -> list[Row]:
    """An output flag never destroys an input (the same file, through links, or a file of an input directory:
    refused, --force or not), and never replaces an existing file without --force."""
    rows: list[Row] = []
    add = rows.append
    ckpt = {"ck.h5": Ckpt()}
    is_input = "writing it would destroy it"
    exists = "file exists: give --force to replace it"
    for force in ("", " --force"):
        tag = "-force" if force else ""
        add(
            Row(
                f"generate-out-is-the-checkpoint{tag}",
                f"generate ck.h5 --max-new-tokens 2 --out ck.h5{force}",
                f"--out ck.h5: is the input ck.h5; {is_input}",
                ckpt,
            )
        )
        add(
            Row(
                f"prune-out-is-the-checkpoint{tag}",
                f"prune ck.h5 --heads 0.5 --out ck.h5{force}",
                f"prune --out ck.h5: is the input ck.h5; {is_input}",
                ckpt,
                ranks=(1,),
            )
        )
        add(
            Row(
                f"merge-lora-out-is-the-checkpoint{tag}",
                f"merge-lora ck.h5 --out ck.h5{force}",
                f"merge-lora --out ck.h5: is the input ck.h5; {is_input}",
                ckpt,
                ranks=(1,),
            )
        )
    add(
        Row(
            "generate-out-links-to-the-checkpoint",
            "generate ck.h5 --max-new-tokens 2 --out link.jsonl --force",
            f"--out link.jsonl: is the input ck.h5; {is_input}",
            {**ckpt, "link.jsonl": Link("ck.h5")},
        )
    )
    add(
        Row(
            "generate-out-in-the-run-directory",
            "generate run --max-new-tokens 2 --out run/latest --force",
            f"--out run/latest: is the input run/latest (in run); {is_input}",
            {"run": Copy("run")},
        )
    )
    add(
        Row(
            # the merged model would become the run's newest checkpoint (a LoRA run resumed without adapters)
            "merge-lora-out-a-checkpoint-name-in-a-run-directory",
            "merge-lora {ckpt} --out run/ckpt_00000099.h5",
            "merge-lora --out run/ckpt_00000099.h5: a checkpoint's name in the run directory run",
            {"run": Copy("run")},
            ranks=(1,),
        )
    )
    add(
        Row(
            "generate-out-is-the-prompts",
            "generate {run} --max-new-tokens 2 --prompts p.txt --out p.txt --force",
            f"--out p.txt: is the input p.txt; {is_input}",
            {"p.txt": "the\n"},
        )
    )
    add(
        Row(
            "generate-out-exists",
            "generate {run} --max-new-tokens 2 --out o.jsonl",
            f"--out o.jsonl: {exists}",
            {"o.jsonl": "earlier samples\n"},
        )
    )
    add(
        Row(
            "generate-out-is-a-directory",
            "generate {run} --max-new-tokens 2 --out outdir --force",
            "--out outdir: is a directory, expected a file path",
            {"outdir": Empty()},
        )
    )
    add(
        Row(
            "merge-lora-out-in-the-run-directory",
            "merge-lora run --out run/latest --force",
            f"merge-lora --out run/latest: is the input run/latest (in run); {is_input}",
            {"run": Copy("run")},
            ranks=(1,),
        )
    )
    add(
        Row(
            "merge-lora-out-exists",
            "merge-lora {ckpt} --out m.h5",
            f"merge-lora --out m.h5: {exists}",
            {"m.h5": b"an earlier merge"},
            ranks=(1,),
        )
    )
    add(
        Row(
            "import-gpt2-out-exists",
            "import-gpt2 {hf} --out out.h5",
            f"import-gpt2 --out out.h5: {exists}",
            {"out.h5": b"an earlier import"},
            ranks=(1,),
        )
    )
    add(
        Row(
            "import-gpt2-out-in-the-model-dir",
            "import-gpt2 hf --out hf/model.safetensors --force",
            f"import-gpt2 --out hf/model.safetensors: is the input hf/model.safetensors (in hf); {is_input}",
            {"hf": Hf()},
        )
    )
    plan = {"cfg.toml": Cfg()}
    add(
        Row(
            "plan-timeline-is-the-config",
            "plan cfg.toml --cluster {cluster} --gpus 8 --timeline cfg.toml --force",
            f"--timeline cfg.toml: is the input cfg.toml; {is_input}",
            plan,
        )
    )
    add(
        Row(
            "plan-timeline-is-the-cluster",
            "plan cfg.toml --cluster cl.toml --gpus 8 --timeline cl.png --force",
            f"--timeline cl.png: is the input cl.toml; {is_input}",
            {**plan, "cl.toml": Cl(), "cl.png": Link("cl.toml")},
        )
    )
    add(
        Row(
            "plan-timeline-exists",
            "plan cfg.toml --cluster {cluster} --gpus 8 --timeline t.png",
            f"--timeline t.png: {exists}",
            {**plan, "t.png": b"an earlier drawing"},
        )
    )
    add(
        Row(
            "bench-comm-json-exists",
            "bench comm --sizes 4K --iters 1 --json b.json",
            f"--json b.json: {exists}",
            {"b.json": "{}\n"},
        )
    )
    add(
        Row(
            "bench-calibrate-out-exists",
            "bench calibrate --out c.toml",
            f"--out c.toml: {exists}",
            {"c.toml": "# an earlier calibration\n"},
        )
    )
    # prepare's output is a directory: "exists" means it holds an earlier preparation's train.bin, val.bin or
    # meta.json (an empty directory, or other files, are fine: prepare writes only those three)
    add(
        Row(
            "prepare-out-holds-a-preparation",
            "prepare in.txt --out data",
            "prepare --out data: holds train.bin, val.bin, meta.json of an earlier preparation: give --force",
            {"in.txt": "some text\n" * 50, "data": Data()},
        )
    )
    add(
        Row(
            "prepare-out-is-an-input",
            "prepare corpus --out corpus --force",
            "prepare --out corpus: is the input corpus; choose another output directory",
            {"corpus/a.txt": "some text\n" * 50},
        )
    )
    add(
        Row(
            "prepare-out-file-is-an-input",
            "prepare data/meta.json --out data --force",
            f"prepare --out data: its meta.json is the input data/meta.json; {is_input}",
            {"data": Data()},
        )
    )
    # (an output directory inside an input folder is left out of the inputs, not refused: tests/data/test_data.py)
    return rows


def _cluster_rows() -> list[Row]:
    """Every cluster figure a finite positive number of its type, every section a table; a --compare run directory's
    files read with checks: each fault one line naming the file and the key."""
    rows: list[Row] = []
    add = rows.append
    plan = "plan cfg.toml --cluster cl.toml --gpus 8"
    cfg = {"cfg.toml": Cfg()}
    for id, subs, head, expect in (
        (
            "nan",
            [("memory_bytes = 80e9", "memory_bytes = nan")],
            "",
            "node.memory_bytes must be a finite positive number, got nan",
        ),
        (
            "inf",
            [("write_bw = 2.0e9", "write_bw = inf")],
            "",
            "storage.write_bw must be a finite positive number, got inf",
        ),
        (
            "negative-inf",
            [("latency_s = 3.0e-6", "latency_s = -inf")],
            "",
            "link.intra.latency_s must be a finite non-negative number, got -inf",
        ),
        (
            "gemm-rate-inf",
            [('"32" = 1.2e13, "64" = 2.2e13', '"32" = inf, "64" = 2.2e13')],
            "",
            "compute.gemm.float32.32 must be a finite positive number, got inf",
        ),
        (
            "devices-float",
            [("devices = 8", "devices = 8.5")],
            "",
            "node.devices must be a positive integer, got 8.5",
        ),
        (
            "devices-string",
            [("devices = 8", 'devices = "8"')],
            "",
            "node.devices must be a positive integer, got '8'",
        ),
        (
            "section-not-table",
            [("[node]\n", "node = 3\n[nodes]\n")],
            "",
            "cl.toml: [node] must be a table, got 3",
        ),
        (
            "compute-array",
            [("[compute]\n", "[computes]\n"), ("[compute.gemm]", "[computes.gemm]")],
            "compute = [1, 2]\n",
            "cl.toml: [compute] must be a table, got an array [1, 2]",
        ),
        (
            "gemm-number",
            [("[compute]\n", "[compute]\ngemm = 5\n"), ("[compute.gemm]", "[gemms]")],
            "",
            "cl.toml: [compute.gemm] must be a table, got 5",
        ),
        (
            "link-array",
            [("[link.intra]", "[links.intra]"), ("[link.inter]", "[links.inter]")],
            "link = [1]\n",
            "cl.toml: [link] must be a table, got an array [1]",
        ),
        (
            "link-intra-number",
            [("[link.intra]", "[link]\nintra = 5\n[links.intra]")],
            "",
            "cl.toml: [link.intra] must be a table, got 5",
        ),
        (
            "overlap-above-one",
            [("overlap = 1.0\n\n[link.inter]", "overlap = 2.0\n\n[link.inter]")],
            "",
            "link.intra.overlap must be a fraction in [0, 1], got 2.0",
        ),
        (
            "link-size-key-float",
            [("bw = 4.5e10\n", 'bw = 4.5e10\nbw_by_size = { "65536.5" = 1e9 }\n')],
            "",
            "link.inter.bw_by_size: key '65536.5' is not a positive integer (bytes)",
        ),
        (
            "link-size-rate-negative",
            [("bw = 4.5e10\n", 'bw = 4.5e10\nnb_bw_by_size = { "65536" = -1.0 }\n')],
            "",
            "link.inter.nb_bw_by_size.65536 must be a finite positive number, got -1.0",
        ),
        (
            "elementwise-key-nan",
            [('"65536" = 5.0e11', '"nan" = 5.0e11')],
            "",
            "compute.elementwise_bw: key 'nan' is not a finite positive number",
        ),
        (
            "elementwise-key-zero",
            [('"65536" = 5.0e11', '"0" = 5.0e11')],
            "",
            "compute.elementwise_bw: key '0' is not a finite positive number",
        ),
        (
            "elementwise-array",
            [("elementwise_bw = {", "elementwise_bw = [1e9] # {")],
            "",
            "compute.elementwise_bw must be a table {size = value, ...}, got an array [1000000000.0]",
        ),
        ("cast-array", [], "", "cl.toml: [compute.cast] must be a table, got an array [1]"),
        (
            "sources-array",
            [("[sources]", "[sourcesx]")],
            "sources = [1]\n",
            "cl.toml: [sources] must be a table, got an array [1]",
        ),
        (
            "name-table",
            [('name = "HGX', 'name = { a = 1 }\nnames = "HGX')],
            "",
            "cl.toml: name must be a string, got a table",
        ),
    ):
        if id == "cast-array":
            subs = [("[compute]\n", "[compute]\ncast = [1]\n")]
        add(
            Row(
                f"plan-cluster-{id}",
                plan,
                f"cluster file cl.toml: {expect}" if "cl.toml" not in expect else expect,
                {**cfg, "cl.toml": Cl(*subs, head=head)},
            )
        )
    compare = "plan --cluster {cluster} --gpus 1 --compare run"
    good = '{"kind": "train", "step": 1, "tokens_per_s": 1000.0}\n'
    for id, run, expect in (
        (
            "config-not-json",
            RunDir(config_text="{", metrics=good),
            "config.json: not a readable JSON file",
        ),
        (
            "config-array",
            RunDir(config_text="[]", metrics=good),
            "config.json: expected a JSON object of config sections",
        ),
        (
            "config-bad-field",
            RunDir({"model.n_layer": 0}, metrics=good),
            "config.json: config field model.n_layer: expected a positive integer",
        ),
        ("metrics-not-json", RunDir(metrics="{oops\n"), "metrics.jsonl: line 1: not JSON"),
        (
            "metrics-array",
            RunDir(metrics="[1, 2]\n"),
            "metrics.jsonl: line 1: expected a JSON object",
        ),
        (
            "metrics-no-rate",
            RunDir(metrics='{"kind": "train", "step": 1}\n'),
            "metrics.jsonl: line 1: tokens_per_s must be a finite positive number, got None",
        ),
        (
            "metrics-zero-rate",
            RunDir(metrics='{"kind": "train", "tokens_per_s": 0}\n'),
            "metrics.jsonl: line 1: tokens_per_s must be a finite positive number, got 0",
        ),
        (
            "metrics-nan-rate",
            RunDir(metrics='{"kind": "train", "tokens_per_s": NaN}\n'),
            "metrics.jsonl: line 1: tokens_per_s must be a finite positive number, got nan",
        ),
        (
            "metrics-text-rate",
            RunDir(metrics='{"kind": "train", "tokens_per_s": "fast"}\n'),
            "metrics.jsonl: line 1: tokens_per_s must be a finite positive number, got 'fast'",
        ),
    ):
        add(Row(f"plan-compare-{id}", compare, f"--compare run: {expect}", {"run": run}))
    return rows


ROWS = _rows()
_BASE: dict = {}


# -- running the rows ------------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict:
    """Every file and directory under root: its bytes' digest (files) or "dir"; a file: its own digest."""
    if root.is_file():
        return {root.name: hashlib.sha1(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        out[p.relative_to(root).as_posix()] = (
            "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
        )
    return out


def _env() -> dict:
    env = dict(os.environ)
    # the processes run the hpc_llm this test imported, whatever the venv's editable install points at
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(hpc_llm.__file__).parents[1])]
        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.pop("_PYTEST_MPI_CHILD_PROCESS", None)
    return env


def _run(cmd: list[str], cwd: Path) -> tuple[int, str, str]:
    """The command's exit status, stdout and stderr; killed with its whole process group after RUN_TIMEOUT."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        return -1, out, err + f"\n[timed out after {RUN_TIMEOUT} s]"
    return proc.returncode, out, err


class Run(NamedTuple):
    rc: int  # the launcher's (1 rank: the process's)
    out: str
    err: str
    ranks: list  # [(rc, stdout, stderr)] per rank
    before: dict
    after: dict
    argv: list


def run_row(row: Row, nranks: int, root: Path) -> Run:
    work = root / f"{row.id}.np{nranks}"
    work.mkdir()
    for rel, content in row.files.items():
        write(work / rel, content)
    argv = shlex.split(row.argv.format(**{k: str(v) for k, v in _BASE.items()}))
    before = snapshot(work)
    if nranks == 1:
        rc, out, err = _run([sys.executable, "-m", "hpc_llm", *argv], work)
        ranks = [(rc, out, err)]
    else:
        logs = root / f"{row.id}.np{nranks}.logs"
        logs.mkdir()
        q = shlex.quote(str(logs))
        rank = "${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-x}}"
        # each rank's streams and status apart; sh itself exits 0, so the launcher never kills a rank still printing
        script = f'"$0" -m hpc_llm "$@" >{q}/out.{rank} 2>{q}/err.{rank}; echo $? >{q}/rc.{rank}'
        for _attempt in range(3):
            rc, out, err = _run(
                [
                    shutil.which("mpiexec"),
                    "--oversubscribe",
                    "-n",
                    str(nranks),
                    "sh",
                    "-c",
                    script,
                    sys.executable,
                    *argv,
                ],
                work,
            )
            # Open MPI's launcher sometimes fails to start at all when several start at once ("The PMIx server's
            # listener thread failed to start", status 213, seen here at 8 concurrent launches): no rank ran, so
            # nothing of hpc_llm was tested; launch again. Any run in which a rank started is judged as it is.
            if rc == 0 or any(logs.iterdir()):
                break
        ranks = []
        for r in range(nranks):
            f = logs / f"rc.{r}"
            ranks.append(
                (
                    int(f.read_text()) if f.exists() else None,
                    (logs / f"out.{r}").read_text() if (logs / f"out.{r}").exists() else "",
                    (logs / f"err.{r}").read_text() if (logs / f"err.{r}").exists() else "",
                )
            )
    return Run(rc, out, err, ranks, before, snapshot(work), argv)


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus_file):
    """Shared read-only inputs: byte and char data directories, a trained char checkpoint (and its run directory), a
    checkpoint imported from the Hugging Face fixture."""
    root = tmp_path_factory.mktemp("bad_input_base")
    prepare([corpus_file], root / "data", tokenizer="byte")
    prepare([corpus_file], root / "chardata", tokenizer="char")
    cfg = root / "char.toml"
    Cfg(
        {
            "model.n_layer": 1,
            "data.path": str(root / "chardata"),
            "train.out_dir": str(root / "run"),
        }
    ).make(cfg, {})
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hpc_llm", *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for cmd in (
            ["train", str(cfg)],
            ["import-gpt2", str(HF_FIXTURE), "--out", str(root / "gpt2.h5")],
        )
    ]
    for p in procs:
        out, err = p.communicate(timeout=RUN_TIMEOUT)
        assert p.returncode == 0, (p.args, out, err)
    (ckpt,) = sorted((root / "run").glob("ckpt_*.h5"))
    _BASE.update(
        data=root / "data",
        chardata=root / "chardata",
        run=root / "run",
        ckpt=ckpt,
        gpt2=root / "gpt2.h5",
        hf=HF_FIXTURE,
        cluster=CLUSTER,
    )
    return root


@pytest.fixture(scope="module")
def results(request, base, tmp_path_factory):
    """Every selected (row, ranks) run, a few at a time; {(row id, ranks): Run}. Also the shared inputs' snapshots
    before and after, under the key "base"."""
    if shutil.which("mpiexec") is None:
        pytest.fail("mpiexec is not on PATH (scripts/test.sh puts the venv's Open MPI there)")
    wanted = []
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and "row" in params:
            wanted.append((params["row"], params["nranks"]))
    root = tmp_path_factory.mktemp("bad_input_rows")
    watched = [base, HF_FIXTURE, CLUSTER]
    before = [snapshot(p) for p in watched]
    t0 = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {
            (row.id, n): pool.submit(run_row, row, n, root)
            for row, n in wanted
            if not row.skip and n in row.ranks
        }
        runs = {key: f.result() for key, f in futures.items()}
    runs["base"] = (before, [snapshot(p) for p in watched])
    runs["seconds"] = time.monotonic() - t0
    return runs


# -- the checks ------------------------------------------------------------------------------------------------------


def _one_error_line(rc, out: str, err: str, expect: str, where: str) -> str:
    assert "Traceback" not in err and "Traceback" not in out, f"{where}: a traceback\n{err}"
    assert rc == 2, f"{where}: exit status {rc}, expected 2\nstdout: {out}\nstderr: {err}"
    lines = err.splitlines()
    assert len(lines) == 1, f"{where}: stderr has {len(lines)} lines, expected 1:\n{err}"
    assert lines[0].startswith("hpc-llm: error: "), f"{where}: {lines[0]!r}"
    assert expect in lines[0], f"{where}: {expect!r} not in {lines[0]!r}"
    return lines[0]


# each row at the rank counts where it means something (tp/dp rows need 2 ranks); a row this environment cannot
# run (CuPy installed, h5py with MPI) is left out here: CI's environment runs them all
CASES = [(row, n) for row in ROWS for n in (1, 2) if n in row.ranks and not row.skip]


@pytest.mark.timeout(TEST_TIMEOUT)
@pytest.mark.parametrize(("row", "nranks"), CASES, ids=[f"{r.id}-{n}" for r, n in CASES])
def test_bad_input(row, nranks, results):
    run = results[(row.id, nranks)]
    where = f"{row.id} at {nranks} rank(s): hpc-llm {shlex.join(run.argv)}"
    if nranks == 1:
        _one_error_line(run.rc, run.out, run.err, row.expect, where)
    else:
        assert run.rc == 0 and "Traceback" not in run.err, (
            f"{where}: the launcher: {run.rc}\n{run.out}\n{run.err}"
        )
        lines = [
            _one_error_line(rc, out, err, row.expect, f"{where}, rank {r}")
            for r, (rc, out, err) in enumerate(run.ranks)
        ]
        assert len(set(lines)) == 1, f"{where}: the ranks disagree: {lines}"
    assert run.after == run.before, (
        f"{where}: the directory changed: {sorted(set(run.after) ^ set(run.before))}"
    )


@pytest.mark.timeout(TEST_TIMEOUT)
def test_shared_inputs_unchanged(results):
    """No row wrote into the shared data, checkpoints, the Hugging Face fixture or the cluster file."""
    before, after = results["base"]
    for b, a in zip(before, after):
        assert a == b, sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.mark.timeout(30)
def test_table_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.mark.timeout(30)
def test_table_covers_every_config_field():
    """A field added to hpc_llm/config/sections.py needs its rows here (at least a value of the wrong type)."""
    from dataclasses import fields

    cfg = Config()
    every = {f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))}
    covered = {r.id.removesuffix("-type") for r in ROWS if r.id.endswith("-type")}
    assert every <= covered, sorted(every - covered)
