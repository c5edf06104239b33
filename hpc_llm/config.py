"""Run configuration: dataclasses per TOML section, loaded with tomllib, overridden with `--set section.key=value`.

Validation happens here, before any compute, and raises UserError naming the field and what was expected. Every rank
reads the same file and overrides, so every rank reaches the same verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from hpc_llm.errors import UserError

LORA_TARGETS = (
    "attn.c_attn",
    "attn.c_proj",
    "mlp.c_fc",
    "mlp.c_proj",
)  # the linear layers of a block


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
    lora_targets: list[str] = field(default_factory=lambda: ["attn.c_attn"])  # among LORA_TARGETS

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
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        _apply(cfg, section, values, "checkpoint config")
    return cfg


def validate(cfg: Config) -> None:
    m, t, c, par = cfg.model, cfg.train, cfg.checkpoint, cfg.parallel

    def need(ok: bool, where: str, expected: str, value) -> None:
        if not ok:
            raise UserError(f"config field {where}: expected {expected}, got {value!r}")

    for section in fields(
        cfg
    ):  # inf would pass the range checks below (nan fails them, less clearly)
        for f in fields(getattr(cfg, section.name)):
            if f.type == "float":
                value = getattr(getattr(cfg, section.name), f.name)
                need(math.isfinite(value), f"{section.name}.{f.name}", "a finite number", value)
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        need(getattr(m, name) > 0, f"model.{name}", "a positive integer", getattr(m, name))
    need(m.vocab_size >= 0, "model.vocab_size", "0 (from data) or a positive integer", m.vocab_size)
    need(
        m.n_embd % m.n_head == 0, "model.n_embd", f"a multiple of model.n_head={m.n_head}", m.n_embd
    )
    need(0.0 <= m.dropout < 1.0, "model.dropout", "a value in [0, 1)", m.dropout)
    need(m.dtype in ("float32", "float64"), "model.dtype", '"float32" or "float64"', m.dtype)
    for name in ("batch_size", "grad_accum", "eval_interval", "log_interval"):
        need(getattr(t, name) > 0, f"train.{name}", "a positive integer", getattr(t, name))
    for name in ("max_iters", "warmup_iters", "eval_iters"):
        need(getattr(t, name) >= 0, f"train.{name}", "a non-negative integer", getattr(t, name))
    need(t.lr > 0, "train.lr", "a positive number", t.lr)
    need(0 <= t.min_lr <= t.lr, "train.min_lr", f"a number in [0, train.lr={t.lr}]", t.min_lr)
    need(
        t.lr_decay_iters >= t.warmup_iters,
        "train.lr_decay_iters",
        f">= train.warmup_iters={t.warmup_iters}",
        t.lr_decay_iters,
    )
    need(t.weight_decay >= 0, "train.weight_decay", "a non-negative number", t.weight_decay)
    need(0 <= t.beta1 < 1, "train.beta1", "a value in [0, 1)", t.beta1)
    need(0 <= t.beta2 < 1, "train.beta2", "a value in [0, 1)", t.beta2)
    need(t.eps > 0, "train.eps", "a positive number", t.eps)
    need(t.grad_clip >= 0, "train.grad_clip", "a non-negative number (0 disables)", t.grad_clip)
    need(t.backend in ("numpy", "cupy"), "train.backend", '"numpy" or "cupy"', t.backend)
    need(t.recompute in ("none", "block"), "train.recompute", '"none" or "block"', t.recompute)
    need(
        t.precision in ("fp32", "bf16", "fp16"),
        "train.precision",
        '"fp32", "bf16" or "fp16"',
        t.precision,
    )
    need(
        t.precision == "fp32" or m.dtype == "float32",
        "train.precision",
        f'"fp32" with model.dtype={m.dtype} (bf16/fp16 keep float32 master weights)',
        t.precision,
    )
    need(
        t.loss_scale_init > 0,
        "train.loss_scale_init",
        "a positive number (fp16's initial loss scale)",
        t.loss_scale_init,
    )
    need(
        t.loss_scale_window >= 1,
        "train.loss_scale_window",
        "a positive integer",
        t.loss_scale_window,
    )
    if t.precision == "bf16":
        from hpc_llm.model.precision import low_dtype

        low_dtype("bf16")  # ml_dtypes must be importable: one line otherwise
    need(
        t.peak_tflops >= 0, "train.peak_tflops", "a non-negative number (0: measure)", t.peak_tflops
    )
    need(bool(t.out_dir), "train.out_dir", "a directory path", t.out_dir)
    need(
        bool(cfg.data.path),
        "data.path",
        "a directory path (written by `hpc-llm prepare`)",
        cfg.data.path,
    )
    need(t.seed >= 0, "train.seed", "a non-negative integer", t.seed)
    need(par.tp >= 1, "parallel.tp", "a positive integer", par.tp)
    need(par.pp >= 1, "parallel.pp", "a positive integer", par.pp)
    need(
        par.virtual_stages >= 1, "parallel.virtual_stages", "a positive integer", par.virtual_stages
    )
    need(
        par.schedule in ("1f1b", "interleaved", "gpipe"),
        "parallel.schedule",
        '"1f1b", "interleaved" or "gpipe"',
        par.schedule,
    )
    check_pipeline(par.pp, par.virtual_stages, par.schedule, par.pp_layers, m.n_layer, t.grad_accum)
    need(par.zero in (0, 1), "parallel.zero", "0 or 1", par.zero)
    need(par.bucket_mb > 0, "parallel.bucket_mb", "a positive number", par.bucket_mb)
    need(
        par.comm_timeout_s >= 0,
        "parallel.comm_timeout_s",
        "a non-negative number of seconds (0: no watchdog)",
        par.comm_timeout_s,
    )
    need(
        par.grad_comm in ("fp32", "bf16", "fp16", "powersgd"),
        "parallel.grad_comm",
        '"fp32", "bf16", "fp16" or "powersgd"',
        par.grad_comm,
    )
    need(
        par.grad_comm not in ("bf16", "fp16") or m.dtype == "float32",
        "parallel.grad_comm",
        f'"fp32" or "powersgd" with model.dtype={m.dtype} (16-bit gradient communication needs float32 training)',
        par.grad_comm,
    )
    if par.grad_comm == "bf16":
        from hpc_llm.model.precision import low_dtype

        low_dtype("bf16")  # ml_dtypes must be importable: one line otherwise
    need(par.powersgd_rank >= 1, "parallel.powersgd_rank", "a positive integer", par.powersgd_rank)
    need(
        par.powersgd_start >= 0,
        "parallel.powersgd_start",
        "a non-negative integer",
        par.powersgd_start,
    )
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "a positive integer", t.max_bad_steps)
    need(
        t.spike_sigma >= 0,
        "train.spike_sigma",
        "a non-negative number (0: no spike guard)",
        t.spike_sigma,
    )
    need(
        c.on_error in ("stop", "continue"),
        "checkpoint.on_error",
        '"stop" or "continue"',
        c.on_error,
    )
    need(
        c.interval >= 0,
        "checkpoint.interval",
        "a non-negative integer (0: only at the end)",
        c.interval,
    )
    need(c.keep_last >= 1, "checkpoint.keep_last", "a positive integer", c.keep_last)
    need(
        c.writer in ("auto", "gather", "mpio"),
        "checkpoint.writer",
        '"auto", "gather" or "mpio"',
        c.writer,
    )
    check_finetune(cfg)


def check_finetune(cfg: Config) -> None:
    """LoRA's fields and train.freeze's patterns (each must match a parameter of the model)."""
    m, t = cfg.model, cfg.train
    if m.lora_rank < 0 or m.lora_rank > m.n_embd:
        raise UserError(
            f"config field model.lora_rank: expected 0 (off) or an integer in [1, model.n_embd="
            f"{m.n_embd}], got {m.lora_rank!r}"
        )
    if m.lora_alpha <= 0:
        raise UserError(
            f"config field model.lora_alpha: expected a positive number, got {m.lora_alpha!r}"
        )
    bad = [x for x in m.lora_targets if x not in LORA_TARGETS]
    if (
        bad
        or (m.lora_rank > 0 and not m.lora_targets)
        or len(set(m.lora_targets)) != len(m.lora_targets)
    ):
        raise UserError(
            f"config field model.lora_targets: expected distinct names among {list(LORA_TARGETS)}"
            f"{' (at least one with model.lora_rank > 0)' if not bad else ''}, got {m.lora_targets!r}"
            + (f" ({bad[0]!r} matches no linear layer)" if bad else "")
        )
    # the canonical order (the model's, LORA_TARGETS'): a reordered list is the same model, resume and init_from
    # compare it as given
    m.lora_targets = canonical_targets(m.lora_targets)
    if t.freeze:
        import fnmatch

        from hpc_llm.model.layout import frozen_names, param_specs

        names = [
            s.name for s in param_specs(m)
        ]  # the whole model's (names do not depend on the vocabulary)
        for pattern in t.freeze:
            if not fnmatch.filter(names, pattern):
                raise UserError(
                    f"config field train.freeze: pattern {pattern!r} matches no parameter (names like "
                    f"{names[1]!r}, 'h.0.attn.c_attn.weight', 'h.*.mlp.*')"
                )
        if len(frozen_names(m, t.freeze)) == len(names):  # a run that would update nothing
            raise UserError(
                f"config field train.freeze: {t.freeze!r} freezes every parameter"
                + (
                    " (model.lora_rank > 0 freezes the base: these patterns also cover every LoRA adapter)"
                    if m.lora_rank > 0
                    else ""
                )
                + ": nothing left to train"
            )


def canonical_targets(targets) -> list[str]:
    """model.lora_targets in LORA_TARGETS' order (the model's), names not among them kept after, as given."""
    return [x for x in LORA_TARGETS if x in targets] + [x for x in targets if x not in LORA_TARGETS]


def check_pipeline(
    pp: int, v: int, schedule: str, pp_layers: list[int], n_layer: int, micro_batches: int
) -> None:
    """The pipeline split must give every (virtual) stage at least one layer; interleaving needs its micro-batches."""
    stages = pp * v
    if schedule == "interleaved":
        if v < 2:
            raise UserError(
                f"parallel.schedule=interleaved needs parallel.virtual_stages >= 2, got {v}"
            )
        if pp < 2:
            raise UserError(f"parallel.schedule=interleaved needs parallel.pp >= 2, got {pp}")
        if micro_batches % pp:
            raise UserError(
                f"parallel.schedule=interleaved: train.grad_accum={micro_batches} (the micro-batches) "
                f"must be a multiple of parallel.pp={pp}"
            )
    elif v != 1:
        raise UserError(
            f"parallel.virtual_stages={v} needs parallel.schedule=interleaved (got {schedule!r})"
        )
    if pp_layers:
        if len(pp_layers) != stages:
            raise UserError(
                f"parallel.pp_layers={pp_layers}: expected {stages} entries (parallel.pp={pp} x "
                f"parallel.virtual_stages={v}), got {len(pp_layers)}"
            )
        if min(pp_layers) < 1:
            raise UserError(f"parallel.pp_layers={pp_layers}: every stage needs at least one layer")
        if sum(pp_layers) != n_layer:
            raise UserError(
                f"parallel.pp_layers={pp_layers} sums to {sum(pp_layers)}, not model.n_layer={n_layer}"
            )
    elif n_layer % stages:
        what = f"parallel.pp={pp}" + (f" x parallel.virtual_stages={v}" if v > 1 else "")
        raise UserError(
            f"{what} = {stages} stages do not divide model.n_layer={n_layer} evenly (set "
            f"parallel.pp_layers for an uneven split)"
        )


def stage_layers(n_layer: int, stages: int, pp_layers: list[int] = ()) -> list[range]:
    """The layers of each (virtual) pipeline stage, in model order: as pp_layers gives, else evenly."""
    counts = list(pp_layers) or [n_layer // stages] * stages
    edges = [sum(counts[:i]) for i in range(stages + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(stages)]
