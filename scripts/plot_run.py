#!/usr/bin/env python
"""Plot a training run into one PNG: loss, learning rate, gradient norm and weight norms per layer.

    python scripts/plot_run.py runs/shakespeare_char --out run.png                    # a run directory
    python scripts/plot_run.py runs/shakespeare_char/ckpt_00005000.h5 --out ckpt.png  # one checkpoint
    python scripts/plot_run.py runs/shakespeare_char/metrics.jsonl --out curves.png   # the log only

--out is the one file written, a figure of 1500 x 900 pixels: the loss (train loss, eval train/val loss), learning
rate and gradient norm side by side; below them, for a checkpoint, the norm of each parameter, per layer (x: wte, wpe,
h.0 ... ln_f), and for a run directory, the norm of each layer at every ckpt_*.h5 kept in it (x: step); a
metrics.jsonl has no weights, so no second row (1500 x 450). A run directory's curves are its newest checkpoint's
(every step) and the metrics.jsonl lines logged since. Losses and norms on log scales. Needs matplotlib
(pip install -e .[plot]; Agg backend). A bad input prints one line, `plot_run: error: ...`, and exits with status 2.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import h5py
import numpy as np

from hpc_llm.checkpoint import list_checkpoints, load_checkpoint
from hpc_llm.errors import UserError

COLUMNS = {"train": ("step", "loss", "lr", "grad_norm"), "eval": ("step", "train_loss", "val_loss")}


def read_jsonl(path: Path, after: dict | None = None) -> dict:
    """metrics.jsonl -> {"train": {column: array}, "eval": {...}}, in step order, only the steps after ``after[kind]``
    if given; a step logged twice (as after a resume) keeps its last line."""
    rows = {kind: {} for kind in COLUMNS}
    try:
        records = [
            json.loads(line)
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
    except (OSError, ValueError):  # ValueError: not UTF-8 or not JSON
        raise UserError(
            f"{path}: neither an hpc_llm checkpoint nor a metrics.jsonl (JSON lines) file"
        ) from None
    for rec in records:
        if (
            isinstance(rec, dict)
            and rec.get("kind") in rows
            and isinstance(rec.get("step"), (int, float))
        ):
            rows[rec["kind"]][rec["step"]] = rec
    if not any(rows.values()):
        raise UserError(
            f'{path}: no "kind": "train" or "eval" lines (not an hpc_llm metrics.jsonl)'
        )
    after = after or {}
    tables = {
        kind: [r for step, r in sorted(rows[kind].items()) if step > after.get(kind, -1)]
        for kind in COLUMNS
    }
    return {
        kind: {col: np.array([r.get(col) for r in tables[kind]], dtype=float) for col in cols}
        for kind, cols in COLUMNS.items()
    }


def read_checkpoint(path: Path) -> tuple[tuple[int, dict], dict]:
    """((step, {parameter: L2 norm}), metrics); the parameters are freed on return, the Adam moments never read."""
    c = load_checkpoint(path, optimizer=False)
    norms = {
        name: float(np.linalg.norm(a.astype(np.float64, copy=False).ravel()))
        for name, a in c.params.items()
    }
    metrics = {
        kind: {col: np.asarray(c.metrics.get(kind, {}).get(col, ()), dtype=float) for col in cols}
        for kind, cols in COLUMNS.items()
    }
    return (int(c.state.get("step", 0)), norms), metrics


def read_run(path: Path) -> tuple[dict, list, bool]:
    """({"train"|"eval": {column: array}}, [(step, norms)] oldest first, whether RUN is a run directory)."""
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if not path.is_dir():
        if h5py.is_hdf5(path) or path.suffix == ".h5":
            snapshot, metrics = read_checkpoint(path)
            return metrics, [snapshot], False
        return read_jsonl(path), [], False
    snapshots, metrics = (
        [],
        {kind: {col: np.array([]) for col in cols} for kind, cols in COLUMNS.items()},
    )
    for _, ckpt in sorted(list_checkpoints(path)):
        try:
            snapshot, metrics = read_checkpoint(ckpt)
            snapshots.append(snapshot)
        except UserError as exc:
            print(f"plot_run: warning: skipping {exc}", file=sys.stderr)
    if (
        path / "metrics.jsonl"
    ).is_file():  # the newest checkpoint has every step up to its own; the log goes on
        logged = read_jsonl(
            path / "metrics.jsonl",
            {kind: max(m["step"], default=-1) for kind, m in metrics.items()},
        )
        metrics = {
            kind: {col: np.concatenate([metrics[kind][col], logged[kind][col]]) for col in cols}
            for kind, cols in COLUMNS.items()
        }
    elif not snapshots:
        raise UserError(
            f"{path}: no metrics.jsonl and no readable ckpt_*.h5 (not an hpc_llm run directory)"
        )
    return metrics, snapshots, True


def layer(name: str) -> str:
    """h.3.mlp.c_fc.weight -> h.3; wte.weight -> wte; ln_f.bias -> ln_f."""
    return re.match(r"h\.\d+|[^.]+", name).group(0)


def panel(ax, title: str, ylabel: str, xlabel: str = "step", log: bool = False) -> None:
    from matplotlib.ticker import LogFormatter

    # LogFormatter picks the ticks to label; this writes 0.6 rather than 6e-01
    class Plain(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    if not ax.lines:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    elif log:  # minor ticks labelled too when the axis spans few decades
        ax.set_yscale("log")
        ax.grid(True, which="minor", alpha=0.1)
        ax.yaxis.set_major_formatter(Plain(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    if len(ax.lines) > 1:
        ax.legend(fontsize="small")


def draw_norms(ax, plt, snapshots: list, by_step: bool) -> None:
    # a line per layer over the checkpoints: the L2 norm of all the layer's parameters together
    if by_step:
        steps, layers = (
            [s for s, _ in snapshots],
            list(dict.fromkeys(layer(n) for n in snapshots[-1][1])),
        )
        blocks = [g for g in layers if g.startswith("h.")]
        for g in layers:
            color = (
                plt.cm.viridis(0.9 * blocks.index(g) / max(1, len(blocks) - 1))
                if g in blocks
                else None
            )
            norms = [
                np.sqrt(sum(v * v for n, v in ns.items() if layer(n) == g)) for _, ns in snapshots
            ]
            ax.plot(steps, norms, "o-" if g in blocks else "o--", ms=3, color=color, label=g)
        panel(
            ax,
            f"weight norm per layer at each of the {len(snapshots)} checkpoints",
            "L2 norm",
            log=True,
        )
    else:  # one checkpoint: x = the layers in order, a line per kind of parameter (h.*.mlp.c_fc.weight, ...)
        step, norms = snapshots[-1]
        xs, kinds = list(dict.fromkeys(layer(n) for n in norms)), {}
        for name, v in norms.items():
            g = layer(name)
            kinds.setdefault(name[len(g) + 1 :] if g.startswith("h.") else name, []).append(
                (xs.index(g), v)
            )
        for i, (kind, pts) in enumerate(kinds.items()):
            ls = "--" if "ln_" in kind else ":" if kind.endswith("bias") else "-"
            ax.plot(*zip(*pts), marker="o", ms=4, ls=ls, color=plt.cm.tab20(i % 20), label=kind)
            if len(pts) == 1:  # wte, wpe, ln_f: name the lone point
                ax.annotate(
                    kind,
                    pts[0],
                    (0, -6),
                    textcoords="offset points",
                    size="x-small",
                    ha="center",
                    va="top",
                )
        ax.set_xticks(range(len(xs)), xs, rotation=90 if len(xs) > 20 else 0)
        panel(ax, f"norm of each parameter at step {step}, per layer", "L2 norm", "layer", log=True)
    if ax.lines:  # replaces panel's legend: outside, on the right
        ax.legend(
            fontsize="small",
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            ncol=1 + len(ax.lines) // 18,
        )


def draw(plt, metrics: dict, snapshots: list, by_step: bool, title: str):
    fig = plt.figure(figsize=(15, 9 if snapshots else 4.5), layout="constrained")
    grid = fig.add_gridspec(2 if snapshots else 1, 3)
    tr, ev = metrics["train"], metrics["eval"]

    def curve(ax, table: dict, column: str, label: str, **style) -> None:
        if np.isfinite(table[column]).any():
            ax.plot(table["step"], table[column], label=label, **style)

    ax = fig.add_subplot(grid[0, 0])
    curve(ax, tr, "loss", "train loss", lw=0.8, alpha=0.7)
    curve(ax, ev, "train_loss", "eval: train loss", marker="o", ms=4)
    curve(ax, ev, "val_loss", "eval: val loss", marker="o", ms=4)
    panel(ax, "loss", "cross-entropy (nats/token)", log=True)
    ax = fig.add_subplot(grid[0, 1])
    curve(ax, tr, "lr", "lr")
    panel(ax, "learning rate", "lr")
    ax = fig.add_subplot(grid[0, 2])
    curve(ax, tr, "grad_norm", "grad norm", lw=0.8)
    panel(ax, "gradient norm (before clipping)", "global L2 norm", log=True)
    if snapshots:
        draw_norms(fig.add_subplot(grid[1, :]), plt, snapshots, by_step)
    fig.suptitle(title)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="plot_run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run", metavar="RUN", help="a checkpoint .h5, a run directory or a metrics.jsonl file"
    )
    parser.add_argument("--out", default="run.png", help="the PNG to write (default: run.png)")
    args = parser.parse_args(argv)
    try:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise UserError("matplotlib is not installed (pip install -e .[plot])") from None
        fig = draw(plt, *read_run(Path(args.run)), args.run)
        try:
            fig.savefig(args.out, dpi=100)
        except (OSError, ValueError) as exc:  # ValueError: a suffix matplotlib has no format for
            raise UserError(
                f"{args.out}: cannot write: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        plt.close(fig)
    except UserError as exc:
        print(f"plot_run: error: {exc}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
