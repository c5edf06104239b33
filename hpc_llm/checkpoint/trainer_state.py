"""A trainer's state in a checkpoint: the save (where every element of every tensor lives on the grid, so each
writer can collect a block at a time from the ranks that hold it), the restore (each rank reads its own hyperslabs
and checksums its share), and the resume (world rank 0's candidates, tried newest first, the next after one that
fails verification).

The Trainer (hpc_llm/train/trainer.py) keeps thin calls to these; they read and set its attributes: model (flat buffer,
specs, stage plan), opt (moments m and v, step counter t), sync (ZeRO-1 ownership), grid, cfg, metrics, step, scaler,
skipped_steps, data, out_dir, writer, written.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import time
from pathlib import Path

import numpy as np

from hpc_llm.backend import to_host
from hpc_llm.checkpoint import format as fmt
from hpc_llm.checkpoint import rundir, writers
from hpc_llm.checkpoint.reader import CheckpointFile
from hpc_llm.checkpoint.slabs import Out, Part, Piece, Slab, whole
from hpc_llm.checkpoint.writers import agreed
from hpc_llm.errors import UserError
from hpc_llm.model.layout import StagePlan, param_specs
from hpc_llm.parallel.data_parallel import split_counts

log = logging.getLogger("hpc_llm")

SLOTS = ("m", "v")


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------


def _runs(lo: int, hi: int, n: int, nblocks: int, tp: int, t: int) -> list[tuple[int, int, int]]:
    """Indices lo..hi along a tensor-parallel axis of length n (made of nblocks blocks, each split in tp pieces; rank
    t holds piece t of every block, TP.shard_slices) that rank t holds: [(full index, local index, count)], in order.
    They are consecutive in t's shard, since its shard keeps the full tensor's order."""
    per = n // nblocks
    piece = per // tp
    out = []
    for b in range(nblocks):
        f0 = b * per + t * piece
        x0, x1 = max(lo, f0), min(hi, f0 + piece)
        if x0 < x1:
            out.append((x0, b * piece + x0 - f0, x1 - x0))
    return out


def _scatter_columns(rows: int, width: int, local: int, runs):
    """Put a TP rank's rows (rows x local, its column shard) into the block's columns (rows x width)."""

    def scatter(block: np.ndarray, part: np.ndarray) -> None:
        b, p = block.reshape(rows, width), part.reshape(rows, local)
        for f, loc, n in runs:
            b[:, f : f + n] = p[:, loc : loc + n]

    return scatter


class _Grid:
    """Where each element of the model's tensors lives: stage s's tensors (param_specs of its plan; every TP rank of
    the stage has the same layout) on its ranks (s, d, t), world rank (s * dp + d) * tp + t; a TP shard of a
    parameter, or of a moment without ZeRO-1, on every data-parallel replica; with ZeRO-1 a moment element on the
    replica owning its range (GradientSync's pieces of each bucket)."""

    def __init__(self, tr):
        g, m = tr.grid, tr.model
        self.tr, self.tp, self.dp, self.pp = tr, g.tp, g.dp, g.pp
        self.me = g.world.rank
        self.specs = [
            param_specs(tr.cfg.model, g.tp, StagePlan(m.plan.layers, g.pp, s, m.plan.virtual))
            for s in range(g.pp)
        ]
        self.zero = tr.sync.zero
        if self.zero:
            # each stage's bucket layout, from its first rank: with it, anyone knows which replica owns what
            buckets = g.world.allgather_objects(
                tr.sync.buckets if g.dp_rank == 0 and g.tp_rank == 0 else None
            )
            self.owners = [self._owner_table(buckets[self.rank(s, 0, 0)]) for s in range(g.pp)]
            mine = sorted((a, b) for a, b, d in self.owners[g.pp_rank][1] if d == g.dp_rank)
            if mine != sorted(tr.sync.owned):
                raise RuntimeError(
                    f"checkpoint: ZeRO-1 ranges {mine[:3]}... derived for rank {self.me} differ from "
                    f"its own {sorted(tr.sync.owned)[:3]}...: a bug, please report it"
                )
        own, base = [], 0
        for (
            a,
            b,
        ) in (
            tr.opt.owned
        ):  # this rank's compact moments: the ranges it updates (trained; ZeRO-1: its shard)
            own.append((a, b, base))
            base += b - a
        self.own = sorted(own)
        self.own_starts = [a for a, _, _ in self.own]

    def rank(self, s: int, d: int, t: int) -> int:
        return (s * self.dp + d) * self.tp + t

    def _owner_table(self, buckets):
        rows = []
        for a, b in buckets:
            start = a
            for d, c in enumerate(split_counts(b - a, self.dp)):
                if c:
                    rows.append((start, start + c, d))
                    start += c
        rows.sort()
        return [r[0] for r in rows], rows

    # -- on the rank that holds them: the elements a..b of a slot's buffer (laid out like the flat buffer) ---------

    def fetch(self, slot: str, a: int, b: int) -> np.ndarray:
        tr = self.tr
        if slot == "params":
            return to_host(tr.model.flat[a:b])
        buf = getattr(tr.opt, slot)
        i = bisect.bisect_right(self.own_starts, a) - 1
        if (
            i < 0 or self.own[i][1] <= a
        ):  # a frozen tensor (train.freeze, LoRA's base): no moments, stored as zeros
            assert i + 1 >= len(self.own) or b <= self.own[i + 1][0], (a, b, self.own[i + 1])
            return np.zeros(b - a, dtype=buf.dtype)
        start, stop, base = self.own[i]
        assert start <= a and b <= stop, (a, b, start, stop)
        return to_host(buf[base + a - start : base + b - start])

    def pieces(self, s: int, t: int, slot: str, a: int, n: int, replica: int) -> list[Piece]:
        """Elements a..a+n of stage s, TP rank t's ``slot`` buffer, as pieces on the ranks holding them."""
        if slot == "params" or not self.zero:
            return [
                Piece(self.rank(s, replica, t), n, functools.partial(self.fetch, slot, a, a + n))
            ]
        starts, rows = self.owners[s]
        out, x = [], a
        i = bisect.bisect_right(starts, x) - 1
        while x < a + n:
            lo, hi, d = rows[i]
            y = min(hi, a + n)
            out.append(Piece(self.rank(s, d, t), y - x, functools.partial(self.fetch, slot, x, y)))
            x, i = y, i + 1
        return out

    def replica(self, s: int, t: int, writer: int, index: int) -> int:
        """Which data-parallel replica sends stage s, TP rank t's copy of a dataset: the writer itself when it is
        one (no message), else one chosen by the dataset's index (the load spread over the replicas)."""
        ws, wd, wt = writer // (self.dp * self.tp), writer // self.tp % self.dp, writer % self.tp
        return wd if (ws, wt) == (s, t) else index % self.dp

    def tensor_parts(self, s: int, spec, slot: str, writer: int, index: int):
        """The parts of each block of the full tensor ``spec.name`` (as a rows x width matrix: axis 0 by the rest)
        from the shards of stage s's TP ranks (TP.shard_slices: a split axis is made of tp_blocks blocks, each cut
        in tp pieces)."""
        shape, axis, tp = spec.shape, spec.tp_axis, self.tp
        width = math.prod(shape[1:])
        off = spec.offset

        def pieces(t, a, n):
            return self.pieces(s, t, slot, a, n, self.replica(s, t, writer, index))

        def parts(blk: Slab) -> list[Part]:
            n = blk.hi - blk.lo
            r0, c0 = divmod(blk.lo, width)
            rows = (
                n // width if c0 == 0 and n % width == 0 else 0
            )  # whole rows, or (0) a piece of row r0
            if (
                tp == 1 or axis is None
            ):  # the shard is the tensor (TP rank 0's copy of a replicated one)
                return [Part(n, pieces(0, off + blk.lo, n))]
            if axis == 0:  # rows split: each run of rows from one rank, straight into place
                out = []
                for t in range(tp):
                    for f, loc, k in _runs(r0, r0 + max(rows, 1), shape[0], spec.tp_blocks, tp, t):
                        if rows:
                            out.append(
                                Part(
                                    k * width,
                                    pieces(t, off + loc * width, k * width),
                                    at=(f - r0) * width,
                                )
                            )
                        else:
                            out.append(Part(n, pieces(t, off + loc * width + c0, n)))
                return out
            assert axis == 1 and len(shape) == 2, (spec.name, shape, axis)
            local = width // tp  # columns split: rank t's columns of these rows
            out = []
            for t in range(tp):
                runs = _runs(c0, c0 + (width if rows else n), width, spec.tp_blocks, tp, t)
                if not runs:
                    continue
                if rows:  # rows r0.. of t's shard are contiguous there; their columns interleave in the block
                    out.append(
                        Part(
                            rows * local,
                            pieces(t, off + r0 * local, rows * local),
                            at=None,
                            scatter=_scatter_columns(rows, width, local, runs),
                        )
                    )
                else:
                    out += [
                        Part(k, pieces(t, off + r0 * local + loc, k), at=f - c0)
                        for f, loc, k in runs
                    ]
            return out

        return parts


def _powersgd_meta(tr) -> list:
    """Every world rank's PowerSGD state, as the save needs it on every rank: [{"layout", "arrays": {name: (shape,
    dtype)}} or None per rank] (compression.powersgd_state; all None for the other schemes)."""
    from hpc_llm.parallel.compression import powersgd_state

    mine = powersgd_state(tr.sync)
    meta = (
        None
        if mine is None
        else {
            "layout": mine["layout"],
            "arrays": {
                k: (tuple(v.shape), np.dtype(v.dtype).str) for k, v in mine["arrays"].items()
            },
        }
    )
    return tr.grid.world.allgather_objects(meta)


def _powersgd_slice(
    tr, key: str, lo: int, hi: int
) -> np.ndarray:  # on the rank that holds the state
    return to_host(tr.sync.powersgd.state()[key]).reshape(-1)[lo:hi]


def _state(tr, psgd: list | None = None) -> dict:
    return {
        "powersgd": [None if m is None else m["layout"] for m in psgd]
        if psgd and any(psgd)
        else None,
        "step": tr.step,
        "tokens_seen": tr.step * tr.tokens_per_step,
        "adam_t": tr.opt.t,
        "skipped_steps": tr.skipped_steps,
        "loss_scaler": tr.scaler.state() if tr.scaler is not None else None,
        "tokenizer": tr.data.tokenizer.meta(),
        "data_path": str(tr.data.path),
        "layout": {
            "world": tr.grid.world.size,
            "pp": tr.grid.pp,
            "dp": tr.grid.dp,
            "tp": tr.grid.tp,
            "zero": tr.cfg.parallel.zero,
        },
    }


def checkpoint_outs(tr, mpio: bool, psgd: list | None = None) -> list[Out]:
    """Every dataset of the trainer's checkpoint, in file order (stage 0's tensors, then stage 1's, ... (the last
    stage's copy of the tied embedding is the first's); the moments m, v alike; the metrics), with its writer (rank
    0; mpio: dealt out by size) and where each block's elements live. Every rank builds the same list."""
    world = tr.grid.world
    grid = _Grid(tr)
    tensors = []
    for group, slot in (("params", "params"), *((f"optimizer/{s}", s) for s in SLOTS)):
        for s, specs in enumerate(grid.specs):
            for spec in specs:
                if s == 0 or spec.name != "wte.weight":
                    tensors.append((f"{group}/{spec.name}", s, spec, slot))
    metrics = tr.metrics.as_dict()
    lengths = {table: {col: len(v) for col, v in cols.items()} for table, cols in metrics.items()}
    if world.size > 1:
        lengths = world.bcast_object(lengths)  # rank 0 holds (and sends) the metrics: its shapes
    columns = [
        (f"metrics/{table}/{col}", table, col, n)
        for table, cols in lengths.items()
        for col, n in cols.items()
    ]
    dtype = tr.model.dtype
    sizes = [math.prod(spec.shape) * dtype.itemsize for _p, _s, spec, _slot in tensors] + [
        8 * n for *_x, n in columns
    ]
    owner = fmt.deal(sizes, world.size) if mpio else [0] * len(sizes)
    outs = []
    for i, (path, s, spec, slot) in enumerate(tensors):
        outs.append(
            Out(
                path,
                spec.shape,
                getattr(tr.opt, slot).dtype if slot != "params" else dtype,
                owner[i],
                grid.tensor_parts(s, spec, slot, owner[i], i),
            )
        )

    def column(table, col, lo, hi):  # on rank 0
        return np.asarray(tr.metrics.as_dict()[table][col][lo:hi], dtype=np.float64)

    for j, (path, table, col, n) in enumerate(columns, start=len(tensors)):
        outs.append(
            Out(
                path,
                (n,),
                np.float64,
                owner[j],
                whole(0, functools.partial(column, table, col)),
            )
        )
    # PowerSGD's per-rank state (error feedback, Q): /powersgd/rank<R>/<name with / as :>, from rank R (mpio: R
    # writes it), so a resume at the same layout continues exactly
    for r, meta in enumerate(psgd or []):
        for key, (shape, dt) in (meta or {"arrays": {}})["arrays"].items():
            outs.append(
                Out(
                    f"powersgd/rank{r}/{key.replace('/', ':')}",
                    shape,
                    dt,
                    r if mpio else 0,
                    whole(r, functools.partial(_powersgd_slice, tr, key)),
                )
            )
    return outs


def save_trainer(tr) -> Path:
    """Write the trainer's checkpoint of this step, ``out_dir/ckpt_<step>.h5``, from every rank (the gather or the
    mpio writer, ``tr.writer``), then point ``latest`` at it and prune old ones (rank 0). A failure on any rank
    raises SaveFailed on every rank (the previous checkpoint untouched)."""
    t0 = time.perf_counter()
    world = tr.grid.world
    path = rundir.checkpoint_path(tr.out_dir, tr.step)
    mpio = tr.writer == "mpio"
    psgd = _powersgd_meta(tr)
    outs = checkpoint_outs(tr, mpio, psgd)
    writers.write_checkpoint(
        path,
        outs,
        lambda: fmt.make_header(_state(tr, psgd), tr.cfg.to_dict()),
        world,
        mpio=mpio,
        step=tr.step,
    )

    def publish():
        if world.rank == 0:
            tr.written.add(path)
            rundir.write_latest(tr.out_dir, path)
            rundir.prune_checkpoints(tr.out_dir, tr.cfg.checkpoint.keep_last, verified=tr.written)

    agreed(
        world,
        publish,
        "updating latest",
        f"checkpoint {path} written, but updating {tr.out_dir}/latest or pruning failed",
    )
    log.info("checkpoint %s (%s writer, %.2f s)", path, tr.writer, time.perf_counter() - t0)
    return path


# ---------------------------------------------------------------------------------------------------------------
# restore and resume
# ---------------------------------------------------------------------------------------------------------------


def restore_trainer(tr, saved: CheckpointFile) -> None:
    """Each rank reads its own hyperslabs: its TP shard of every parameter and, of the Adam moments, the rows of
    that shard covering the ranges it owns (ZeRO-1: about 1/dp of them); and checksums its share of the file's
    datasets (those it read whole from the bytes it read). Run under agree(): a bad checksum on any rank fails
    the restore on all of them; the trainer's parameters and moments may then be partly overwritten, its step,
    counters and history are not. Closes ``saved``."""
    m, world = tr.model, tr.grid.world
    with saved:
        saved.share(world.rank, world.size)

        def reader(group):
            return lambda name, index, out=None: saved.read(group, name, index, out)

        m.read_flat(m.flat, reader("params"), saved.shapes["params"], f"{saved.path} parameters")
        dense = tr.opt.owned == [(0, m.local_size)]  # moments laid out like the flat buffer
        for slot in SLOTS:
            group = f"optimizer/{slot}"
            # dense: read straight into the moments; else (ZeRO-1's shard, frozen tensors' lack of moments) into the
            # gradient buffer (laid out alike, and scratch between steps: each step's first backward overwrites
            # it), of which the ranges with moments are kept: m first, then v
            flat = getattr(tr.opt, slot) if dense else m.grad_flat
            m.read_flat(
                flat,
                reader(group),
                saved.shapes.get(group, {}),
                f"{saved.path} optimizer {slot}",
                ranges=tr.opt.owned,
            )
            if not dense:
                tr.opt.load_moments_flat(slot, flat)
                saved.settle()  # checksums still reading the buffer finish before v overwrites it
        entry = None  # this rank's PowerSGD state, if the file has it (compression.load_powersgd_state decides)
        layouts = saved.state.get("powersgd") or []
        group = f"powersgd/rank{world.rank}"
        if (
            getattr(tr.sync, "powersgd", None) is not None
            and world.rank < len(layouts)
            and layouts[world.rank]
        ):
            entry = {
                "layout": layouts[world.rank],
                "arrays": {
                    name.replace(":", "/"): saved.read(group, name) for name in saved.names(group)
                },
            }
        saved.verify_share()
    if not dense:  # frozen weights' gradients are never written (skipped): leave no moments in them
        m.grad_flat[...] = 0
    m.refresh_compute()
    st = saved.state
    tr.step = st["step"]
    tr.opt.t = st["adam_t"]
    tr.skipped_steps = st.get("skipped_steps", 0)
    if tr.scaler is not None and st.get(
        "loss_scaler"
    ):  # saved by an fp16 run; any other starts afresh
        tr.scaler.load(st["loss_scaler"])
    for table in ("train", "eval"):
        got = saved.metrics.get(table, {})
        for k, column in getattr(tr.metrics, table).items():
            # a column a file from an older version lacks: its neutral value for the steps it holds
            column[:] = (
                list(np.asarray(got[k]).tolist())
                if k in got
                else [{"loss_scale": 1.0, "skipped_steps": 0}.get(k, float("nan"))]
                * len(got.get("step", []))
            )
    from hpc_llm.parallel.compression import load_powersgd_state

    try:
        tr.powersgd_resume_line = load_powersgd_state(tr.sync, entry)
    except ValueError as e:  # the same layout but other tensors: a file this code did not write
        raise UserError(f"{saved.path}: {e}") from None
    log.info("resumed from %s at step %d", saved.path, tr.step)


def choose_candidates(world, out_dir: Path) -> list[Path]:
    """World rank 0's list of the checkpoints of ``out_dir`` to try (rundir.resume_candidates: header checks only),
    broadcast: every rank tries the same files in the same order."""
    found = world.agree(
        lambda: rundir.resume_candidates(out_dir) if world.rank == 0 else None,
        "listing checkpoints to resume",
    )
    return world.bcast_object(found)


def _start_fresh(tr) -> None:
    """The state of a new trainer (after failed restores may have overwritten parameters and moments)."""
    from hpc_llm.train.optim import LossScaler

    t = tr.cfg.train
    tr.model.init_weights(t.seed)
    if t.init_from:  # a fresh run of a fine-tuning config starts from its checkpoint's weights
        tr._load_init_from(tr.grid.world.agree(tr._open_init_from, "opening train.init_from"))
    tr.opt.m[...] = 0
    tr.opt.v[...] = 0
    tr.opt.t = 0
    tr.step = tr.skipped_steps = 0
    if tr.scaler is not None:
        tr.scaler = LossScaler(t.loss_scale_init, t.loss_scale_window)
    tr.metrics = type(tr.metrics)()


def resume_trainer(tr, saved: CheckpointFile | None, candidates: list[Path] | None) -> Path | None:
    """Restore a checkpoint into ``tr`` on every rank; returns its path, or None when the trainer starts fresh.

    ``candidates`` None: ``saved`` alone (a file the user named); any failure is a UserError on every rank.
    Else (``--resume auto``) the files to try, world rank 0's list (the same on every rank), newest first; ``saved``,
    the file this rank opened already (or None), is used when it is the one tried. A file that cannot be opened or
    fails verification (agreed on all ranks) is logged in one line and the next is tried; a model that does not
    match the config (Trainer._check_compatible) is a UserError. None left: a fresh start, logged."""
    world = tr.grid.world
    if candidates is None:
        world.agree(lambda: restore_trainer(tr, saved), "restoring the checkpoint")
        return saved.path
    for path in candidates:
        held = [saved] if saved is not None and saved.path == path else []
        if saved is not None and not held:
            saved.close()
        saved = None
        try:
            world.agree(lambda: held or held.append(CheckpointFile(path)), "opening a checkpoint")
        except UserError as e:
            for f in held:
                f.close()
            if world.rank == 0:
                log.warning("resume: skipping a checkpoint: %s", e)
            continue
        try:
            world.agree(lambda: tr._check_compatible(held[0]), "checking the checkpoint's model")
        except UserError:
            held[0].close()
            raise
        try:
            world.agree(lambda: restore_trainer(tr, held[0]), "restoring the checkpoint")
            return path
        except UserError as e:
            if world.rank == 0:
                log.warning("resume: skipping a checkpoint: %s", e)
    if saved is not None:
        saved.close()
    _start_fresh(tr)
    log.info(
        "resume auto: none of the %d checkpoints found verifies, starting fresh", len(candidates)
    )
    return None
