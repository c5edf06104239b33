"""`hpc-llm plan CONFIG --layout KEY=VALUE,...`: one layout, priced without a search.

The layout is the config's own (parallel.*, train.*) with the keys given replacing its values:

    pp, tp, dp        the grid (dp: --gpus / (pp tp) when --gpus is given, else 1)
    zero              0, 1, 2 or 3 (ZeRO: moments; + gradients; + parameters)
    sp                sequence parallelism: 0/1 (also false/true, off/on)
    schedule          1f1b, gpipe, zb-h1, zbv or interleaved; virtual: model chunks per rank (interleaved: >= 2,
                      zbv: 2)
    micro             micro-batches per step (train.grad_accum)
    mbs               rows per micro-batch on each data-parallel rank (the micro-batch size; the config's
                      train.batch_size / dp when not given)
    recompute         none, selective or block
    precision         fp32, fp64, bf16, fp16 or bf16-tc (also --precision)
    act_comm          fp32, bf16 or fp16: the format of pipeline messages and TP activation collectives
    send_depth        sends in flight per neighbour and direction: all (every send held until the step's end: the
                      code before bounded sends) or a positive integer; the code's own bound when not given

Every value is checked with the rules the code enforces; an error is one line naming the key and what was expected.
"""

from __future__ import annotations

from dataclasses import replace

from hpc_llm.config import Config
from hpc_llm.config.checks import (
    Keys,
    check_act_comm,
    check_pipeline_shape,
    check_sequence_parallel,
    check_zero_schedule,
)
from hpc_llm.errors import UserError
from hpc_llm.parallel.schedule import NAMES as SCHEDULES
from hpc_llm.plan.memory import ACT_COMMS, RECOMPUTES, Layout
from hpc_llm.plan.predict import PRECISIONS, resolve_precision
from hpc_llm.plan.search import describe

KEYS = (
    "pp",
    "tp",
    "dp",
    "zero",
    "sp",
    "schedule",
    "virtual",
    "micro",
    "mbs",
    "recompute",
    "precision",
    "act_comm",
    "send_depth",
)
BOOLS = {"0": False, "1": True, "false": False, "true": True, "off": False, "on": True}
# the config's layout rules (config/checks.py) name the settings by these keys
# --layout's keys where they are not the parallel section's field names
RENAMED = {"sequence_parallel": "sp", "virtual_stages": "virtual", "micro_batches": "micro"}
TERMS = Keys("--layout", {**RENAMED, "pp_layers": "the config's parallel.pp_layers"})


def _bad(key: str, expected: str, got) -> UserError:
    return UserError(f"--layout {key}: expected {expected}, got {got!r}")


def _positive(key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad(key, "a positive integer", text) from None
    if value < 1:
        raise _bad(key, "a positive integer", text)
    return value


def _choice(key: str, text: str, choices) -> str:
    if text not in choices:
        raise _bad(
            key, " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices), text
        )
    return text


def parse_pairs(text: str) -> dict[str, str]:
    """'pp=8,tp=8' -> {"pp": "8", "tp": "8"}; each key known and given once."""
    pairs = {}
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not value:
            raise UserError(f"--layout: expected KEY=VALUE pairs separated by commas, got {item!r}")
        if key not in KEYS:
            raise UserError(f"--layout: unknown key {key!r} (expected one of {', '.join(KEYS)})")
        if key in pairs:
            raise UserError(f"--layout {key}: given twice")
        pairs[key] = value
    return pairs


def given_layout(
    cfg: Config, text: str, gpus: int | None = None, precision: str | None = None
) -> tuple[Layout, str]:
    """The layout --layout describes on top of the config's, and its precision (-> (Layout, precision))."""
    kv = parse_pairs(text)
    par, t, m = cfg.parallel, cfg.train, cfg.model
    pp = _positive("pp", kv["pp"]) if "pp" in kv else par.pp
    tp = _positive("tp", kv["tp"]) if "tp" in kv else par.tp
    if "dp" in kv:
        dp = _positive("dp", kv["dp"])
    elif gpus is not None:
        if gpus % (pp * tp):
            raise UserError(f"--gpus {gpus}: not a multiple of pp x tp = {pp * tp} (--layout)")
        dp = gpus // (pp * tp)
    else:
        dp = 1
    if gpus is not None and gpus != pp * tp * dp:
        raise UserError(f"--gpus {gpus}: --layout has pp x tp x dp = {pp * tp * dp} ranks")
    zero = int(_choice("zero", kv["zero"], ("0", "1", "2", "3"))) if "zero" in kv else par.zero
    sp = BOOLS[_choice("sp", kv["sp"].lower(), tuple(BOOLS))] if "sp" in kv else None
    sp = bool(par.sequence_parallel) if sp is None else sp
    sched = _choice("schedule", kv["schedule"], SCHEDULES) if "schedule" in kv else par.schedule
    virtual = _positive("virtual", kv["virtual"]) if "virtual" in kv else par.virtual_stages
    micro = _positive("micro", kv["micro"]) if "micro" in kv else t.grad_accum
    if "mbs" in kv:
        mbs = _positive("mbs", kv["mbs"])
    elif t.batch_size % dp:
        raise UserError(
            f"--layout dp={dp} does not divide train.batch_size={t.batch_size}: give mbs= (rows per "
            "micro-batch on each data-parallel rank)"
        )
    else:
        mbs = t.batch_size // dp
    rc = _choice("recompute", kv["recompute"], RECOMPUTES) if "recompute" in kv else t.recompute
    prec = kv.get("precision")
    if prec is not None:
        _choice("precision", prec, tuple(PRECISIONS))
        if precision is not None and precision != prec:
            raise UserError(f"--layout precision={prec} disagrees with --precision {precision}")
    prec = resolve_precision(m, prec or precision or t.precision)
    act = _choice("act_comm", kv["act_comm"], ACT_COMMS) if "act_comm" in kv else par.act_comm
    depth = None
    if "send_depth" in kv:
        depth = 0 if kv["send_depth"] == "all" else None
        if depth is None:
            try:
                depth = _positive("send_depth", kv["send_depth"])
            except UserError:
                raise _bad("send_depth", "all or a positive integer", kv["send_depth"]) from None
    lay = Layout(pp, dp, tp, zero, sched, virtual, micro, mbs * dp, par.bucket_mb, rc)
    lay = replace(lay, sequence_parallel=sp, act_comm=act, send_depth=depth)
    check(cfg, lay, prec)
    return lay, prec


def own_split(cfg: Config, lay: Layout) -> list[int]:
    """The config's parallel.pp_layers where the layout keeps its pp and virtual stages (checked with the config),
    else [] (an even split)."""
    par = cfg.parallel
    return list(par.pp_layers) if (lay.pp, lay.virtual) == (par.pp, par.virtual_stages) else []


def check(cfg: Config, lay: Layout, precision: str) -> None:
    """The rules the code enforces on a layout (config/checks.py, grid.py), as --layout errors."""
    m = cfg.model
    if m.n_head % lay.tp:
        raise UserError(f"--layout tp={lay.tp}: expected a divisor of model.n_head={m.n_head}")
    if m.padded_vocab % lay.tp:
        raise UserError(
            f"--layout tp={lay.tp}: expected a divisor of the padded vocabulary {m.padded_vocab}"
        )
    shape = (lay.pp, lay.virtual, lay.schedule, lay.micro_batches)
    check_pipeline_shape(*shape, m.n_layer, own_split(cfg, lay), TERMS)
    check_zero_schedule(lay.zero, lay.schedule, TERMS)
    check_sequence_parallel(lay.sequence_parallel, lay.tp, m, TERMS)
    check_act_comm(lay.act_comm, m, TERMS)
    if precision not in ("fp32", "fp64") and m.dtype != "float32":
        raise UserError(f"--layout precision={precision}: expected fp32 with model.dtype={m.dtype}")


MEMORY_TERMS = {
    "params": "parameters (flat buffer)",
    "grads": "gradients",
    "master": "compute copy of the weights (bf16/fp16)",
    "moments": "AdamW moments",
    "optimizer_temps": "AdamW temporaries",
    "activations": "activations (caches in flight)",
    "workspace": "workspace (the running op)",
    "pipeline_buffers": "pipeline send buffers",
    "zero_buffers": "ZeRO buffers (receives, units in use)",
    "checkpoint_scratch": "background save staging (kept)",
    "checkpoint_assembly": "checkpoint staging (at a save)",
    "runtime": "runtime (interpreter, libraries)",
}


def format_given(cfg, pred, cl, checkpoint_memory: bool = True) -> str:
    """The text of `plan --layout`: the layout, its memory per rank term by term, its step and its parts.
    checkpoint_memory False, or a CuPy cluster: the save's host arrays are listed but not in the device's peak."""
    host = not checkpoint_memory or cl.backend != "numpy"
    gb, mem, t = 1e9, pred.memory, pred.time
    lines = [
        f"{cfg.n_layer} layers x {cfg.n_embd} dim, {cfg.n_head} heads, T {cfg.block_size}, vocabulary "
        f"{cfg.padded_vocab}; {describe(pred.layout)} {pred.precision}, {pred.layout.ranks} devices of {cl.name}",
        f"memory per rank (GB, pipeline stage {pred.memory_stage}, the largest):",
    ]
    for key, what in MEMORY_TERMS.items():
        if mem[key]:
            aside = "  (host memory: not in the peak)" if host and key.startswith("checkp") else ""
            lines.append(f"  {what:40} {mem[key] / gb:9.2f}{aside}")
    verdict = "fits" if mem["peak"] <= cl.memory_bytes else "does not fit"
    lines.append(
        f"  {'peak':40} {mem['peak'] / gb:9.2f}  of {cl.memory_bytes / gb:.2f} per device: {verdict}"
    )
    lines.append(f"step {t['step']:.3f} s:")
    for key, value in t.items():
        if key != "step" and value:
            lines.append(f"  {key:40} {value:9.3f}")
    lines.append(
        f"{pred.tokens_per_s:.0f} tokens/s, MFU {100 * pred.mfu:.1f}%, pipeline bubble {100 * pred.bubble:.1f}%"
    )
    return "\n".join(lines)
