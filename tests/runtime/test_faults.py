"""Failures on one rank become one clean, fast, job-wide outcome (docs/reliability.md).

Every fault is injected deterministically through HPC_LLM_FAULT (hpc_llm/runtime/faults.py) into `hpc-llm train` under
mpiexec: an exception at each phase, a rank that hangs outside MPI (its peers' watchdog ends the job), a rank killed
by SIGKILL, a save that fails with ENOSPC, non-finite gradients, stop signals at awkward moments, a second run in a
live run's directory. Each case asserts the exit status, the one line that names the rank and the phase, a bound on
the time to exit, and what survived: afterwards `--resume auto` continues from the last good checkpoint and, at the
same layout, ends bitwise equal to an uninterrupted run.

Time bounds: each bound is the fault's own delay (the watchdog's timeout) plus start-up and a generous margin for this
shared 2-core machine (start-up of 2-4 ranks takes 2-6 s here; the bounds are 10x that): they prove "seconds, not
the allocation", not speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import kill_session, mpiexec, run_mpi, tiny_config, write_toml

from hpc_llm.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, verify_checkpoint

STEPS = 6
# name: (ranks, overrides): dp2, and dp2 x tp2 with ZeRO-1
LAYOUTS = {"dp2": (2, {}), "dp2xtp2-zero1": (4, {"parallel.tp": 2, "parallel.zero": 1})}
BOUND_S = 60.0  # start-up to exit of a failed job, far above what it takes here (see the module docstring)


def config(data_dir, out_dir, path, **overrides):
    base = {
        "model.n_head": 4,
        "train.max_iters": STEPS,
        "train.eval_iters": 1,
        "train.eval_interval": 3,
        "checkpoint.interval": 2,
        "checkpoint.writer": "gather",
        "parallel.bucket_mb": 0.01,
    }
    return write_toml(tiny_config(data_dir, out_dir, **{**base, **overrides}), path)


def train(ranks: int, cfg, *args, fault: str | None = None, timeout: float = 150):
    env_fault = {"HPC_LLM_FAULT": fault} if fault else {}
    old = {k: os.environ.get(k) for k in env_fault}
    os.environ.update(env_fault)
    try:
        return run_mpi(ranks, ["train", str(cfg), *args], timeout=timeout)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def params_of(path):
    return load_checkpoint(path, optimizer=True)


def assert_same_run(a, b):
    """Bitwise the same parameters, Adam moments and step."""
    ca, cb = params_of(a), params_of(b)
    assert ca.state["step"] == cb.state["step"]
    for group in ("params", "optimizer"):
        ta, tb = getattr(ca, group), getattr(cb, group)
        flat_a = ta if group == "params" else {f"{s}/{k}": v for s in ta for k, v in ta[s].items()}
        flat_b = tb if group == "params" else {f"{s}/{k}": v for s in tb for k, v in tb[s].items()}
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert np.array_equal(flat_a[k], flat_b[k]), (group, k)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run of each layout: its final checkpoint."""
    out = {}
    for name, (ranks, overrides) in LAYOUTS.items():
        d = tmp_path_factory.mktemp(f"ref_{name}")
        cfg = config(data_dir, d / "run", d / "run.toml", **overrides)
        rc, _, err, _ = train(ranks, cfg)
        assert rc == 0, err
        out[name] = checkpoint_path(d / "run", STEPS)
    return out


def no_temporary_files(run_dir) -> bool:
    return not [p for p in os.listdir(run_dir) if ".tmp-" in p]


def failure_line(err: str) -> str:
    lines = [
        line
        for line in err.splitlines()
        if line.startswith("hpc-llm: rank") and " failed in " in line
    ]
    assert lines, err
    return lines[0]


# -- a fault on one rank ends the job; --resume auto continues bitwise ---------------------------------------------

FAULTS = [
    # id, HPC_LLM_FAULT (rank 1 in every case), extra config, what stderr must say, the last good checkpoint
    ("raise-in-step", "raise:step:1:3", {}, "rank 1 failed in step 3: InjectedFault", 2),
    ("killed-rank", "kill:step:1:3", {}, "signal 9 (Killed)", 2),
    # the waiting rank's watchdog names itself and the rank behind (runtime/records.py): one stuck in its own work,
    # one stopped whole (SIGSTOP: no heartbeat)
    (
        "hang-outside-mpi",
        "hang:step:1:5",
        {"parallel.comm_timeout_s": 3.0},
        "rank 1 is behind: outside MPI for",
        4,
    ),
    (
        "stopped-rank",
        "stop:step:1:5",
        {"parallel.comm_timeout_s": 3.0},
        "rank 1 is behind: no heartbeat for",
        4,
    ),
    ("raise-in-eval", "raise:eval:1:3", {}, "rank 1 failed in eval at step 3: InjectedFault", 2),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", FAULTS, ids=[f[0] for f in FAULTS])
def test_a_fault_on_one_rank_ends_the_job_and_resume_continues_exactly(
    case, layout, data_dir, tmp_path, reference
):
    name, fault, extra, says, last_good = case
    ranks, overrides = LAYOUTS[layout]
    cfg = config(data_dir, tmp_path / "run", tmp_path / "run.toml", **overrides, **extra)
    rc, _, err, seconds = train(ranks, cfg, fault=fault)
    assert rc != 0 and says in err, (rc, [x for x in err.splitlines() if "hpc-llm" in x])
    if name not in ("killed-rank", "stopped-rank") and "hang" not in name:
        assert "Traceback" in err  # the failing rank's traceback ...
        assert err.count("Traceback") == 1  # ... and only its own
    assert seconds < BOUND_S + extra.get("parallel.comm_timeout_s", 0), seconds
    if "comm_timeout_s" in str(extra):  # the watchdog's line names the waiting rank first
        assert "no progress for" in err, err[-3000:]
    ckpts = [s for s, _ in list_checkpoints(tmp_path / "run")]
    assert max(ckpts) == last_good, ckpts
    verify_checkpoint(checkpoint_path(tmp_path / "run", last_good))
    rc, _, err, _ = train(ranks, cfg, "--resume", "auto")
    assert rc == 0, err[-3000:]
    assert no_temporary_files(tmp_path / "run")
    assert_same_run(checkpoint_path(tmp_path / "run", STEPS), reference[layout])


STARTUP_FAULTS = [
    # id, fault, what the line names, arguments
    ("before-mpi", "raise:startup:1", "rank 1 failed in start-up: InjectedFault", ()),
    ("data-loading", "raise:data:1", "failed in data loading: InjectedFault", ()),
    # rank 0 waits in MPI_Init for a peer that never comes (hung for good before: the watchdog's thread cannot run
    # while MPI_Init holds the GIL; faulthandler's C thread can)
    ("stuck-before-mpi", "hang:startup:1", "Timeout (0:00:03)!", ("--comm-timeout-s", "3")),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", STARTUP_FAULTS, ids=[f[0] for f in STARTUP_FAULTS])
def test_a_fault_during_start_up_ends_the_job(case, data_dir, tmp_path):
    _, fault, says, args = case
    cfg = config(data_dir, tmp_path / "run", tmp_path / "run.toml")
    rc, _, err, seconds = train(2, cfg, *args, fault=fault, timeout=60)
    assert rc != 0 and says in err, (rc, err[-3000:])
    assert seconds < BOUND_S
    assert list_checkpoints(tmp_path / "run") == []


@pytest.mark.timeout(300)
def test_a_fault_while_resuming_ends_the_job_and_keeps_the_checkpoint(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "run", tmp_path / "run.toml", **{"train.max_iters": 2})
    assert train(2, cfg)[0] == 0
    rc, _, err, seconds = train(
        2, cfg, "--resume", "auto", "--set", "train.max_iters=4", fault="raise:resume:1"
    )
    assert rc == 1 and "rank 1 failed in resume: InjectedFault" in err, (rc, err[-3000:])
    assert seconds < BOUND_S
    verify_checkpoint(checkpoint_path(tmp_path / "run", 2))


# -- non-finite steps ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(data_dir, tmp_path):
    """rank 1's gradient is NaN in step 3 (0-based): the whole job skips that update (parameters, moments and Adam's
    counter after it equal those before it), counts it, and trains on."""
    cfg = config(
        data_dir,
        tmp_path / "run",
        tmp_path / "run.toml",
        **{"checkpoint.interval": 1, "checkpoint.keep_last": 10},
    )
    rc, out, err, _ = train(2, cfg, fault="nan:grad:1:3")
    assert rc == 0, err[-3000:]
    assert "step 3: loss" in out and "not finite, step skipped (1 in a row" in out, out[-3000:]
    before, after = (
        params_of(checkpoint_path(tmp_path / "run", 3)),
        params_of(checkpoint_path(tmp_path / "run", 4)),
    )
    for k in before.params:
        assert np.array_equal(before.params[k], after.params[k]), k
    assert after.state["adam_t"] == before.state["adam_t"] and after.state["skipped_steps"] == 1
    final = params_of(checkpoint_path(tmp_path / "run", STEPS))
    assert final.state["skipped_steps"] == 1 and final.state["adam_t"] == STEPS - 1
    assert np.asarray(final.metrics["train"]["skipped_steps"]).tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.timeout(300)
def test_too_many_bad_steps_in_a_row_stop_the_run_with_the_last_good_state(data_dir, tmp_path):
    cfg = config(
        data_dir,
        tmp_path / "run",
        tmp_path / "run.toml",
        **{"train.max_bad_steps": 2, "checkpoint.keep_last": 10},
    )
    rc, _, err, _ = train(2, cfg, fault="nan:grad:0:2,nan:grad:0:3")
    assert rc == 1, err[-3000:]
    assert "the last 2 steps were skipped" in err and "train.max_bad_steps=2" in err, err[-3000:]
    last = params_of(checkpoint_path(tmp_path / "run", 4))
    good = params_of(checkpoint_path(tmp_path / "run", 2))  # the state before the two bad steps
    for k in good.params:
        assert np.array_equal(good.params[k], last.params[k]), k
    assert "Traceback" not in err  # every rank knew: no abort, no traceback


# -- stop signals --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_stop_signal_at_start_up_is_honoured_at_step_0(data_dir, tmp_path):
    """SIGUSR1 reaching rank 1 before it has even read its config: the job stops at step 0 with a checkpoint and
    exit 75, and a resume ends where an uninterrupted run does."""
    cfg = config(data_dir, tmp_path / "run", tmp_path / "run.toml")
    rc, out, err, _ = train(2, cfg, fault="usr1:startup:1")
    assert rc == 75, err[-3000:]
    assert "step 0: stop signal SIGUSR1 received" in out
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [0]
    assert train(2, cfg, "--resume", "auto")[0] == 0


@pytest.mark.timeout(300)
def test_a_stop_during_an_eval_does_not_wait_for_another_step(data_dir, tmp_path):
    """The stop arrives during the step-3 eval: the run stops at step 3 (no step 3 trained), and the summary
    reports that eval."""
    cfg = config(data_dir, tmp_path / "run", tmp_path / "run.toml")
    rc, out, err, _ = train(2, cfg, fault="usr1:eval:0:3")
    assert rc == 75, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["stopped_by"] == signal.SIGUSR1
    ck = params_of(checkpoint_path(tmp_path / "run", 3))
    assert (
        ck.metrics["eval"]["step"][-1] == 3
        and summary["val_loss"] == ck.metrics["eval"]["val_loss"][-1]
    )


@pytest.mark.timeout(300)
def test_a_stop_right_after_a_save_does_not_save_that_step_again(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path / "run", tmp_path / "run.toml")
    rc, out, err, _ = train(2, cfg, fault="usr1:save:0:2")
    assert rc == 75, err[-3000:]
    assert out.count("ckpt_00000002.h5 (") == 1, out  # one "checkpoint ... (writer, seconds)" line
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]


SECOND_SIGNAL = {
    # a second SIGUSR1 on each rank during the stop checkpoint, and again after the run, before the process exits
    "after-the-run": "usr1:save:0:4,usr1:save:1:4,usr1:exit:0,usr1:exit:1",
    # rank 1 waits in MPI_Finalize (after Python's own finalization) for rank 0, 3 s slower, when the signal lands
    "in-mpi-finalize": "usr1:save:1:4,usr1late:exit:1,delay:exit:0",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", SECOND_SIGNAL)
def test_a_second_stop_signal_changes_nothing(data_dir, tmp_path, when):
    """Slurm's batch scripts forward both the warning (--signal=B:USR1@T) and the later SIGTERM as SIGUSR1: a second
    signal after the stop began (during the stop checkpoint, after the run, inside MPI_Finalize) changes nothing:
    every rank writes its part of the checkpoint and exits 75, and the checkpoint resumes to the end."""
    cfg = config(data_dir, tmp_path / "run", tmp_path / "run.toml", **{"train.eval_interval": 100})
    rc, out, err, _ = train(2, cfg, fault="usr1:step:0:3," + SECOND_SIGNAL[when])
    assert rc == 75, err[-3000:]
    assert "signal" not in err.replace("stop signal", ""), err[-3000:]  # no rank ended by a signal
    assert err.count("injecting usr1") >= 2, err[-3000:]  # the second signal was sent
    assert "step 4: stop signal SIGUSR1 received" in out, out[-3000:]
    assert sorted(s for s, _ in list_checkpoints(tmp_path / "run")) == [2, 4]
    verify_checkpoint(checkpoint_path(tmp_path / "run", 4))
    assert train(2, cfg, "--resume", "auto")[0] == 0


@pytest.mark.timeout(300)
def test_open_mpi_mpiexec_forwards_sigusr1_to_the_ranks(data_dir, tmp_path):
    """SIGUSR1 sent to the launcher (what the Slurm scripts send it) reaches every rank: checkpoint and exit 75."""
    cfg = config(
        data_dir,
        tmp_path / "run",
        tmp_path / "run.toml",
        **{"train.max_iters": 10**6, "checkpoint.interval": 0},
    )
    proc = subprocess.Popen(
        [
            mpiexec(),
            "--oversubscribe",
            "-n",
            "2",
            sys.executable,
            "-m",
            "hpc_llm",
            "train",
            str(cfg),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 75, err[-3000:]
    assert "stop signal SIGUSR1 received" in out
    verify_checkpoint(max(list_checkpoints(tmp_path / "run"))[1])


# -- one live run per directory ------------------------------------------------------------------------------------


# what the live first run itself writes while the test looks: its checkpoints and the temporary file of its
# `latest` pointer (replaced atomically at every save)
LIVE_RUN_FILES = (".ckpt", "ckpt", ".latest.")


@pytest.mark.timeout(300)
def test_a_second_run_in_a_live_runs_directory_is_refused_and_a_dead_run_leaves_no_lock(
    data_dir, tmp_path
):
    cfg = config(
        data_dir,
        tmp_path / "run",
        tmp_path / "run.toml",
        **{"train.max_iters": 10**6, "checkpoint.interval": 50},
    )
    first = subprocess.Popen(
        [sys.executable, "-m", "hpc_llm", "train", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(tmp_path / "run") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list_checkpoints(tmp_path / "run"), "the first run never saved"
        for args in ([], ["--resume", "auto"]):
            before = sorted(
                p.name
                for p in (tmp_path / "run").iterdir()
                if not p.name.startswith(LIVE_RUN_FILES)
            )
            rc, _, err, _ = train(2, cfg, *args)
            assert rc == 2, err
            assert (
                err.count("hpc-llm: error: train.out_dir=") == 2
                and "is in use by a live run" in err
            ), err
            assert f"pid {first.pid}" in err
            after = sorted(
                p.name
                for p in (tmp_path / "run").iterdir()
                if not p.name.startswith(LIVE_RUN_FILES)
            )
            assert before == after
    finally:
        kill_session(first.pid)
        first.wait()
    rc, _, err, _ = train(2, cfg, "--resume", "auto", "--set", "train.max_iters=1")
    assert rc == 0, err[-3000:]  # the killed run's lock went with it


# -- resume checks what it resumes ----------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_resume_on_data_with_another_tokenizer_is_refused_naming_both(
    data_dir, corpus_file, tmp_path
):
    from hpc_llm.data.prepare import prepare

    prepare([corpus_file], tmp_path / "chars", tokenizer="char")
    cfg = config(data_dir, tmp_path / "run", tmp_path / "run.toml", **{"train.max_iters": 2})
    assert train(2, cfg)[0] == 0
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").iterdir())
    rc, _, err, _ = train(2, cfg, "--resume", "auto", "--set", f"data.path={tmp_path / 'chars'}")
    assert rc == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("hpc-llm: error:")]
    assert len(lines) == 2 and lines[0] == lines[1] and "Traceback" not in err, err[-3000:]
    assert "byte tokenizer, vocab 256" in lines[0] and "char tokenizer" in lines[0], lines[0]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "run").iterdir()) == before


# -- the agreement: one decision on every rank -----------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parallel(nprocs=2)
def test_agree_makes_one_ranks_exception_one_job_error_on_every_rank():
    """Comm.agree: an OSError on rank 1 only becomes a JobError on both ranks naming rank 1 and the error; a
    UserError anywhere wins over other exceptions (the user can fix it); success returns each rank's own result."""
    from mpi4py import MPI
    from pytest_mpi.parallel_assert import parallel_assert

    from hpc_llm.errors import JobError, UserError
    from hpc_llm.parallel.comm import Comm

    comm, rank = Comm(MPI.COMM_WORLD), MPI.COMM_WORLD.rank

    def fails_on(r, exc):
        def fn():
            if rank == r:
                raise exc
            return rank

        return fn

    from hpc_llm.runtime.faults import phase

    outcomes = []
    for fn in (fails_on(1, OSError(28, "No space left on device")), fails_on(-1, None)):
        try:
            with phase("save", 4):
                outcomes.append(("ok", comm.agree(fn)))
        except JobError as e:
            outcomes.append(("job", str(e)))
    try:
        comm.agree(
            lambda: (_ for _ in ()).throw(
                UserError("bad field") if rank == 0 else RuntimeError("bug")
            )
        )
        outcomes.append(("ok", None))
    except UserError as e:
        outcomes.append(("user", str(e)))
    except JobError as e:
        outcomes.append(("job", str(e)))
    want = [
        ("job", "rank 1 failed in save at step 4: OSError: [Errno 28] No space left on device"),
        ("ok", rank),
        ("user", "bad field"),
    ]
    parallel_assert(outcomes == want, f"rank {rank}: {outcomes}")


# -- the new communication paths cannot hang -------------------------------------------------------------------------

NEW_PATHS = [
    # id, extra config, fault (a rank stuck outside MPI), the operation rank 0's watchdog must name
    ("16-bit-buckets", {"parallel.grad_comm": "bf16"}, "hang:step:1:3", "dp.allreduce_bf16"),
    # parallel.act_comm: the activations' 16-bit allreduce (the embedding's g, rank 0's first collective of the
    # step) and the pipeline's 16-bit messages (rank 0 waits for the backward message of its micro-batch)
    (
        "16-bit-tp-activations",
        {"parallel.tp": 2, "parallel.act_comm": "bf16"},
        "hang:step:1:3",
        "tp.allreduce_bf16",
    ),
    (
        "16-bit-pipeline-messages",
        {"parallel.pp": 2, "parallel.act_comm": "fp16"},
        "hang:step:1:3",
        "pp.recv_backward",
    ),
    (
        "powersgd",
        {"parallel.grad_comm": "powersgd", "parallel.powersgd_rank": 2},
        "hang:step:1:3",
        "dp.powersgd_p",
    ),
    ("checkpoint-blocks", {}, "hang:save:1:4", "(writing checkpoint data)"),
    # ZeRO-3: rank 0's first wait of the step is the embedding's parameter gather; ZeRO-2 (no gathers): the
    # unit gradients' reduce-scatters, waited for at the end of backward
    ("zero3-parameter-gather", {"parallel.zero": 3}, "hang:step:1:3", "dp.allgather_params"),
    ("zero2-gradient-reduce-scatter", {"parallel.zero": 2}, "hang:step:1:3", "dp.reduce_scatter"),
    (
        "checkpoint-parts",
        {"checkpoint.writer": "parts"},
        "hang:save:1:4",
        "(writing checkpoint parts)",
    ),
    # the background writer of rank 0 stuck: the final save waits for it under the watchdog
    (
        "checkpoint-background",
        {"checkpoint.writer": "parts", "checkpoint.async_save": True},
        "hang:save:0:4",
        "waiting for this rank's checkpoint writer",
    ),
    # a step's first collective under sequence parallelism: the embedding's reduce-scatter along T
    (
        "sequence-parallel",
        {"parallel.tp": 2, "parallel.sequence_parallel": True},
        "hang:step:1:3",
        "tp.reduce_scatter (2 ranks)",
    ),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", NEW_PATHS, ids=[c[0] for c in NEW_PATHS])
def test_a_stuck_peer_on_a_new_path_ends_the_job(case, data_dir, tmp_path):
    """A rank stuck while its peer waits in the 16-bit gradient reduction, PowerSGD's factor allreduce, a save's
    agreement (gather, parts) or sequence parallelism's first reduce-scatter, or a background checkpoint writer
    stuck while its own rank waits for it: the watchdog names the operation and the job ends within the timeout
    plus start-up."""
    _, extra, fault, op = case
    cfg = config(
        data_dir,
        tmp_path / "run",
        tmp_path / "run.toml",
        **{"parallel.comm_timeout_s": 3.0, **extra},
    )
    rc, _, err, seconds = train(2, cfg, fault=fault)
    assert rc != 0 and "hpc-llm: rank 0: no progress for" in err and op in err, (rc, err[-3000:])
    assert seconds < BOUND_S + 3
    verify_checkpoint(checkpoint_path(tmp_path / "run", 2))


# a peer stuck (outside MPI) while rank 0 enters one of Comm's collectives on a group named "tp"
STUCK_PEER = """
import sys, time
import numpy as np
from mpi4py import MPI
from hpc_llm.parallel.comm import Comm
from hpc_llm.runtime.faults import WATCHDOG
WATCHDOG.configure(2.0)
comm = Comm(MPI.COMM_WORLD, name="tp")
if comm.rank == 1:
    time.sleep(300)
getattr(comm, sys.argv[1])(np.ones((2, 4, 3)), 1)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "method, op",
    [
        ("allgather_along", "tp.allgather (2 ranks)"),
        ("reduce_scatter_along", "tp.reduce_scatter (2 ranks)"),
    ],
)
def test_a_stuck_peer_in_a_sequence_parallel_collective_ends_the_job(method, op):
    """Sequence parallelism's all-gather and reduce-scatter along T wait under the watchdog: rank 0 waiting in one
    for a peer that never comes aborts the whole job after parallel.comm_timeout_s (2 s here), naming it."""
    rc, _, err, seconds = run_mpi(2, [method], timeout=120, entry=("-c", STUCK_PEER))
    assert rc != 0 and "hpc-llm: rank 0: no progress for" in err and op in err, (rc, err[-3000:])
    assert seconds < BOUND_S


# -- every verb that talks to other ranks is watched from its first line -------------------------------------------

VERB_TIMEOUT_S = 5  # --comm-timeout-s of these tests


@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory):
    """A one-step run directory (byte tokenizer, 4 heads: tp 2 divides them) for generate and eval."""
    d = tmp_path_factory.mktemp("small_run")
    cfg = config(data_dir, d / "run", d / "run.toml", **{"train.max_iters": 1})
    rc, _, err, _ = train(1, cfg)
    assert rc == 0, err[-3000:]
    return d / "run"


def _verb_argv(verb: str, data_dir, corpus_file, small_run, tmp_path) -> list[str]:
    if verb == "train-start-up":
        return ["train", str(config(data_dir, tmp_path / "run", tmp_path / "run.toml"))]
    if verb == "generate-tp2":
        return ["generate", str(small_run), "--max-new-tokens", "4", "--set", "parallel.tp=2"]
    if verb == "eval-dp2":
        return ["eval", str(small_run), "--data", str(data_dir), "--set", "parallel.tp=1"]
    return ["prepare", str(corpus_file), "--out", str(tmp_path / "tokens")]


VERBS = [
    # id, HPC_LLM_FAULT (rank 1 hangs outside MPI, or is stopped whole), the operation and phase rank 0's watchdog
    # must name, and its line naming the rank behind (records beside the output: none before train's run directory)
    (
        "train-start-up",
        "hang:config:1",
        "world.barrier (an agreed step) (2 ranks) (start-up;",
        None,
    ),
    ("generate-tp2", "hang:generate:1", "tp.allreduce (2 ranks) (generate;", "outside MPI for"),
    (
        "generate-tp2-stopped",
        "stop:generate:1",
        "tp.allreduce (2 ranks) (generate;",
        "no heartbeat for",
    ),
    ("eval-dp2", "hang:eval:1", "dp.allreduce (2 ranks) (eval;", "outside MPI for"),
    (
        "prepare-2-ranks",
        "hang:encode:1",
        "world.barrier (prepare encode) (2 ranks) (prepare;",
        "outside MPI for",
    ),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", VERBS, ids=[v[0] for v in VERBS])
def test_a_stuck_peer_ends_every_verb_that_talks_to_other_ranks(
    case, data_dir, corpus_file, small_run, tmp_path, monkeypatch
):
    """Before this, the watchdog was armed only by the Trainer: a rank stuck in train's config agreement, or in
    generate at tp 2, eval at dp 2 or prepare at 2 ranks, hung the job for good. Now cli.main arms it before any verb
    runs (--comm-timeout-s): rank 0, waiting for the stuck rank, aborts the job within the timeout plus start-up,
    naming the operation and the flag, and (from the ranks' records beside the output, or in the current directory)
    the rank behind."""
    verb, fault, op, culprit = case
    # generate and eval (no --out) keep their ranks' records in the current directory
    monkeypatch.chdir(tmp_path)
    argv = _verb_argv(verb.removesuffix("-stopped"), data_dir, corpus_file, small_run, tmp_path)
    os.environ["HPC_LLM_FAULT"] = fault
    try:
        rc, _, err, seconds = run_mpi(
            2, [*argv, "--comm-timeout-s", str(VERB_TIMEOUT_S)], timeout=BOUND_S + 60
        )
    finally:
        os.environ.pop("HPC_LLM_FAULT")
    assert rc != 0, (rc, err[-3000:])
    line = next((s for s in err.splitlines() if "hpc-llm: rank 0: no progress for" in s), "")
    assert op in line and f"--comm-timeout-s={VERB_TIMEOUT_S}" in line, err[-3000:]
    if culprit is not None:
        assert f"hpc-llm: rank 0: rank 1 is behind: {culprit}" in err, err[-3000:]
    assert seconds < BOUND_S + VERB_TIMEOUT_S, seconds


@pytest.mark.timeout(60)
def test_a_heartbeat_written_as_the_rank_stops_leaves_no_record(tmp_path, monkeypatch):
    """The watchdog's thread writes a rank's record while the rank's own thread may be stopping it (a verb that
    ends within a heartbeat): a write begun before stop() must not put the file back after stop() removed it (seen:
    an eval at dp 2 left `.hpc-llm-ranks.eval.*` with both ranks' records in the current directory). Here the write
    is held between reading the record's path and writing the file while stop() runs."""
    import threading

    from hpc_llm.runtime import records

    record = records.RankRecord()
    record.start(tmp_path, 0, 2)
    assert (tmp_path / "rank0.json").exists()
    in_write, release = threading.Event(), threading.Event()
    dumps = records.json.dumps

    def held(state):
        in_write.set()
        assert release.wait(30)
        return dumps(state)

    monkeypatch.setattr(records.json, "dumps", held)
    writer = threading.Thread(target=record.write, args=("eval",))
    writer.start()
    assert in_write.wait(30)
    stopper = threading.Thread(target=record.stop)
    stopper.start()
    stopper.join(0.5)  # unguarded, stop() is done by now; guarded, it waits for the write
    release.set()
    writer.join(30)
    stopper.join(30)
    assert not writer.is_alive() and not stopper.is_alive()
    assert list(tmp_path.iterdir()) == [], sorted(p.name for p in tmp_path.iterdir())
