"""The kill tests' harness (test_checkpoint_kill.py, test_checkpoint_kill_mpio.py): the child that stops a save at a
chosen point and waits to be killed, the run they kill, and what must hold after the kill and after `--resume auto`.

The child is `hpc-llm train` (checkpoints at steps 2, 4, 6) with one function of the save wrapped: during the save
of step 4, at the KILL_POINT-th call of the function named ("write_data:9": the ninth dataset write), it prints
PAUSED and sleeps.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from helpers import tiny_config, write_toml

from hpc_llm import checkpoint as ckpt
from hpc_llm.checkpoint import (
    checkpoint_path,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)

CHILD = textwrap.dedent("""
    import os, sys, time
    import h5py
    from hpc_llm import checkpoint as ckpt, cli
    from hpc_llm.checkpoint import parts, rundir, writers

    where, nth = os.environ["KILL_POINT"].split(":")
    saves, calls = 0, 0

    def pausing(fn, name):
        def wrapped(*args, **kwargs):
            global calls
            if name == where and saves == 2:
                calls += 1
                if calls == int(nth):
                    tmp = [p for p in os.listdir(os.environ["RUN_DIR"]) if ".tmp-" in p]
                    print("PAUSED", name, nth, tmp, flush=True)
                    time.sleep(600)
            return fn(*args, **kwargs)
        return wrapped

    save = ckpt.save_trainer
    def counting_save(*args, **kwargs):
        global saves
        saves += 1
        return save(*args, **kwargs)

    ckpt.save_trainer = counting_save
    for module, name in ((writers, "_fsync_path"), (writers, "verify_checkpoint"), (rundir, "write_latest"),
                         (rundir, "prune_checkpoints"), (parts, "_fsync_file")):
        setattr(module, name, pausing(getattr(module, name), name))
    os.replace = pausing(os.replace, "replace")
    h5py.Dataset.__setitem__ = pausing(h5py.Dataset.__setitem__, "write_data")
    sys.exit(cli.main(sys.argv[1:]))
""")


def partial_saves(run_dir) -> list[str]:
    """Temporary files, and parts directories that no checkpoint names: what an interrupted save leaves."""
    named = {ckpt.rundir.parts_of(p) for _s, p in list_checkpoints(run_dir)}
    return [
        p.name
        for p in run_dir.iterdir()
        if ".tmp-" in p.name or (".parts-" in p.name and p not in named)
    ]


def kill_config(tmp_path, data_dir, name, **settings):
    """Six float64 steps with dropout, checkpoints at steps 2, 4 and 6, the newest kept; `settings` (the writer's)
    on top. Returns the TOML file's path."""
    cfg = tiny_config(
        data_dir,
        tmp_path / name,
        **settings,
        **{
            "model.dtype": "float64",
            "model.dropout": 0.1,
            "train.max_iters": 6,
            "train.lr_decay_iters": 6,
            "train.eval_iters": 0,
            "train.log_interval": 1,
            "checkpoint.interval": 2,
            "checkpoint.keep_last": 1,
        },
    )
    return write_toml(cfg, tmp_path / f"{name}.toml")


def finished_run(train, cfg, run_dir):
    """The last checkpoint of `train(cfg)`, run to its end."""
    proc = train(cfg)
    assert proc.returncode == 0, proc.stderr
    return load_checkpoint(find_latest(run_dir))


def wait_until_paused(child, point: str) -> None:
    """Read the child's output until it says it stopped at `point` (a failure if it ends first)."""
    for line in child.stdout:
        if line.startswith("PAUSED"):
            return
    pytest.fail(f"the child never reached {point}: {child.wait()} {child.stderr.read()}")


def check_recovery(train, cfg, run_dir, new_complete: bool, tmp_left: bool, uninterrupted) -> None:
    """After the kill: every file under a checkpoint's name is complete and verifies (step 4's only if
    `new_complete`), a partial save is left beside them only as a temporary file (if `tmp_left`), and `latest` names
    the newest complete one. Then `train(cfg, "--resume", "auto")` picks it, cleans the interrupted save's files and
    ends where the uninterrupted run did, bitwise."""
    named = list_checkpoints(run_dir)
    for _step, path in named:
        verify_checkpoint(path)
    assert [s for s, _ in named] == ([4, 2] if new_complete else [2])
    assert bool(partial_saves(run_dir)) == tmp_left
    newest = find_latest(run_dir)
    assert newest == checkpoint_path(run_dir, 4 if new_complete else 2)
    assert load_checkpoint(newest).state["step"] == (4 if new_complete else 2)

    resumed = train(cfg, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {newest}" in resumed.stdout
    assert not partial_saves(run_dir)
    final = load_checkpoint(find_latest(run_dir))
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == final.state["step"] == 6
    np.testing.assert_array_equal(
        final.metrics["train"]["loss"], uninterrupted.metrics["train"]["loss"]
    )
    for name, want in uninterrupted.params.items():
        np.testing.assert_array_equal(final.params[name], want, err_msg=name)
