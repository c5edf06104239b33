"""`hpc-llm plan --compare RUN_DIR`: the prediction for a finished run's layout beside what it measured.

The run directory has config.json (the resolved config) and metrics.jsonl (tokens/s per log window); its newest
checkpoint's state names the layout (world size, pp, dp, tp, ZeRO-1). The first log window is left out when there
are others (it holds the first, warm-up step); the measured step is tokens per step / the median tokens/s.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from hpc_llm.checkpoint import CheckpointFile, find_latest
from hpc_llm.config import config_from_dict, validated
from hpc_llm.errors import UserError
from hpc_llm.plan.memory import Layout
from hpc_llm.plan.predict import plan_saves, predict


def run_layout(cfg, run: Path, world: int | None) -> Layout:
    if world is None:
        latest = find_latest(run)
        if latest is None:
            raise UserError(
                f"--compare {run}: no verified checkpoint to read the layout from: give --gpus N"
            )
        f = CheckpointFile(latest)
        try:
            layout = f.state.get("layout", {})
            world = layout.get("world", 1) if isinstance(layout, dict) else None
        finally:
            f.close()
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise UserError(
                f"--compare {run}: {latest.name}: state layout.world is {world!r}, expected a positive "
                "integer: give --gpus N"
            )
    per = cfg.parallel.tp * cfg.parallel.pp
    if world % per:
        raise UserError(
            f"--compare {run}: {world} ranks is not a multiple of parallel.tp x parallel.pp = {per}"
        )
    return Layout.of(cfg, world // per)


def _read_config(run: Path, path: Path):
    """The run's config.json as a checked Config; every fault one line naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--compare {run}: {path.name}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"--compare {run}: {path.name}: expected a JSON object of config sections")
    try:
        cfg = validated(config_from_dict(data))
    except UserError as e:
        raise UserError(f"--compare {run}: {path.name}: {e}") from None
    return cfg


def _read_train_rows(run: Path, path: Path) -> list[dict]:
    """The train rows of metrics.jsonl, each with a finite positive tokens_per_s; every fault one line naming the
    file, the line and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--compare {run}: {path.name}: cannot read it ({e})") from None
    train = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"--compare {run}: {path.name}: line {i}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise UserError(f"--compare {run}: {path.name}: line {i}: expected a JSON object")
        if row.get("kind") != "train":
            continue
        tps = row.get("tokens_per_s")
        if (
            isinstance(tps, bool)
            or not isinstance(tps, (int, float))
            or not math.isfinite(tps)
            or tps <= 0
        ):
            raise UserError(
                f"--compare {run}: {path.name}: line {i}: tokens_per_s must be a finite positive "
                f"number, got {tps!r}"
            )
        train.append(row)
    return train


def compare(run_dir, cl, world: int | None = None, share: float = 1.0) -> dict:
    run = Path(run_dir)
    cfg_file, metrics_file = run / "config.json", run / "metrics.jsonl"
    for f in (cfg_file, metrics_file):
        if not f.is_file():
            raise UserError(
                f"--compare {run}: {f.name} not found (a run directory written by hpc-llm train)"
            )
    cfg = _read_config(run, cfg_file)
    train = _read_train_rows(run, metrics_file)
    if not train:
        raise UserError(f"--compare {run}: metrics.jsonl has no train rows")
    lay = run_layout(cfg, run, world)
    tps = statistics.median(r["tokens_per_s"] for r in (train[1:] or train))
    tokens = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.block_size
    pred = predict(
        cfg.model,
        lay,
        cl,
        getattr(cfg.train, "precision", None),
        share,
        cfg.checkpoint.interval,
        cfg.train.max_iters,
        cfg.parallel.pp_layers,
        **plan_saves(cfg, lay.ranks),
    )
    measured = tokens / tps
    return {
        "run": str(run),
        "layout": pred.as_dict()["layout"],
        "measured_step_s": measured,
        "predicted_step_s": pred.time["step"],
        "error": pred.time["step"] / measured - 1,
        "measured_tokens_per_s": tps,
        "predicted_tokens_per_s": pred.tokens_per_s,
        "predicted": pred.as_dict(),
        "_prediction": pred,
    }


def format_compare(r: dict) -> str:
    t = r["predicted"]["time_s"]
    parts = ", ".join(f"{k} {1000 * v:.1f}" for k, v in t.items() if k != "step" and v > 0)
    return (
        f"{r['run']}: measured {1000 * r['measured_step_s']:.1f} ms/step ({r['measured_tokens_per_s']:.0f} "
        f"tokens/s), predicted {1000 * r['predicted_step_s']:.1f} ms ({r['predicted_tokens_per_s']:.0f} "
        f"tokens/s): {100 * r['error']:+.1f}%\n  predicted parts (ms): {parts}\n  predicted peak memory per rank "
        f"{r['predicted']['memory_bytes']['peak'] / 2**20:.0f} MiB"
    )
