"""The run configuration's checks: each field's range and the fields' agreement, before any compute.

Every failure is a UserError naming the field and what was expected. Every rank reads the same file and overrides, so
every rank reaches the same verdict. Checks that need the model's parameter names (train.freeze's patterns) are the
start-up's (hpc_llm/train/startup.py): the config package imports nothing from hpc_llm.model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields

from hpc_llm.backend import low_dtype
from hpc_llm.config.sections import Config
from hpc_llm.errors import UserError

# the linear layers of a block
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def validated(cfg: Config) -> Config:
    """cfg checked (check_config), as a new Config with model.lora_targets in the canonical order; cfg unchanged."""
    check_config(cfg)
    model = dataclasses.replace(cfg.model, lora_targets=canonical_targets(cfg.model.lora_targets))
    return dataclasses.replace(cfg, model=model)


def check_config(cfg: Config) -> None:
    """Every field's range and the fields' agreement; raises the first failure's UserError."""
    _check_finite(cfg)
    _check_model(cfg)
    _check_train(cfg)
    _check_parallel(cfg)
    _check_faults(cfg)
    check_lora(cfg.model)


def need(ok: bool, where: str, expected: str, value) -> None:
    if not ok:
        raise UserError(f"config field {where}: expected {expected}, got {value!r}")


def _check_finite(cfg: Config) -> None:
    """inf would pass the range checks below (nan fails them, less clearly)."""
    for section in fields(cfg):
        for f in fields(getattr(cfg, section.name)):
            if f.type == "float":
                value = getattr(getattr(cfg, section.name), f.name)
                need(math.isfinite(value), f"{section.name}.{f.name}", "a finite number", value)


def _check_model(cfg: Config) -> None:
    m = cfg.model
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        need(getattr(m, name) > 0, f"model.{name}", "a positive integer", getattr(m, name))
    need(m.vocab_size >= 0, "model.vocab_size", "0 (from data) or a positive integer", m.vocab_size)
    need(m.head_dim >= 0, "model.head_dim", "0 (n_embd / n_head) or a positive integer", m.head_dim)
    need(m.n_inner >= 0, "model.n_inner", "0 (4 n_embd) or a positive integer", m.n_inner)
    need(
        m.head_dim > 0 or m.n_embd % m.n_head == 0,
        "model.n_embd",
        f"a multiple of model.n_head={m.n_head} (or model.head_dim set)",
        m.n_embd,
    )
    need(0.0 <= m.dropout < 1.0, "model.dropout", "a value in [0, 1)", m.dropout)
    need(m.dtype in ("float32", "float64"), "model.dtype", '"float32" or "float64"', m.dtype)


def _check_train(cfg: Config) -> None:
    t = cfg.train
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
    need(
        t.recompute in ("none", "selective", "block"),
        "train.recompute",
        '"none", "selective" or "block"',
        t.recompute,
    )
    _check_precision(cfg)
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
    need(0 <= t.distill_alpha <= 1, "train.distill_alpha", "a value in [0, 1]", t.distill_alpha)
    need(
        t.distill_temperature > 0,
        "train.distill_temperature",
        "a positive number",
        t.distill_temperature,
    )


def _check_precision(cfg: Config) -> None:
    m, t = cfg.model, cfg.train
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
        low_dtype("bf16")  # the optional ml_dtypes package must be importable: one line otherwise


def _check_parallel(cfg: Config) -> None:
    m, t, par = cfg.model, cfg.train, cfg.parallel
    need(par.layout in ("", "auto"), "parallel.layout", '"auto" or "" (as set)', par.layout)
    need(par.tp >= 1, "parallel.tp", "a positive integer", par.tp)
    need(par.pp >= 1, "parallel.pp", "a positive integer", par.pp)
    need(
        par.virtual_stages >= 1, "parallel.virtual_stages", "a positive integer", par.virtual_stages
    )
    need(
        par.schedule in ("1f1b", "interleaved", "gpipe", "zb-h1", "zbv"),
        "parallel.schedule",
        '"1f1b", "interleaved", "gpipe", "zb-h1" or "zbv"',
        par.schedule,
    )
    shape = (par.pp, par.virtual_stages, par.schedule, t.grad_accum)
    check_pipeline_shape(*shape, m.n_layer, par.pp_layers, FIELDS)
    check_sequence_parallel(par.sequence_parallel, par.tp, m, FIELDS)
    need(
        par.act_comm in ("fp32", "bf16", "fp16"),
        "parallel.act_comm",
        '"fp32", "bf16" or "fp16"',
        par.act_comm,
    )
    check_act_comm(par.act_comm, m, FIELDS)
    if par.act_comm == "bf16":
        low_dtype("bf16")
    need(par.zero in (0, 1, 2, 3), "parallel.zero", "0, 1, 2 or 3", par.zero)
    check_zero_schedule(par.zero, par.schedule, FIELDS)
    need(
        par.zero < 2 or par.grad_comm == "fp32",
        "parallel.grad_comm",
        f'"fp32" with parallel.zero={par.zero} (ZeRO-2/3 reduce each unit once per micro-batch, in fp32)',
        par.grad_comm,
    )
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
        low_dtype("bf16")
    need(par.powersgd_rank >= 1, "parallel.powersgd_rank", "a positive integer", par.powersgd_rank)
    need(
        par.powersgd_start >= 0,
        "parallel.powersgd_start",
        "a non-negative integer",
        par.powersgd_start,
    )


def _check_faults(cfg: Config) -> None:
    """What a run does about bad steps and failed saves, and its checkpoints' cadence."""
    t, c = cfg.train, cfg.checkpoint
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
        c.writer in ("auto", "gather", "mpio", "parts"),
        "checkpoint.writer",
        '"auto", "gather", "mpio" or "parts"',
        c.writer,
    )
    need(
        not c.async_save or c.writer in ("auto", "parts"),
        "checkpoint.async_save",
        'false with checkpoint.writer="gather" or "mpio" (background saves use the "parts" writer)',
        c.async_save,
    )


def check_lora(m) -> None:
    """LoRA's fields (a ModelConfig's); train.freeze's patterns need the model's names: the start-up checks them."""
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


def canonical_targets(targets) -> list[str]:
    """model.lora_targets in LORA_TARGETS' order (the model's), names not among them kept after, as given: a
    reordered list is the same model, so resume and init_from compare lists in this order."""
    return [x for x in LORA_TARGETS if x in targets] + [x for x in targets if x not in LORA_TARGETS]


# -- the layout's rules, shared with `plan --layout` (plan/given.py): it names the settings by its own keys ------


class Terms:
    """How a layout rule's message names a parallel setting (its key: the parallel section's field name) and says
    what was expected of it: the config's way (`FIELDS`: "config field parallel.tp: expected ..., got ...", strings
    quoted as TOML writes them), or by short keys after a prefix (`Keys("--layout", {...})`: "--layout tp=2:
    expected ...")."""

    def name(self, key: str) -> str:
        return OTHER_SECTIONS.get(key, f"parallel.{key}")

    def value(self, v) -> str:
        return f'"{v}"' if isinstance(v, str) else str(v)

    def setting(self, key: str, v) -> str:
        return f"{self.name(key)}={self.value(v)}"

    def fail(self, key: str, v, expected: str) -> UserError:
        return UserError(f"config field {self.name(key)}: expected {expected}, got {v!r}")


class Keys(Terms):
    """Settings named by short keys (`renamed`: a key's name where it is not the field's), values as typed (a flag as
    0 or 1), every message after `prefix`."""

    def __init__(self, prefix: str, renamed: dict[str, str]):
        self.prefix, self.renamed = prefix, renamed

    def name(self, key: str) -> str:
        return self.renamed.get(key, key)

    def value(self, v) -> str:
        return str(int(v)) if isinstance(v, bool) else str(v)

    def fail(self, key: str, v, expected: str) -> UserError:
        return UserError(f"{self.prefix} {self.setting(key, v)}: expected {expected}")


FIELDS = Terms()
# the layout's settings that live outside the parallel section
OTHER_SECTIONS = {"micro_batches": "train.grad_accum"}
ZERO_BUBBLE = (
    "zb-h1",
    "zbv",
)  # the schedules that defer weight gradients (parallel/schedule.py's SPLIT)


def check_pipeline_shape(
    pp: int,
    v: int,
    schedule: str,
    micro: int,
    n_layer: int,
    pp_layers: list[int],
    terms: Terms,
) -> None:
    """The pipeline's shape: interleaved runs v >= 2 chunks a rank on pp >= 2 ranks and a multiple of pp
    micro-batches, zbv two chunks a rank (a V), every other schedule one; every (virtual) stage gets at least one
    layer: an even split of the n_layer, or pp_layers (the config's uneven split)."""
    sched = terms.setting("schedule", schedule)
    if schedule == "interleaved":
        if v < 2:
            raise terms.fail("virtual_stages", v, f">= 2 with {sched}")
        if pp < 2:
            raise terms.fail("pp", pp, f">= 2 with {sched}")
        if micro % pp:
            what = f"a multiple of {terms.setting('pp', pp)} with {sched} (the micro-batches)"
            raise terms.fail("micro_batches", micro, what)
    elif schedule == "zbv":
        if v != 2:
            raise terms.fail("virtual_stages", v, f"2 with {sched} (two chunks a rank, in a V)")
        if pp < 2:
            raise terms.fail("pp", pp, f">= 2 with {sched}")
    elif v != 1:
        why = "only interleaved and zbv run several chunks a rank"
        raise terms.fail("virtual_stages", v, f"1 with {sched} ({why})")
    stages = pp * v
    if pp_layers:
        if len(pp_layers) != stages:
            split = f"{terms.setting('pp', pp)} x {terms.setting('virtual_stages', v)}"
            raise terms.fail("pp_layers", pp_layers, f"{stages} entries ({split})")
        if min(pp_layers) < 1:
            raise terms.fail("pp_layers", pp_layers, "at least one layer in every stage")
        if sum(pp_layers) != n_layer:
            why = f"entries summing to model.n_layer={n_layer} (they sum to {sum(pp_layers)})"
            raise terms.fail("pp_layers", pp_layers, why)
    elif n_layer % stages:
        what = (
            f"a divisor of model.n_layer={n_layer} with {terms.setting('virtual_stages', v)} (or "
        )
        raise terms.fail("pp", pp, what + f"{terms.name('pp_layers')} for an uneven split)")


def check_sequence_parallel(sp: bool, tp: int, m, terms: Terms) -> None:
    """Sequence parallelism splits the sequence over the tensor-parallel group, an equal slice to each rank, and
    does not run with LoRA (m: the model section)."""
    if not sp:
        return
    if tp == 1:
        why = "it splits the sequence over the tensor-parallel group"
        raise terms.fail("sequence_parallel", sp, f"false with {terms.name('tp')} = 1 ({why})")
    if m.block_size % tp:
        raise terms.fail(
            "sequence_parallel",
            sp,
            f"model.block_size={m.block_size} divisible by {terms.setting('tp', tp)} (each rank holds an "
            "equal slice)",
        )
    if m.lora_rank:
        raise terms.fail(
            "sequence_parallel",
            sp,
            "false with LoRA adapters (model.lora_rank > 0): not supported together",
        )


def check_zero_schedule(zero: int, schedule: str, terms: Terms) -> None:
    """ZeRO-2/3 reduce a part's gradients as its backward ends, which a zero-bubble schedule's deferred weight
    gradients would miss."""
    if zero >= 2 and schedule in ZERO_BUBBLE:
        raise terms.fail(
            "zero",
            zero,
            f"0 or 1 with {terms.setting('schedule', schedule)} (ZeRO-2/3 reduce a part's gradients as its "
            "backward ends; a zero-bubble schedule defers its weight gradients)",
        )


def check_act_comm(act_comm: str, m, terms: Terms) -> None:
    """16-bit transfers (parallel.act_comm) need float32 training (m: the model section)."""
    if act_comm != "fp32" and m.dtype != "float32":
        raise terms.fail(
            "act_comm",
            act_comm,
            f"{terms.value('fp32')} with model.dtype={m.dtype} (16-bit transfers need float32 training)",
        )
