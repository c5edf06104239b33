"""A PNG of one predicted step's pipeline schedule: a row per stage, a bar per op (forward, first backward, later
backwards; where the schedule splits them, B and W), the chunk in the label when interleaved, and the predicted bubble
in the title (matplotlib, the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

from hpc_llm.errors import UserError
from hpc_llm.parallel.schedule import Phase
from hpc_llm.runtime.fsio import atomic_output

COLORS = {"F": "#4c72b0", "B": "#dd8452", "B+": "#c44e52", "W": "#55a868"}
LABELS = {
    "F": "forward",
    "B": "backward (first: writes grads)",
    "B+": "backward (later: accumulates)",
    "W": "weight gradients (W)",
}


def draw(pred, path: str | Path, title: str = "") -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--timeline needs matplotlib: pip install -e '.[plot]'") from None
    timing, lay = pred.timing, pred.layout
    fig, ax = plt.subplots(figsize=(12, 0.6 * lay.pp + 1.6))
    split = any(e.op.kind == Phase.WEIGHT for e in timing.events)
    started = set()
    scale = 1000.0  # ms
    for e in timing.events:
        kind = e.op.kind
        if kind == Phase.BACKWARD and not split:
            kind = "B+" if (e.rank, e.op.chunk) in started else "B"
            started.add((e.rank, e.op.chunk))
        ax.barh(
            e.rank,
            (e.end - e.start) * scale,
            left=e.start * scale,
            height=0.8,
            color=COLORS[kind],
            edgecolor="white",
            linewidth=0.5,
        )
        label = f"{e.op.micro}" + (f".{e.op.chunk}" if lay.virtual > 1 else "")
        if (e.end - e.start) > timing.makespan / 80:
            ax.text(
                (e.start + e.end) / 2 * scale,
                e.rank,
                label,
                ha="center",
                va="center",
                fontsize=6,
                color="white",
            )
    ax.set_yticks(range(lay.pp), [f"stage {s}" for s in range(lay.pp)])
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (ms)")
    # split: B (the input gradient) and W; else first and later backwards
    shown = ("F", "B", "W") if split else ("F", "B", "B+")
    labels = {**LABELS, "B": "input gradient (B)"} if split else LABELS
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k]) for k in shown]
    ax.legend(
        handles,
        [labels[k] for k in shown],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25 if lay.pp < 3 else -0.12),
        ncol=3,
        fontsize=8,
    )
    ax.set_title(
        f"{title or 'predicted pipeline'}: {lay.schedule}, p={lay.pp}, m={lay.micro_batches}"
        f"{f', v={lay.virtual}' if lay.virtual > 1 else ''}; bubble {100 * timing.bubble:.1f}% "
        f"(ideal (p-1)/(vm+p-1) = {100 * (lay.pp - 1) / (lay.virtual * lay.micro_batches + lay.pp - 1):.1f}%)",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:  # a crash leaves the old file, or none
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    return path
