"""Readers and writers of one directory at once: a reader of a live run directory (the API, merge-lora) keeps its
checkpoint while the run prunes; a save's temporary file takes no HDF5 lock (a subprocess forked meanwhile holds a
copy of the writer's descriptor); a lock whose holder removes the file as it ends is never taken on the removed file."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpc_llm import checkpoint as ckpt
from hpc_llm.api import open_checkpoint
from hpc_llm.checkpoint import reader
from hpc_llm.config import Config, ModelConfig
from hpc_llm.model.gpt import GPT
from hpc_llm.runtime import fsio
from hpc_llm.tools.merge_lora import merge_lora


def save(path, value: float) -> None:
    ckpt.save_checkpoint(
        path,
        params={"w": np.full((4, 8), value, np.float32)},
        optimizer={},
        state={"step": 0},
        config={},
        metrics={},
    )


@pytest.mark.timeout(60)
def test_a_reader_keeps_its_checkpoint_while_a_live_run_saves_and_prunes(tmp_path, monkeypatch):
    """The reader verifies the newest file (step 4) when the live run saves step 6 and prunes to one: before, the
    pruner removed step 4 between the reader's verification and its open ("file does not exist")."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (2, 4):
        save(ckpt.checkpoint_path(run, step), step)
    verify = reader.CheckpointFile.verify_share
    live = []

    def verify_while_the_run_goes_on(self, *args):
        verify(self, *args)
        if not live and self.path.name == "ckpt_00000004.h5":
            save(ckpt.checkpoint_path(run, 6), 6)
            ckpt.write_latest(run, ckpt.checkpoint_path(run, 6))
            live.append(ckpt.prune_checkpoints(run, keep_last=1))

    monkeypatch.setattr(reader.CheckpointFile, "verify_share", verify_while_the_run_goes_on)
    with open_checkpoint(run) as f:
        assert f.path.name == "ckpt_00000004.h5"
        np.testing.assert_array_equal(f.read("params", "w"), np.full((4, 8), 4, np.float32))
        # held: the pruner left step 4 (and removed step 2)
        assert [p.name for p in live[0]] == ["ckpt_00000002.h5"]
    assert [p.name for p in ckpt.prune_checkpoints(run, keep_last=1)] == ["ckpt_00000004.h5"]


@pytest.mark.timeout(60)
def test_a_save_survives_a_forked_copy_of_its_descriptor(tmp_path, monkeypatch):
    """A subprocess started by another thread while a save writes holds a copy of the writer's descriptor until it
    execs; with HDF5's lock on the temporary file, the save's read-back then failed ("unable to lock file, errno =
    11": the bad-input table's set-up under load). Here the copy is a dup held over the whole save."""
    real, copies = h5py.File, []

    def file_with_a_copy(name, mode="r", *args, **kw):
        f = real(name, mode, *args, **kw)
        if mode == "w":
            copies.append(os.dup(f.id.get_vfd_handle()))
        return f

    monkeypatch.setattr(h5py, "File", file_with_a_copy)
    try:
        save(tmp_path / "ckpt_00000001.h5", 1.0)
    finally:
        for fd in copies:
            os.close(fd)
    assert copies, "the save opened no file for writing"
    ckpt.verify_checkpoint(tmp_path / "ckpt_00000001.h5")


@pytest.mark.timeout(60)
def test_a_lock_is_never_taken_on_a_file_its_holder_removed(tmp_path, monkeypatch):
    """prepare's lock file goes when its holder ends: a second prepare that opened it just before and locks it just
    after must lock the file now at that name, not the removed one (two prepares would then run at once)."""
    real, removed = fcntl.lockf, []

    def lockf_after_the_holder_left(fd, op, *args):
        if not removed:  # the holder ends between this process's open and its lock
            os.unlink(tmp_path / ".prepare.lock")
            removed.append(True)
        return real(fd, op, *args)

    monkeypatch.setattr(fsio.fcntl, "lockf", lockf_after_the_holder_left)
    lock = fsio.DirectoryLock.lock(tmp_path, "prepare", name=".prepare.lock")
    try:
        held, named = os.fstat(lock.fd), os.stat(tmp_path / ".prepare.lock")
        assert (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    finally:
        lock.release()


def save_lora(path, step: int) -> None:
    """A LoRA checkpoint of a tiny model (adapters on c_attn), its weights all `step`."""
    m = ModelConfig(
        n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=16, lora_rank=2, lora_alpha=2.0
    )
    model = GPT(m, seed=0)
    ckpt.save_checkpoint(
        path,
        params={n: np.full(p.shape, step, p.dtype) for n, p in model.params.items()},
        optimizer={},
        state={"step": step},
        config=Config(model=m).to_dict(),
        metrics={},
    )


@pytest.mark.timeout(60)
def test_merge_lora_keeps_its_checkpoint_while_a_live_run_saves_and_prunes(tmp_path, monkeypatch):
    """The live LoRA run saves step 6 and prunes to one as soon as the reader has verified step 4 and closed it:
    before, merge-lora then opened step 4 by path and found it gone; now it holds the file it verified until it has
    read it (api.open_checkpoint), and the pruner leaves it."""
    run = tmp_path / "run"
    run.mkdir()
    for step in (2, 4):
        save_lora(ckpt.checkpoint_path(run, step), step)
    close = reader.CheckpointFile.close
    live = []

    def close_while_the_run_goes_on(self):
        close(self)
        if not live and self.path.name == "ckpt_00000004.h5":
            save_lora(ckpt.checkpoint_path(run, 6), 6)
            ckpt.write_latest(run, ckpt.checkpoint_path(run, 6))
            live.append(ckpt.prune_checkpoints(run, keep_last=1))

    monkeypatch.setattr(reader.CheckpointFile, "close", close_while_the_run_goes_on)
    merged = ckpt.load_checkpoint(merge_lora(run, tmp_path / "merged.h5"))
    assert live, "the run never pruned"
    assert Path(merged.state["merged_lora"]["path"]).name == "ckpt_00000004.h5"
    w, a, b = (np.full((8, 24), 4.0), np.full((8, 2), 4.0), np.full((2, 24), 4.0))
    np.testing.assert_array_equal(merged.params["h.0.attn.c_attn.weight"], w + 1.0 * (a @ b))
