"""`hpc-llm plan --compare RUN_DIR`: the prediction for a finished run's layout beside what it measured.

The run directory has config.json (the resolved config) and metrics.jsonl (tokens/s per log window); its newest
checkpoint's state names the layout (world size, pp, dp, tp, ZeRO-1). The first log window is left out when there
are others (it holds the first, warm-up step); the measured step is tokens per step / the median tokens/s.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from hpc_llm.checkpoint import CheckpointFile, find_latest
from hpc_llm.config import config_from_dict
from hpc_llm.errors import UserError
from hpc_llm.plan.memory import Layout
from hpc_llm.plan.predict import predict


def run_layout(cfg, run: Path, world: int | None) -> Layout:
    if world is None:
        latest = find_latest(run)
        if latest is None:
            raise UserError(
                f"--compare {run}: no verified checkpoint to read the layout from: give --gpus N"
            )
        f = CheckpointFile(latest)
        try:
            world = int(f.state.get("layout", {}).get("world", 1))
        finally:
            f.close()
    return Layout.of(cfg, world // (cfg.parallel.tp * cfg.parallel.pp))


def compare(run_dir, cl, world: int | None = None, share: float = 1.0) -> dict:
    run = Path(run_dir)
    cfg_file, metrics_file = run / "config.json", run / "metrics.jsonl"
    for f in (cfg_file, metrics_file):
        if not f.is_file():
            raise UserError(
                f"--compare {run}: {f.name} not found (a run directory written by hpc-llm train)"
            )
    cfg = config_from_dict(json.loads(cfg_file.read_text()))
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("kind") == "train"]
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
