"""Run configuration: dataclasses per TOML section, loaded with tomllib, overridden with `--set section.key=value`.

load_config validates what it loads (hpc_llm/config_checks.py), before any compute, and returns a config that is not
changed afterwards: what the start-up resolves later (model.vocab_size from the data or a checkpoint) makes a new one.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from hpc_llm.config_checks import validated
from hpc_llm.errors import UserError


@dataclass
class ModelConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    vocab_size: int = 0  # 0: take it from the prepared data's meta.json
    dropout: float = 0.0
    dtype: str = "float32"  # "float32" or "float64"
    bias: bool = True  # biases in the linear layers and LayerNorms (GPT-2: true; nanoGPT's shakespeare runs: false)
    # LoRA (docs/fine-tuning.md): > 0 adds adapters A (in, r) and B (r, out) beside each target linear layer,
    # y = x W + b + (lora_alpha / lora_rank) x A B; every base parameter is then frozen, the adapters train
    lora_rank: int = 0
    lora_alpha: float = (
        8.0  # the adapters' scale is lora_alpha / lora_rank (PEFT's default alpha 8: 1.0 at rank 8)
    )
    lora_targets: list[str] = field(
        default_factory=lambda: ["attn.c_attn"]
    )  # among config_checks.LORA_TARGETS

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank > 0 else 0.0

    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up to a multiple of 64 (speed, and room for a TP split); pad logits are masked."""
        return -(-self.vocab_size // 64) * 64


@dataclass
class DataConfig:
    path: str = "data/stdlib"  # a directory written by `hpc-llm prepare`


@dataclass
class TrainConfig:
    batch_size: int = (
        12  # sequences per micro-batch (the whole micro-batch, over all data-parallel ranks)
    )
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    seed: int = 1337
    out_dir: str = "runs/default"
    backend: str = "numpy"
    recompute: str = (
        "none"  # "block": backward recomputes each block's forward from its input (keeps only that)
    )
    # "fp32" (model.dtype's: also float64), "bf16" or "fp16": matmul operands and kept activations in that format,
    # fp32 master weights and moments (hpc_llm/model/precision.py)
    precision: str = "fp32"
    loss_scale_init: float = (
        65536.0  # fp16's dynamic loss scale: its start (2^16, as PyTorch's GradScaler)
    )
    loss_scale_window: int = (
        1000  # fp16: clean steps in a row before the scale doubles (Megatron's window)
    )
    peak_tflops: float = (
        0.0  # MFU denominator per rank (summed over ranks); 0: measure a float32 matmul at start
    )
    # a step whose loss or gradient norm is not finite is skipped on every rank; this many in a row stop the run with
    # a checkpoint of the last good state (fp16's loss-scaler overflows are counted apart: they are expected)
    max_bad_steps: int = 10
    # > 0: also skip a step whose loss exceeds the running mean of recent losses by this many standard deviations
    spike_sigma: float = 0.0
    # a checkpoint whose model weights start a fresh run (new optimizer state, step 0; "" : initialise from the seed);
    # --resume of this run's own checkpoints wins over it (docs/fine-tuning.md)
    init_from: str = ""
    # fnmatch patterns over parameter names (e.g. "h.*.attn.*", "wte.weight"): those parameters are not trained
    freeze: list[str] = field(default_factory=list)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size (stages); data-parallel size = number of ranks / (pp * tp)
    # layers of each pipeline stage in model order (pp * virtual_stages entries, summing to model.n_layer); empty: even
    pp_layers: list[int] = field(default_factory=list)
    schedule: str = "1f1b"  # "1f1b", "interleaved" (needs virtual_stages >= 2) or "gpipe"
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    zero: int = 0  # 1: ZeRO-1, Adam moments sharded over the data-parallel group
    bucket_mb: float = 25.0  # data-parallel gradient bucket size (MiB)
    # a rank waiting longer than this in one collective or transfer aborts the job, naming the operation; 0: never
    comm_timeout_s: float = 600.0
    # the data-parallel gradient reduction: "fp32" (the gradients' dtype, uncompressed), "bf16" / "fp16" (16-bit
    # buckets, fp32 sums) or "powersgd" (low-rank, error feedback); hpc_llm/parallel/compression.py
    grad_comm: str = "fp32"
    powersgd_rank: int = 4  # PowerSGD's approximation rank r
    powersgd_start: int = 0  # steps reduced uncompressed (fp32) before PowerSGD starts


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 3
    # "gather": rank 0 writes the file with serial h5py; "mpio": all ranks write their share of it (h5py built with
    # MPI); "auto": mpio when h5py has MPI and there are several ranks, else gather. The file is the same.
    writer: str = "auto"
    on_error: str = (
        "stop"  # a save that fails (disk full, I/O error): "stop" the run, or "continue" without it
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_vocab(self, vocab_size: int) -> Config:
        """A copy with model.vocab_size set (resolved from the data or a checkpoint); this config unchanged."""
        return dataclasses.replace(
            self, model=dataclasses.replace(self.model, vocab_size=vocab_size)
        )


def _coerce(section: str, name: str, value, typ: type):
    where = f"{section}.{name}"
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:  # list[int]: a TOML array, or `--set a.b=[3, 1]` / `--set a.b=3,1`
        if isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            try:
                value = [int(v) for v in text.split(",")] if text.strip() else []
            except ValueError:
                pass
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return list(value)
        raise UserError(f"config field {where}: expected a list of integers, got {value!r}")
    raise UserError(f"config field {where}: expected {typ.__name__}, got {value!r}")


def _apply(cfg: Config, section: str, values: dict, source: str) -> None:
    if section not in {f.name for f in fields(cfg)}:
        raise UserError(
            f"{source}: unknown section [{section}] (expected one of: "
            f"{', '.join(f.name for f in fields(cfg))})"
        )
    if not isinstance(values, dict):
        raise UserError(f"{source}: [{section}] must be a table")
    sub = getattr(cfg, section)
    types = {f.name: f.type for f in fields(sub)}
    for key, value in values.items():
        if key not in types:
            raise UserError(
                f"{source}: unknown key {section}.{key} (expected one of: {', '.join(types)})"
            )
        if types[key] == "list[str]":
            setattr(sub, key, _coerce_strings(f"{section}.{key}", value))
            continue
        typ = {"int": int, "float": float, "str": str, "bool": bool, "list[int]": list}[types[key]]
        setattr(sub, key, _coerce(section, key, value, typ))


def _coerce_strings(where: str, value) -> list[str]:
    """list[str]: a TOML array of strings, or `--set a.b=[x, y]` / `--set a.b=x,y` (quotes optional)."""
    if isinstance(value, str):
        text = value.strip().removeprefix("[").removesuffix("]")
        value = [v.strip().strip("\"'") for v in text.split(",")] if text.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise UserError(f"config field {where}: expected a list of non-empty strings, got {value!r}")


def parse_override(text: str) -> tuple[str, str, str]:
    """`section.key=value` -> (section, key, value-as-text)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    lhs, value = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    return section, key, value.strip()


def read_toml(path: str | Path, what: str) -> dict:
    """A TOML file's tables; a missing file or bad TOML is a one-line UserError naming `what` file it was."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory, expected a TOML file")
    if not path.is_file():
        raise UserError(f"{what} {path}: not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {path}: not UTF-8 text (byte {e.start}), expected a TOML file"
        ) from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    if not text.strip():
        raise UserError(f"{what} {path}: empty, expected TOML tables")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {path}: invalid TOML ({e})") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML config (or defaults when path is None), apply overrides, validate."""
    cfg = Config()
    if path is not None:
        data = read_toml(path, "config file")
        for section, values in data.items():
            _apply(cfg, section, values, str(path))
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(cfg, section, {key: value}, "--set")
    return validated(cfg)


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        _apply(cfg, section, values, "checkpoint config")
    return cfg


def stage_layers(n_layer: int, stages: int, pp_layers: list[int] = ()) -> list[range]:
    """The layers of each (virtual) pipeline stage, in model order: as pp_layers gives, else evenly."""
    counts = list(pp_layers) or [n_layer // stages] * stages
    edges = [sum(counts[:i]) for i in range(stages + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(stages)]
