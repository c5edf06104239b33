"""The slurm/ job scripts against a real one-node Slurm on this machine (no mocks).

scripts/slurm_cluster.sh starts munged, slurmctld and slurmd in a temporary directory for this module and stops them
by their pid files at the end. Where Slurm is not installed (scripts/install_slurm.sh, which .ci/run calls) or the
daemons do not come up, every test here is skipped with the reason (under CI=true that skip is a failure).

- slurm/train_cpu.sbatch with 2 ranks (srun --mpi=pmix) finishes, and its run directory holds a verified checkpoint,
  metrics.jsonl, config.json, the config copy and the job's log; its losses equal `mpiexec -n 2 hpc-llm train`'s.
- SIGUSR1 to the batch shell mid-run (what `--signal=B:USR1@T` sends before a time limit) -> the ranks write a
  checkpoint and exit 75 -> the script requeues the job -> the new start resumes from that checkpoint in the same run
  directory and log, and the whole history (losses per step, metrics.jsonl rows, final parameters) is the
  uninterrupted run's, bit for bit (float64, same layout). The same through the mpiexec launcher.
- slurm/sweep.sbatch: an array of 2 tasks, one run directory and checkpoint each, with its line's overrides.
- A fresh job in a run directory that already holds checkpoints is refused (exit 2) and not requeued.
- A rank SIGKILLed or hung (HPC_LLM_FAULT) ends the job within a minute, through srun and mpiexec, FAILED and not
  requeued; a resubmission resumes from the last checkpoint.
- slurm/train_gpu.sbatch: bash -n, `sbatch --test-only`, and a run on 2 fake GPUs (gres without hardware): each rank
  sees its own CUDA_VISIBLE_DEVICES, the trainer is started with the CuPy backend and, CuPy being absent, refuses with
  exit 2, which is not requeued. No GPU job was trained here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, tiny_config, write_toml

from hpc_llm.checkpoint import load_checkpoint, verify_checkpoint

SLURM = REPO / "slurm"
VENV_BIN = Path(sys.executable).parent
MAX_ITERS = 300  # long enough (a few seconds) for a signal to land mid-run
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


class Cluster:
    def __init__(self, state: Path, env: dict):
        self.state, self.env = state, env

    def run(self, *args, check=True, timeout=60, env=None, cwd=None):
        r = subprocess.run(
            [str(a) for a in args],
            env=env or self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, args))}: status {r.returncode}\n{r.stdout}\n{r.stderr}"
            )
        return r

    def job(self, job_id: str) -> dict:
        """scontrol's fields of a job ({} once its record is gone, MinJobAge seconds after it ends)."""
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if r.returncode != 0:
            return {}
        return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)

    def wait_job(self, job_id: str, timeout: float = 150) -> dict:
        """Poll until the job has ended; returns its last record plus `MaxRestarts`. A requeued job waits for its
        begin time (cred_expire=10 + the scheduler's pass: about 12 s here). Not released early with `scontrol update
        StartTime=now`: slurmctld then starts it while the old credential is still revoked and kills it ("Killing
        non-startable batch JobId=..: Job credential revoked"), and the job ends FAILED."""
        deadline, last, restarts = time.monotonic() + timeout, {}, 0
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if not info:
                break
            last = info
            restarts = max(restarts, int(info.get("Restarts", 0)))
            state = info.get("JobState", "")
            if state in FINAL_STATES:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"job {job_id} still {last.get('JobState')} after {timeout} s")
        return {**last, "MaxRestarts": restarts}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [b for b in ("sbatch", "srun", "scontrol", "scancel") if shutil.which(b) is None]
    missing += [
        b
        for b in ("munged", "slurmctld", "slurmd")
        if shutil.which(b, path="/usr/sbin:/sbin:/usr/bin") is None
    ]
    if missing:
        pytest.skip(
            f"Slurm is not installed (missing {', '.join(missing)}): scripts/install_slurm.sh, as root"
        )
    if os.geteuid() != 0:
        pytest.skip("the test Slurm runs its daemons as root (SlurmUser=root); not root here")
    state = tmp_path_factory.mktemp("slurm")
    script = REPO / "scripts" / "slurm_cluster.sh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not an outer job's
    env["PYTHON"] = sys.executable
    r = subprocess.run(
        [str(script), "start", str(state)], env=env, capture_output=True, text=True, timeout=120
    )
    if r.returncode != 0:
        subprocess.run([str(script), "stop", str(state)], env=env, capture_output=True, timeout=120)
        pytest.skip(
            f"the test Slurm did not start (scripts/slurm_cluster.sh status {r.returncode}): "
            f"{r.stderr.strip()[-1500:]}"
        )
    env.update(
        SLURM_CONF=str(state / "slurm.conf"),
        HPC_LLM_HOME=str(REPO),
        HPC_LLM_VENV=str(VENV_BIN.parent),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    try:
        yield Cluster(state, env)
    finally:
        subprocess.run([str(script), "stop", str(state)], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def work(tmp_path_factory, corpus_file):
    """A prepared token directory (`hpc-llm prepare`) and the tiny float64 config, in a fresh directory."""
    d = tmp_path_factory.mktemp("slurm_work")
    subprocess.run(
        [VENV_BIN / "hpc-llm", "prepare", corpus_file, "--tokenizer", "byte", "--out", d / "data"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    # the scripts set train.out_dir
    write_toml(
        tiny_config(
            d / "data",
            d / "unused",
            **{
                "model.dtype": "float64",
                "train.max_iters": MAX_ITERS,
                "train.lr_decay_iters": MAX_ITERS,
                "train.log_interval": 10,
            },
        ),
        d / "tiny.toml",
    )
    return d


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted run outside Slurm: `mpiexec -n 2 hpc-llm train` (2 ranks, the scripts' default layout)."""
    out = work / "reference"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        OPAL_PREFIX=str(VENV_BIN.parent),
        PMIX_PREFIX=str(VENV_BIN.parent),
    )
    r = subprocess.run(
        [
            VENV_BIN / "mpiexec",
            "--oversubscribe",
            "--bind-to",
            "none",
            "-n",
            "2",
            VENV_BIN / "hpc-llm",
            "train",
            work / "tiny.toml",
            "--set",
            f"train.out_dir={out}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def submit(cluster, work, sbatch_args, script, script_args, env=None, wait=False, timeout=150):
    """sbatch from `work` (so slurm-*.out lands there); returns (sbatch's status, job id). RUN_ROOT is work/runs."""
    env = {**cluster.env, "RUN_ROOT": str(work / "runs"), **(env or {})}
    cmd = [
        "sbatch",
        "--parsable",
        *(["--wait"] if wait else []),
        *sbatch_args,
        SLURM / script,
        *script_args,
    ]
    r = cluster.run(*cmd, check=False, env=env, cwd=work, timeout=timeout)
    job_id = r.stdout.strip().split(";")[0]
    assert re.fullmatch(r"\d+", job_id), f"sbatch: status {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.returncode, job_id


def read_log(run_dir: Path) -> str:
    return (run_dir / "job.log").read_text() if (run_dir / "job.log").exists() else ""


def metrics_rows(run_dir: Path) -> tuple[list, list]:
    """metrics.jsonl as ([(step, loss)] of the train rows, [(step, val_loss)] of the eval rows)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return (
        [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"],
        [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"],
    )


def assert_same_run(run_dir: Path, ref_dir: Path, step: int = MAX_ITERS) -> None:
    """The run directory's checkpoint at `step` holds the reference's loss history and parameters, bit for bit."""
    got, ref = (
        load_checkpoint(run_dir / f"ckpt_{step:08d}.h5"),
        load_checkpoint(ref_dir / f"ckpt_{MAX_ITERS:08d}.h5"),
    )
    assert got.state["step"] == step
    np.testing.assert_array_equal(got.metrics["train"]["step"], ref.metrics["train"]["step"][:step])
    np.testing.assert_array_equal(got.metrics["train"]["loss"], ref.metrics["train"]["loss"][:step])
    if step == MAX_ITERS:
        assert got.params.keys() == ref.params.keys()
        for name in ref.params:
            np.testing.assert_array_equal(got.params[name], ref.params[name], err_msg=name)
        assert metrics_rows(run_dir) == metrics_rows(ref_dir)


@pytest.fixture(scope="module")
def cpu_job(cluster, work):
    """train_cpu.sbatch run to the end with `sbatch --wait` (2 ranks x 1 CPU, srun --mpi=pmix)."""
    status, job_id = submit(cluster, work, [], "train_cpu.sbatch", [work / "tiny.toml"], wait=True)
    return status, job_id, work / "runs" / job_id


@pytest.mark.timeout(300)
def test_cpu_job_finishes_with_checkpoint_metrics_and_log(cpu_job, reference):
    status, job_id, run_dir = cpu_job
    log = read_log(run_dir)
    assert status == 0, log
    assert f"job {job_id} start 1 " in log and "start 2" not in log
    assert "srun --mpi=pmix --ntasks=2 --cpus-per-task=1 hpc-llm train" in log
    assert "2 ranks = pp 1 x dp 2 x tp 1" in log
    assert "run finished (status 0)" in log
    assert (run_dir / "input.toml").read_text() == (run_dir.parent.parent / "tiny.toml").read_text()
    assert json.loads((run_dir / "config.json").read_text())["train"]["out_dir"] == str(run_dir)
    ckpt = run_dir / f"ckpt_{MAX_ITERS:08d}.h5"
    verify_checkpoint(ckpt)
    assert load_checkpoint(ckpt).state["layout"]["world"] == 2
    train_rows, eval_rows = metrics_rows(run_dir)
    assert [s for s, _ in train_rows] == list(range(10, MAX_ITERS + 1, 10))
    assert [s for s, _ in eval_rows] == [0, MAX_ITERS]
    assert_same_run(run_dir, reference)  # srun's ranks train exactly what mpiexec's do


@pytest.mark.timeout(300)
def test_cpu_job_passes_pipeline_parallel_through(cluster, work, reference):
    """`--set parallel.pp=2` reaches the trainer through the script: 2 stages of one layer each, the pipeline's log
    line, a checkpoint of the whole model that says pp 2, and the dp2 reference's first 20 losses to float64
    rounding (the same global batch: the layout does not change the run; later steps drift apart as training
    amplifies the different rounding of the two layouts at this high learning rate: ~1e-4 by step 90; the exact
    equality of layouts is tests/parallel/test_pipeline.py's, over a few steps)."""
    status, job_id = submit(
        cluster,
        work,
        [],
        "train_cpu.sbatch",
        [work / "tiny.toml", "--set", "parallel.pp=2"],
        wait=True,
    )
    run_dir = work / "runs" / job_id
    log = read_log(run_dir)
    assert status == 0, log
    assert (
        "2 ranks = pp 2 x dp 1 x tp 1" in log
        and "pipeline: 2 stages x 1 virtual, schedule 1f1b" in log
    ), log
    got, ref = (load_checkpoint(d / f"ckpt_{MAX_ITERS:08d}.h5") for d in (run_dir, reference))
    assert got.state["layout"]["pp"] == 2 and got.params.keys() == ref.params.keys()
    np.testing.assert_allclose(
        got.metrics["train"]["loss"][:20], ref.metrics["train"]["loss"][:20], rtol=1e-10, atol=0
    )
    assert len(got.metrics["train"]["loss"]) == MAX_ITERS


def interrupt_and_requeue(cluster, work, env=None, signal_after_step=30):
    """Submit train_cpu.sbatch, send SIGUSR1 to its batch shell once the log shows `signal_after_step`, and follow
    the job through its requeue to the end. Returns (job id, run dir, final record)."""
    _, job_id = submit(cluster, work, [], "train_cpu.sbatch", [work / "tiny.toml"], env=env)
    run_dir = work / "runs" / job_id
    deadline = time.monotonic() + 300  # an event wait; the timeout only ends a stuck job
    while True:
        steps = [int(m) for m in re.findall(r"^step\s+(\d+) \|", read_log(run_dir), re.M)]
        if steps and steps[-1] >= signal_after_step:
            break
        info = cluster.job(job_id)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            info,
            read_log(run_dir),
        )
        assert time.monotonic() < deadline, (
            f"no step {signal_after_step} in the log after 300 s:\n{read_log(run_dir)}"
        )
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    return job_id, run_dir, cluster.wait_job(job_id)


def check_resumed_run(job_id, run_dir, final, reference):
    log = read_log(run_dir)
    assert final.get("JobState") == "COMPLETED" and final["MaxRestarts"] == 1, (final, log)
    m = re.search(r"^step (\d+): stop signal SIGUSR1", log, re.M)
    assert m, log
    stop_step = int(m.group(1))
    assert 0 < stop_step < MAX_ITERS, (
        f"the signal did not land mid-run (step {stop_step}): make the run longer"
    )
    stop_ckpt = run_dir / f"ckpt_{stop_step:08d}.h5"
    # One log, both starts: stop with a checkpoint (75) -> requeue -> resume from exactly that checkpoint -> finish.
    order = [
        f"job {job_id} start 1 ",
        "batch script got SIGUSR1",
        m.group(0),
        f"checkpoint {stop_ckpt} ",
        "run stopped with a checkpoint (status 75): requeueing",
        f"job {job_id} start 2 ",
        "--resume auto",
        f"resumed from {stop_ckpt} at step {stop_step}",
        "run finished (status 0)",
    ]
    positions = [log.find(s) for s in order]
    assert -1 not in positions and positions == sorted(positions), list(zip(order, positions))
    assert log.count(" start ") == 2
    verify_checkpoint(stop_ckpt)
    verify_checkpoint(run_dir / f"ckpt_{MAX_ITERS:08d}.h5")
    assert_same_run(run_dir, reference, stop_step)  # the first start's history, up to the signal
    # the whole history, the final parameters, metrics.jsonl's rows
    assert_same_run(run_dir, reference)
    return stop_step


@pytest.mark.timeout(300)
def test_signal_checkpoints_requeues_and_resumes_exactly(cluster, work, reference):
    check_resumed_run(*interrupt_and_requeue(cluster, work), reference)


@pytest.mark.timeout(300)
def test_signal_requeue_resume_with_mpiexec_launcher(cluster, work, reference):
    job_id, run_dir, final = interrupt_and_requeue(
        cluster, work, env={"HPC_LLM_LAUNCHER": "mpiexec"}
    )
    check_resumed_run(job_id, run_dir, final, reference)
    assert "mpiexec -n 2 --bind-to none" in read_log(run_dir)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
@pytest.mark.parametrize("fault", ["kill:step:1:30", "hang:step:1:30"])
def test_a_killed_or_hung_rank_ends_the_job_fast_and_is_not_requeued(
    cluster, work, fault, launcher
):
    """A rank SIGKILLed (as the OOM killer does) or stuck outside MPI at step 30: the job ends within a minute (the
    watchdog's 5 s for the hang), FAILED and not requeued; the step-20 checkpoint stays; a resubmission with
    RESUME=auto resumes from it (the dead run left no lock)."""
    env = {"HPC_LLM_LAUNCHER": launcher, "HPC_LLM_FAULT": fault}
    t0 = time.monotonic()
    status, job_id = submit(
        cluster,
        work,
        [],
        "train_cpu.sbatch",
        [
            work / "tiny.toml",
            "--set",
            "checkpoint.interval=20",
            "--set",
            "parallel.comm_timeout_s=5",
        ],
        env=env,
        wait=True,
    )
    seconds = time.monotonic() - t0
    run_dir = work / "runs" / job_id
    log = read_log(run_dir)
    info = cluster.wait_job(job_id)
    assert status != 0 and info["JobState"] == "FAILED" and info["MaxRestarts"] == 0, (info, log)
    assert seconds < 60 + 5, (seconds, log)
    assert ("no progress for" in log) if fault.startswith("hang") else True, log
    verify_checkpoint(run_dir / "ckpt_00000020.h5")
    status, job_id2 = submit(
        cluster,
        work,
        [],
        "train_cpu.sbatch",
        [work / "tiny.toml", "--set", "train.max_iters=35"],
        wait=True,
        env={"HPC_LLM_LAUNCHER": launcher, "RUN_NAME": run_dir.name, "RESUME": "auto"},
    )
    assert status == 0, read_log(run_dir)
    assert "resumed from" in read_log(run_dir) and (run_dir / "ckpt_00000035.h5").exists()


@pytest.mark.timeout(300)
def test_sweep_array_one_run_directory_per_task(cluster, work):
    sweep = work / "sweep.txt"
    sweep.write_text("# learning rates\ntrain.lr=1e-3\n\ntrain.lr=3e-3 train.warmup_iters=5\n")
    status, job_id = submit(
        cluster,
        work,
        ["--array=0-1", "--cpus-per-task=1"],
        "sweep.sbatch",
        [work / "tiny.toml", sweep, "--set", "train.max_iters=20"],
        wait=True,
    )
    runs = {p.name: p for p in (work / "runs").glob(f"{job_id}_*")}
    assert sorted(runs) == [f"{job_id}_0", f"{job_id}_1"], sorted((work / "runs").iterdir())
    assert status == 0, "\n".join(read_log(p) for p in runs.values())
    expected = {
        "0": ("train.lr=1e-3", 1e-3, 3),
        "1": ("train.lr=3e-3 train.warmup_iters=5", 3e-3, 5),
    }
    histories = []
    for task, (line, lr, warmup) in expected.items():
        run_dir = runs[f"{job_id}_{task}"]
        log = read_log(run_dir)
        assert (
            f"sweep task {task} of array job {job_id}: {line}" in log
            and "run finished (status 0)" in log
        ), log
        assert (run_dir / "overrides.txt").read_text().strip() == line
        cfg = json.loads((run_dir / "config.json").read_text())
        assert (cfg["train"]["lr"], cfg["train"]["warmup_iters"], cfg["train"]["max_iters"]) == (
            lr,
            warmup,
            20,
        )
        verify_checkpoint(run_dir / "ckpt_00000020.h5")
        histories.append(load_checkpoint(run_dir / "ckpt_00000020.h5").metrics["train"]["loss"])
    assert not np.array_equal(*histories)


@pytest.mark.timeout(300)
def test_fresh_job_refuses_run_directory_with_checkpoints(cluster, work, cpu_job):
    _, _, used = cpu_job
    before = sorted(p.name for p in used.iterdir())
    status, job_id = submit(
        cluster,
        work,
        [],
        "train_cpu.sbatch",
        [work / "tiny.toml"],
        wait=True,
        env={"RUN_NAME": used.name},
    )
    log = read_log(used)
    assert status == 2, log
    assert f"job {job_id} start 1 " in log and "already holds checkpoints" in log
    assert "user error (status 2), not requeued" in log
    assert sorted(p.name for p in used.iterdir()) == before


def test_scripts_parse():
    for script in ("common.sh", "train_cpu.sbatch", "train_gpu.sbatch", "sweep.sbatch"):
        r = subprocess.run(["bash", "-n", SLURM / script], capture_output=True, text=True)
        assert r.returncode == 0, f"{script}: {r.stderr}"


@pytest.mark.timeout(300)
def test_gpu_script_on_fake_gpus(cluster, work):
    """Not a GPU test: the request is scheduled (sbatch --test-only) and the srun line starts one task per (fake)
    GPU, each seeing only its own; the trainer then needs CuPy and a GPU, absent here, and exits 2 (one line saying
    which is missing), which is not requeued."""
    one_node = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"]
    r = cluster.run(
        "sbatch",
        "--test-only",
        *one_node,
        SLURM / "train_gpu.sbatch",
        work / "tiny.toml",
        check=False,
        cwd=work,
    )
    assert r.returncode == 0 and "to start at" in r.stderr, r.stderr
    # The wheel's Open MPI has no UCX: HPC_LLM_GPU_MPI=none (host staging), as on a site without CUDA-aware MPI.
    status, job_id = submit(
        cluster,
        work,
        one_node,
        "train_gpu.sbatch",
        [work / "tiny.toml"],
        wait=True,
        env={"HPC_LLM_GPU_MPI": "none", "RUN_NAME": "gpu"},
    )
    log = read_log(work / "runs" / "gpu")
    assert status == 2, log
    assert re.search(r"^rank 0 on \S+: CUDA_VISIBLE_DEVICES=0$", log, re.M), log
    assert re.search(r"^rank 1 on \S+: CUDA_VISIBLE_DEVICES=1$", log, re.M), log
    assert "srun --mpi=pmix --ntasks=2 --cpus-per-task=1 --gpus-per-task=1 hpc-llm train" in log
    missing = ("CuPy is not installed", "but no usable GPU")
    assert "--set train.backend=cupy" in log and any(m in log for m in missing), log
    assert "user error (status 2), not requeued" in log and log.count(" start ") == 1
