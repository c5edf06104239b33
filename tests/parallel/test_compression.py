"""Compressed data-parallel gradient reductions (`parallel.grad_comm`, hpc_llm/parallel/compression.py).

- 16-bit (bf16, fp16), at 2 and 4 ranks, odd bucket sizes (one bucket smaller than the group, so some ranks own an
  empty piece), ZeRO-1 on and off, buckets started during a simulated backward: the result equals an fp32 reduction
  of the 16-bit-rounded inputs (MPI's own fp32 Allreduce of them) to fp32 rounding, and is bitwise the fp32 sum in
  rank order (rounded once more to the format without ZeRO-1, identical on every rank).
- PowerSGD: with rank >= min(rows, cols) one step gives the exact mean gradient (to rounding); on a fixed gradient,
  error feedback makes the accumulated applied update converge to the accumulated true gradient; the state resumes
  bitwise at the same layout and is reset (one line) on another.
- fp16's edges (the top of its range on the wire, PowerSGD across loss-scale changes): test_compression_fp16.py.
- The trainer with each scheme on DP2 x TP2 (ZeRO-1 on for 16-bit) and PP2 x DP2: replicas bitwise identical, the
  losses close to the uncompressed run's; bad settings: one line, exit 2, on every rank.

The parallel tests get their timeouts from conftest.py (thread method in the ranks, signal in the parent).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from helpers import check, replica_checks, run_config, run_mpi, write_run_config
from mpi4py import MPI

from hpc_llm.config import Config
from hpc_llm.config.checks import validated
from hpc_llm.errors import UserError
from hpc_llm.parallel.comm import Comm
from hpc_llm.parallel.compression import (
    comm_dtype,
    load_powersgd_state,
    powersgd_state,
    scale_for,
    should_compress,
)
from hpc_llm.parallel.data_parallel import GradientSync

U32 = 2.0**-24


def world_dp() -> Comm:
    return Comm(MPI.COMM_WORLD if MPI.COMM_WORLD.Get_size() > 1 else None, name="dp")


def run_backward(sync: GradientSync, n: int, step: int = 0, loss_scale: float = 1.0) -> None:
    """What the trainer does: start, grad_ready at decreasing offsets (backward finishes the end first), finish."""
    sync.start(step)
    for offset in range(n, -1, -(n // 7 + 1)):
        sync.grad_ready(max(offset, 0))
    sync.finish(loss_scale)


# -- 16-bit ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nprocs",
    [
        pytest.param(2, marks=pytest.mark.parallel(nprocs=2), id="2ranks"),
        pytest.param(4, marks=pytest.mark.parallel(nprocs=4), id="4ranks"),
    ],
)
def test_16bit_reduction_is_an_fp32_sum_of_rounded_inputs(nprocs):
    comm = world_dp()
    p, r = comm.size, comm.rank
    assert p == nprocs
    bad = []
    n = 1003  # buckets of 167: six of them and one of a single element (fewer elements than ranks)
    for scheme in ("bf16", "fp16"):
        low = comm_dtype(scheme)
        for zero in (False, True):
            rng = np.random.default_rng(100 + r)
            # wide magnitudes
            x = (rng.standard_normal(n) * np.exp(rng.uniform(-12, 3, n))).astype(np.float32)
            # buckets [0, 1) and [1, 168): fp16 subnormals unscaled
            x[:168] = rng.standard_normal(168) * 1e-7
            g = x.copy()
            sync = GradientSync(g, comm, 167, zero, scheme=scheme)
            run_backward(sync, n)
            # the 16-bit-rounded inputs: each rank's bucket scaled by its power of two (scale_for), rounded, unscaled
            everyone = np.array(MPI.COMM_WORLD.allgather(x))  # (p, n)
            rounded = np.empty_like(everyone)
            for a, b in sync.buckets:
                for k in range(p):
                    s_k = np.float32(scale_for(scheme, float(np.abs(everyone[k, a:b]).max())))
                    rounded[k, a:b] = (everyone[k, a:b] * s_k).astype(low).astype(np.float32) * (
                        1 / s_k
                    )
            mpi_sum = rounded[r].copy()
            # an independent fp32 reduction of them
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, mpi_sum, op=MPI.SUM)
            in_order = rounded[0].copy()
            for k in range(1, p):
                in_order += rounded[k]
            # two fp32 sums' errors
            bound = 2 * (p - 1) * U32 * np.abs(rounded).sum(axis=0).astype(np.float64)
            where = f"{scheme} zero={zero}"
            err = np.abs(g.astype(np.float64) - mpi_sum)
            if zero:
                for a, b in sync.owned:
                    if not np.array_equal(g[a:b], in_order[a:b]):
                        bad.append(
                            f"{where}: owned piece {a}:{b} is not the fp32 sum in rank order"
                        )
                    if not np.all(err[a:b] <= bound[a:b]):
                        bad.append(
                            f"{where}: {a}:{b} differs from MPI's fp32 sum by up to {err[a:b].max():.3e}"
                        )
            else:
                u = 2.0**-8 if scheme == "bf16" else 2.0**-11
                # each piece rounded by its owner's scale
                for (a, _b), counts in zip(sync.buckets, sync.counts):
                    for j, c in enumerate(counts):
                        lo = a + sum(counts[:j])
                        piece = in_order[lo : lo + c]
                        s_o = np.float32(
                            scale_for(scheme, float(np.abs(piece).max()) if c else 0.0)
                        )
                        want = (piece * s_o).astype(low).astype(np.float32) * (1 / s_o)
                        if not np.array_equal(g[lo : lo + c], want):
                            bad.append(
                                f"{where}: piece {lo}:{lo + c} is not the rank-order sum rounded to {scheme}"
                            )
                        # half a subnormal
                        tiny = (2.0**-133 if scheme == "bf16" else 2.0**-25) / float(s_o)
                        ok = (
                            err[lo : lo + c]
                            <= u * np.abs(mpi_sum[lo : lo + c]) * (1 + 1e-6)
                            + 2 * bound[lo : lo + c]
                            + tiny
                        )
                        if not np.all(ok):
                            bad.append(
                                f"{where}: piece {lo}:{lo + c} is further from MPI's fp32 sum than one "
                                f"{scheme} rounding"
                            )
                if len(set(MPI.COMM_WORLD.allgather(g.tobytes()))) != 1:
                    bad.append(f"{where}: ranks hold different gradients")
            mine = [
                (max(a, 1), min(b, 168))
                for a, b in (sync.owned if zero else [(0, n)])
                if max(a, 1) < min(b, 168)
            ]
            small = max(float(err[a:b].max()) for a, b in mine) / float(
                np.abs(mpi_sum[1:168]).max()
            )
            # a 16-bit rounding of the piece's largest value, even for the tiny ones
            if not small <= 2.0**-8:
                bad.append(
                    f"{where}: the smallest gradients lost precision ({small:.2e} of their largest)"
                )
            before, after = sync.bytes_per_step()
            want_after = 2 * n + 4 * p * len(sync.buckets)  # and each piece's scale
            if (before, after) != (4 * n, want_after):
                bad.append(
                    f"{where}: bytes per step {before} -> {after}, expected {4 * n} -> {want_after}"
                )
            kinds = {k for k in comm.ledger.summary()}
            want_kind = f"dp.{'reduce_scatter' if zero else 'allreduce'}_{scheme}"
            if want_kind not in kinds:
                bad.append(f"{where}: ledger kinds {kinds}")
            comm.ledger.reset()
    check(not bad, "\n".join(bad))


# -- PowerSGD ----------------------------------------------------------------------------------------------------------


def specs_for(shapes) -> list:
    out, offset = [], 0
    for i, shape in enumerate(shapes):
        out.append(SimpleNamespace(name=f"t{i}", offset=offset, local_shape=shape))
        offset += int(np.prod(shape))
    return out, offset


SHAPES = [(7, 5), (4, 9), (6,), (3, 3), (12, 16)]


@pytest.mark.parallel(nprocs=2)
def test_powersgd_full_rank_is_the_exact_mean():
    """rank >= min(rows, cols) (and every 2-D tensor compressed: min_compression_rate 0): P^ spans the gradient's
    column space, so P^ P^^T sum_i M_i = sum_i M_i, the mean gradient (the loss is scaled by 1/dp)."""
    comm = world_dp()
    bad = []
    for dtype, rtol in ((np.float64, 1e-12), (np.float32, 2e-5)):
        specs, n = specs_for(SHAPES)
        x = np.random.default_rng(7 + comm.rank).standard_normal(n).astype(dtype) / comm.size
        want = x.copy()
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, want, op=MPI.SUM)
        g = x.copy()
        sync = GradientSync(
            g,
            comm,
            50,
            False,
            scheme="powersgd",
            specs=specs,
            powersgd_rank=16,
            min_compression_rate=0,
        )
        if len(sync.powersgd.matrices) != 4 or sync.powersgd.plain != [
            (specs[2].offset, specs[2].offset + 6)
        ]:
            bad.append(f"compressed {sync.powersgd.matrices}, plain {sync.powersgd.plain}")
        run_backward(sync, n)
        err = np.max(np.abs(g - want)) / np.max(np.abs(want))
        if not err <= rtol:
            bad.append(
                f"{np.dtype(dtype).name}: relative difference from the mean gradient {err:.2e} > {rtol}"
            )
        if len(set(MPI.COMM_WORLD.allgather(g.tobytes()))) != 1:
            bad.append(f"{np.dtype(dtype).name}: ranks hold different gradients")
        # each rank keeps M_i - A/p (its share's difference from the mean); their sum, what was left out, is zero
        for name, e in sync.powersgd.error.items():
            total = e.copy()
            MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
            if not np.abs(total).max() <= rtol * 10 * np.abs(want).max():
                bad.append(
                    f"{np.dtype(dtype).name} {name}: error feedback left {np.abs(total).max():.2e} in all"
                )
    check(not bad, "\n".join(bad))


@pytest.mark.timeout(30)
def test_compression_rule_is_pytorchs():
    """PyTorch's _should_compress with min_compression_rate 2 and r = min(rank, rows, cols)."""
    assert should_compress(128, 512, 4) and should_compress(384, 1536, 16)
    assert not should_compress(8, 8, 2)  # (8 + 8) * 2 * 2 = 64 >= 64: plain allreduce
    assert should_compress(9, 9, 2)  # 72 < 81
    assert not should_compress(5, 1000, 4)  # r = 4: 1005 * 4 * 2 = 8040 >= 5000
    assert not should_compress(64, 64, 16)  # 128 * 16 * 2 = 4096 >= 4096


@pytest.mark.parallel(nprocs=2)
def test_error_feedback_recovers_the_accumulated_gradient():
    """A fixed gradient (each rank its own full-rank matrix), rank 1: each step applies only a rank-1 piece, but
    the accumulated applied update sum_t A_t = t G - sum_i e_i(t), and the error stays bounded, so
    ||sum_t A_t - t G|| / (t ||G||) falls like 1/t; without the error it would stay at the rank-1 residual."""
    comm = world_dp()
    specs, n = specs_for([(24, 16)])
    x = np.random.default_rng(11 + comm.rank).standard_normal(n) / comm.size
    G = x.copy()
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, G, op=MPI.SUM)
    g = np.empty(n)
    sync = GradientSync(g, comm, n, False, scheme="powersgd", specs=specs, powersgd_rank=1)
    applied, rel = np.zeros(n), {}
    for t in range(1, 401):
        g[...] = x
        run_backward(sync, n, step=t)
        applied += g
        if t in (10, 50, 400):
            rel[t] = np.linalg.norm(applied - t * G) / (t * np.linalg.norm(G))
    s = np.linalg.svd(G.reshape(24, 16), compute_uv=False)
    # one rank-1 step's relative error at best
    residual = np.sqrt((s[1:] ** 2).sum() / (s**2).sum())
    # t * rel is ||sum_i e_i(t)|| / ||G||: bounded (seen: 6.7, 10.2, 9.4 at t = 10, 50, 400), so rel falls like 1/t
    check(
        rel[400] < 0.03
        and 400 * rel[400] < 1.5 * 50 * rel[50]
        and rel[50] < rel[10]
        and residual > 0.5,
        f"relative error of the accumulated update {rel}; a rank-1 step alone leaves {residual:.2f}",
    )


@pytest.mark.parallel(nprocs=2)
def test_powersgd_state_resumes_bitwise_and_resets_on_another_layout():
    """Plain steps first (powersgd_start = 2), then PowerSGD with a changing fp16-style loss scale: 3 steps, the state
    through powersgd_state/load_powersgd_state into a new GradientSync, 3 more: the gradients and the state equal the
    uninterrupted run's bitwise. The same state offered at another layout is reset, with the line saying why."""
    comm = world_dp()
    specs, n = specs_for(SHAPES)
    layout = {"pp": 1, "dp": 2, "tp": 1, "dp_rank": comm.rank}

    def make(g):
        return GradientSync(
            g,
            comm,
            40,
            False,
            scheme="powersgd",
            specs=specs,
            powersgd_rank=2,
            powersgd_start=2,
            seed=5,
            min_compression_rate=0,
            layout=layout,
        )

    def grads(step):
        return np.random.default_rng([step, comm.rank]).standard_normal(n).astype(np.float32)

    def steps(sync, g, first, last):
        out = []
        for step in range(first, last):
            scale = 2.0 ** (10 - step)
            g[...] = grads(step) * scale
            run_backward(sync, n, step=step, loss_scale=scale)
            out.append(g.copy())
        return out

    ga, gb, gc = np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
    a = make(ga)
    full = steps(a, ga, 0, 6)
    b = make(gb)
    first = steps(b, gb, 0, 3)
    saved = powersgd_state(b)
    saved = {
        "layout": dict(saved["layout"]),
        "arrays": {k: v.copy() for k, v in saved["arrays"].items()},
    }
    c = make(gc)
    line = load_powersgd_state(c, saved)
    second = steps(c, gc, 3, 6)
    bad = []
    if line is not None:
        bad.append(f"same layout reset: {line}")
    for i, (x, y) in enumerate(zip(first + second, full)):
        if not np.array_equal(x, y):
            bad.append(f"step {i}: resumed gradient differs from the uninterrupted run's")
    for k, v in powersgd_state(a)["arrays"].items():
        if not np.array_equal(v, powersgd_state(c)["arrays"][k]):
            bad.append(f"state {k} differs")
    other = make(np.empty(n, np.float32))
    other.layout = dict(layout, dp=4)
    line = load_powersgd_state(other, saved)
    if not (line and "dp 2 -> 4" in line and "reset" in line):
        bad.append(f"another layout: {line!r}")
    if any(np.any(e) for e in other.powersgd.error.values()):
        bad.append("another layout: error not reset")
    check(not bad, "\n".join(bad))


# -- the trainer -------------------------------------------------------------------------------------------------------


def _config(data_dir, out, **kw):

    return run_config(data_dir, out, **{"train.max_iters": 4, "train.eval_iters": 0, **kw})


@pytest.mark.parallel(nprocs=4)
def test_trainer_with_each_scheme_on_dp_tp_and_pp(data_dir, shared_tmp_path):
    """DP2 x TP2 and PP2 x DP2, 4 steps: with bf16/fp16 (ZeRO-1 on) and PowerSGD (ZeRO-1 on and off), replicas stay
    bitwise identical (DP and TP, as test_parallel checks) and the losses stay within a few percent of fp32's."""

    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    bad = []
    for name, tp, pp in (("dp2tp2", 2, 1), ("pp2dp2", 1, 2)):
        grid = make_grid(MPI.COMM_WORLD, tp, pp)
        losses = {}
        for scheme, zero in (
            ("fp32", 0),
            ("bf16", 1),
            ("fp16", 0),
            ("powersgd", 0),
            ("powersgd", 1),
        ):
            if pp > 1 and zero:
                continue
            kw = {
                "parallel.tp": tp,
                "parallel.pp": pp,
                "parallel.zero": zero,
                "parallel.grad_comm": scheme,
                "train.grad_accum": 2,
                "parallel.powersgd_start": 1,
            }
            tr = Trainer(
                _config(data_dir, shared_tmp_path / f"{name}-{scheme}-{zero}", **kw), grid=grid
            )
            tr.run()
            losses[scheme, zero] = tr.metrics.train["loss"]
            bad += [f"{name} {scheme} zero {zero}: {b}" for b in replica_checks(tr)]
            if scheme == "powersgd" and not tr.sync.powersgd.matrices:
                bad.append(f"{name}: PowerSGD compressed nothing")
        ref = np.array(losses["fp32", 0])
        for key, got in losses.items():
            if not np.all(np.abs(np.array(got) - ref) <= 0.05 * ref):
                bad.append(f"{name} {key}: losses {got} vs fp32 {ref.tolist()}")
    check(not bad, "\n".join(bad))


@pytest.mark.parallel(nprocs=2)
def test_powersgd_run_resumes_bitwise_from_its_checkpoint(data_dir, shared_tmp_path):
    """dp2 PowerSGD (rank 2, from step 1), 6 steps, checkpoints every 2: a new trainer resumed from step 4's file
    ends bitwise where the uninterrupted run ends (its error feedback and Q came back from the file, each rank its
    own); a checkpoint without the state would not (checked: resetting them changes the result)."""
    from hpc_llm.checkpoint import checkpoint_path
    from hpc_llm.parallel.grid import make_grid
    from hpc_llm.train.trainer import Trainer

    kw = {
        "parallel.grad_comm": "powersgd",
        "parallel.powersgd_rank": 2,
        "parallel.powersgd_start": 1,
        "train.max_iters": 6,
        "checkpoint.interval": 2,
        "checkpoint.writer": "gather",
    }
    grid = make_grid(MPI.COMM_WORLD, 1)
    full = Trainer(_config(data_dir, shared_tmp_path / "full", **kw), grid=grid)
    full.run()
    resumed = Trainer(_config(data_dir, shared_tmp_path / "resumed", **kw), grid=grid)
    resumed.restore(checkpoint_path(shared_tmp_path / "full", 4))
    restored_state = {k: v.copy() for k, v in resumed.sync.powersgd.state().items()}
    line = getattr(resumed, "powersgd_resume_line", "unset")
    resumed.run()
    reset = Trainer(_config(data_dir, shared_tmp_path / "reset", **kw), grid=grid)
    reset.restore(checkpoint_path(shared_tmp_path / "full", 4))
    reset.sync.powersgd.reset()
    reset.run()
    ok = (
        line is None
        and bool(restored_state)
        and np.array_equal(resumed.model.flat, full.model.flat)
        and not np.array_equal(reset.model.flat, full.model.flat)
    )
    check(
        ok,
        f"line {line!r}; resumed equal {np.array_equal(resumed.model.flat, full.model.flat)}, reset differs "
        f"{not np.array_equal(reset.model.flat, full.model.flat)}",
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"parallel.grad_comm": "int8"}, "parallel.grad_comm"),
        ({"parallel.grad_comm": "powersgd", "parallel.powersgd_rank": 0}, "parallel.powersgd_rank"),
        (
            {"parallel.grad_comm": "bf16", "model.dtype": "float64"},
            "16-bit gradient communication needs float32",
        ),
        ({"parallel.powersgd_start": -1}, "parallel.powersgd_start"),
    ],
)
def test_bad_settings_are_one_line(overrides, expected):
    cfg = Config()
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(UserError) as e:
        validated(cfg)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.timeout(150)
def test_bad_scheme_fails_cleanly_on_every_rank(data_dir, tmp_path):
    """From the CLI under mpiexec -n 2: exit 2, the same one line on each rank, no traceback, nothing written."""

    cfg = write_run_config(tmp_path / "run.toml", data_dir, tmp_path / "out")
    for overrides, text in (
        (["parallel.grad_comm=fp8"], "parallel.grad_comm"),
        (["parallel.grad_comm=fp16", "model.dtype=float64"], "needs float32 training"),
    ):
        args = ["train", str(cfg)]
        for o in overrides:
            args += ["--set", o]
        rc, out, err, _ = run_mpi(2, args)
        errors = [line for line in err.splitlines() if line.startswith("hpc-llm: error: ")]
        assert rc == 2 and len(errors) == 2 and len(set(errors)) == 1 and text in errors[0], (
            out + err
        )
        assert "Traceback" not in out + err and not (tmp_path / "out").exists(), out + err
