"""Checkpoint format: bitwise round trip, corruption detection, crash safety, run-directory helpers."""

from __future__ import annotations

import json
import logging
import os

import h5py
import numpy as np
import pytest
from helpers import flip_byte_in

from hpc_llm import __version__
from hpc_llm import checkpoint as ck
from hpc_llm.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    checkpoint_path,
    find_latest,
    load_checkpoint,
    prune_checkpoints,
    rundir,
    save_checkpoint,
    slabs,
    verify_checkpoint,
    write_latest,
    writers,
)
from hpc_llm.errors import UserError


def make_payload(seed: int = 0, step: int = 100):
    rng = np.random.default_rng(seed)
    params = {
        "wte.weight": rng.standard_normal((128, 16)).astype(np.float32),
        "wpe.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "h.0.attn.c_attn.weight": rng.standard_normal((16, 48)).astype(np.float32),
        "h.0.attn.c_attn.bias": rng.standard_normal(48).astype(np.float64),
        "ln_f.weight": np.ones(16, dtype=np.float64) + rng.standard_normal(16) * 1e-300,
        "ln_f.bias": np.array([np.nan, np.inf, -0.0, 5e-324] * 4, dtype=np.float32),
    }
    optimizer = {
        slot: {name: rng.standard_normal(p.shape).astype(p.dtype) for name, p in params.items()}
        for slot in ("m", "v")
    }
    gen = np.random.Generator(np.random.PCG64(seed))
    gen.standard_normal(3)
    state = {
        "step": step,
        "tokens_seen": 123_456_789_012,
        "lr": 3.0e-4,
        "rng": gen.bit_generator.state,  # nested dict with 128-bit ints
        "legacy_rng": np.random.RandomState(seed).get_state(),  # tuple with a uint32 array
        "data_position": {"epoch": 1, "offsets": [0, 17, 2**70]},
        "note": "héllo",
    }
    config = {
        "model": {"n_layer": 1, "n_embd": 16, "vocab_size": 100},
        "train": {"lr": 3e-4, "tags": ["a", "b"]},
    }
    metrics = {
        "train": {"step": list(range(1, 11)), "loss": np.linspace(5.0, 2.0, 10) + 1e-12},
        "eval": {"step": [5.0, 10.0], "loss": np.array([3.25, 2.5])},
        "empty": {"step": []},
    }
    return dict(params=params, optimizer=optimizer, state=state, config=config, metrics=metrics)


def assert_bitwise(a: np.ndarray, b: np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def assert_state_equal(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_equal(x, y)
    elif isinstance(a, np.ndarray):
        assert_bitwise(a, b)
    else:
        assert a == b


def tmp_leftovers(directory):
    return [p for p in os.listdir(directory) if ".tmp-" in p]


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip_is_bitwise_and_exact(tmp_path):
    payload = make_payload()
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **payload)
    assert tmp_leftovers(tmp_path) == []

    ckpt = load_checkpoint(path)
    assert ckpt.path == path
    assert ckpt.format_version == FORMAT_VERSION
    assert ckpt.software_version == __version__
    assert list(ckpt.params) == list(payload["params"])
    for name, arr in payload["params"].items():
        assert_bitwise(ckpt.params[name], arr)
    assert ckpt.params["wte.weight"].dtype == np.float32
    assert ckpt.params["ln_f.weight"].dtype == np.float64
    assert set(ckpt.optimizer) == {"m", "v"}
    for slot, tensors in payload["optimizer"].items():
        for name, arr in tensors.items():
            assert_bitwise(ckpt.optimizer[slot][name], arr)

    assert_state_equal(ckpt.state, payload["state"])
    assert ckpt.state["rng"]["state"]["state"] > 2**64  # the big int survived
    restored = np.random.Generator(np.random.PCG64())
    restored.bit_generator.state = ckpt.state["rng"]
    original = np.random.Generator(np.random.PCG64(0))
    original.standard_normal(3)
    assert_bitwise(restored.standard_normal(5), original.standard_normal(5))
    legacy = np.random.RandomState()
    legacy.set_state(ckpt.state["legacy_rng"])
    assert (
        legacy.randint(0, 2**31, 4).tolist()
        == np.random.RandomState(0).randint(0, 2**31, 4).tolist()
    )

    assert ckpt.config == payload["config"]
    assert list(ckpt.metrics) == ["train", "eval", "empty"]
    assert list(ckpt.metrics["train"]) == ["step", "loss"]
    for table, cols in payload["metrics"].items():
        for col, values in cols.items():
            got = ckpt.metrics[table][col]
            assert got.dtype == np.float64 and got.ndim == 1
            assert_bitwise(got, np.asarray(values, dtype=np.float64))


@pytest.mark.parametrize("elems", [1, 7, 100])
def test_small_blocks_write_the_same_file(tmp_path, monkeypatch, elems):
    """Blocks of at most `elems` elements (whole rows, pieces of a row, of a 3-D tensor's plane, a 0-d tensor) make
    the same datasets and checksums as the default blocks, and the file loads bitwise."""
    payload = make_payload()
    payload["params"]["cube"] = np.arange(3 * 5 * 9, dtype=np.float32).reshape(3, 5, 9)
    payload["params"]["scalar"] = np.array(2.5)
    for slot in ("m", "v"):
        payload["optimizer"][slot]["cube"] = -payload["params"]["cube"]
    save_checkpoint(tmp_path / "default.h5", **payload)
    whole_slabs = [b for b in slabs.slabs((3, 5, 9))]
    monkeypatch.setattr(slabs, "MESSAGE_ELEMS", elems)
    small = [b for b in slabs.slabs((3, 5, 9))]
    assert len(whole_slabs) == 1 and max(b.hi - b.lo for b in small) <= max(elems, 1)
    assert [(b.lo, b.hi) for b in small] == list(
        zip([b.lo for b in small], [b.lo for b in small[1:]] + [135])
    )
    save_checkpoint(tmp_path / "small.h5", **payload)
    with h5py.File(tmp_path / "default.h5", "r") as a, h5py.File(tmp_path / "small.h5", "r") as b:
        names = []
        a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for n in names:
            assert int(a[n].attrs["crc32"]) == int(b[n].attrs["crc32"]), n
            assert a[n][()].tobytes() == b[n][()].tobytes(), n
    loaded = load_checkpoint(tmp_path / "small.h5")
    assert_bitwise(loaded.params["cube"], payload["params"]["cube"])
    assert_bitwise(loaded.params["scalar"], payload["params"]["scalar"])


def test_on_disk_layout(tmp_path):
    payload = make_payload(step=42)
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **payload)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == FORMAT
        assert int(f.attrs["format_version"]) == FORMAT_VERSION
        assert f.attrs["software_version"] == __version__
        assert "T" in f.attrs["created"]
        assert bool(f.attrs["complete"]) is True
        assert int(f.attrs["step"]) == 42
        assert json.loads(f.attrs["config_json"]) == payload["config"]
        assert json.loads(f["config"].attrs["config_json"]) == payload["config"]
        assert int(f["state"].attrs["step"]) == 42
        assert int(f["state"].attrs["tokens_seen"]) == 123_456_789_012
        assert json.loads(f["state"].attrs["state_json"])["step"] == 42
        # dotted names stay flat dataset names
        d = f["params/h.0.attn.c_attn.weight"]
        assert d.shape == (16, 48) and d.dtype == np.float32
        assert d.id.get_offset() is not None  # contiguous, so a rank can read a hyperslab directly
        assert f["optimizer/v/h.0.attn.c_attn.bias"].dtype == np.float64
        col = f["metrics/train/loss"]
        assert col.dtype == np.float64 and col.maxshape == (None,) and col.chunks is not None
        count = 0

        def check(name, obj):
            nonlocal count
            if isinstance(obj, h5py.Dataset):
                count += 1
                assert int(obj.attrs["crc32"]) == ck._crc(obj[()]), name

        f.visititems(check)
        assert count == 6 + 12 + 5


def test_metrics_column_can_be_extended_by_a_later_writer(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload())
    with h5py.File(path, "r+") as f:
        col = f["metrics/train/loss"]
        col.resize((12,))
        col[10:] = [1.5, 1.25]
        col.attrs["crc32"] = ck._crc(col[()])
    ckpt = load_checkpoint(path)
    assert ckpt.metrics["train"]["loss"][-2:].tolist() == [1.5, 1.25]


def test_existing_checkpoint_is_replaced(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload(seed=1, step=1))
    save_checkpoint(path, **make_payload(seed=2, step=2))
    ckpt = load_checkpoint(path)
    assert ckpt.state["step"] == 2
    assert_bitwise(ckpt.params["wte.weight"], make_payload(seed=2)["params"]["wte.weight"])
    assert tmp_leftovers(tmp_path) == []


def test_save_rejects_mismatched_optimizer_and_bad_names(tmp_path):
    payload = make_payload()
    payload["optimizer"]["m"]["wte.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        save_checkpoint(tmp_path / "a.h5", **payload)
    payload = make_payload()
    payload["params"]["bad/name"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="'/'"):
        save_checkpoint(tmp_path / "a.h5", **payload)
    with pytest.raises(UserError, match="does not exist"):
        save_checkpoint(tmp_path / "nodir" / "a.h5", **make_payload())
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ bad files


def test_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload())
    verify_checkpoint(path)  # good before
    flip_byte_in(path, "params/h.0.attn.c_attn.weight", index=1000)
    with pytest.raises(
        UserError, match=r"checksum mismatch in dataset /params/h\.0\.attn\.c_attn\.weight"
    ) as e:
        verify_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(UserError, match="checksum mismatch"):
        load_checkpoint(path)
    # without verification the corrupt value is simply read
    assert load_checkpoint(path, verify=False).params["wte.weight"].shape == (128, 16)


def test_flipped_byte_in_optimizer_state_is_detected(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload())
    flip_byte_in(path, "optimizer/v/ln_f.weight", index=7)
    with pytest.raises(UserError, match="checksum mismatch in dataset /optimizer/v/ln_f.weight"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.02])
def test_truncated_file(tmp_path, keep_fraction):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload())
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))
    for fn in (verify_checkpoint, load_checkpoint):
        with pytest.raises(UserError, match="truncated") as e:
            fn(path)
        assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(UserError, match="does not exist") as e:
        verify_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("this is not an HDF5 file\n" * 100)
    for fn in (verify_checkpoint, load_checkpoint):
        with pytest.raises(UserError, match="not a readable HDF5 file") as e:
            fn(path)
        assert str(path) in str(e.value)
        assert "\n" not in str(e.value)


def test_hdf5_from_another_program(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.arange(10))
        f.attrs["format"] = "someone-else"
    for fn in (verify_checkpoint, load_checkpoint):
        with pytest.raises(UserError, match="not an hpc_llm checkpoint") as e:
            fn(path)
        assert str(path) in str(e.value)
    with h5py.File(path, "w") as f:  # no attributes at all
        f.create_dataset("data", data=np.arange(10))
    with pytest.raises(UserError, match="not an hpc_llm checkpoint"):
        verify_checkpoint(path)


def test_future_format_version(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    for fn in (verify_checkpoint, load_checkpoint):
        with pytest.raises(UserError, match="newer hpc_llm") as e:
            fn(path)
        assert str(path) in str(e.value)


def test_incomplete_and_missing_dataset(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload())
    with h5py.File(path, "r+") as f:
        del f["params/wpe.weight"]
    with pytest.raises(UserError, match="missing dataset /params/wpe.weight"):
        verify_checkpoint(path)
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(UserError, match="incomplete"):
        verify_checkpoint(path)
    with pytest.raises(UserError, match="incomplete"):
        load_checkpoint(path, verify=False)


# ------------------------------------------------------------------------------------------------ crash safety


def test_failure_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload(seed=1, step=1))
    before = path.read_bytes()

    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("disk full (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, **make_payload(seed=2, step=2))
    monkeypatch.undo()

    assert calls["n"] == 4  # some datasets were written before the failure
    assert tmp_leftovers(tmp_path) == []
    assert path.read_bytes() == before
    assert load_checkpoint(path).state["step"] == 1


def test_failed_verification_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_payload(seed=1, step=1))
    before = path.read_bytes()
    seen = []

    def bad_verify(p, locking=True):
        seen.append(p)
        assert p != path and p.name.startswith(".ckpt.h5.tmp-") and p.exists()
        raise UserError(f"{p}: checksum mismatch (simulated)")

    monkeypatch.setattr(writers, "verify_checkpoint", bad_verify)
    with pytest.raises(UserError, match="simulated"):
        save_checkpoint(path, **make_payload(seed=2, step=2))
    assert len(seen) == 1
    assert tmp_leftovers(tmp_path) == []
    assert path.read_bytes() == before


def test_interrupt_during_save_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.h5"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(writers, "_fsync_path", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, **make_payload())
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ run directory


def small_payload(step):
    return dict(
        params={"w": np.full(4, step, np.float32)},
        optimizer={"m": {"w": np.zeros(4, np.float32)}},
        state={"step": step},
        config={},
        metrics={"train": {"step": [step], "loss": [1.0]}},
    )


def test_checkpoint_path_and_latest_pointer(tmp_path):
    p = checkpoint_path(tmp_path, 1200)
    assert p == tmp_path / "ckpt_00001200.h5"
    save_checkpoint(p, **small_payload(1200))
    write_latest(tmp_path, p)
    assert (tmp_path / "latest").read_text().strip() == "ckpt_00001200.h5"
    assert tmp_leftovers(tmp_path) == []
    assert find_latest(tmp_path) == p


def test_find_latest_empty_or_missing(tmp_path):
    assert find_latest(tmp_path) is None
    assert find_latest(tmp_path / "does-not-exist") is None


def test_find_latest_skips_corrupt_and_temp(tmp_path, caplog):
    for step in (100, 200, 300):
        save_checkpoint(checkpoint_path(tmp_path, step), **small_payload(step))
    flip_byte_in(checkpoint_path(tmp_path, 300), "params/w")
    (tmp_path / ".ckpt_00000400.h5.tmp-999").write_bytes(b"partial")
    (tmp_path / "ckpt_00000050.h5").write_text("junk")
    with caplog.at_level(logging.WARNING, logger="hpc_llm.checkpoint"):
        found = find_latest(tmp_path)
    assert found == checkpoint_path(tmp_path, 200)
    text = caplog.text
    assert "ckpt_00000300.h5" in text and "checksum mismatch" in text
    assert ".ckpt_00000400.h5.tmp-999" in text


def test_find_latest_prefers_newest_over_pointer(tmp_path, caplog):
    """A save killed between its rename and the pointer's update leaves a complete newer file: it wins."""
    for step in (100, 200):
        save_checkpoint(checkpoint_path(tmp_path, step), **small_payload(step))
    write_latest(tmp_path, checkpoint_path(tmp_path, 100))
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 200)
    # the newest no longer verifies -> the next one
    flip_byte_in(checkpoint_path(tmp_path, 200), "params/w")
    with caplog.at_level(logging.WARNING, logger="hpc_llm.checkpoint"):
        assert find_latest(tmp_path) == checkpoint_path(tmp_path, 100)
    assert "ckpt_00000200.h5" in caplog.text
    # pointer names a missing file
    write_latest(tmp_path, tmp_path / "ckpt_00000999.h5")
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 100)


def test_find_latest_follows_pointer_outside_the_directory(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_checkpoint(checkpoint_path(elsewhere, 7), **small_payload(7))
    run = tmp_path / "run"
    run.mkdir()
    write_latest(run, checkpoint_path(elsewhere, 7))
    assert find_latest(run) == checkpoint_path(elsewhere, 7)


def test_prune_keeps_newest(tmp_path):
    steps = [100, 200, 300, 400, 500]
    for step in steps:
        save_checkpoint(checkpoint_path(tmp_path, step), **small_payload(step))
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [
        "ckpt_00000100.h5",
        "ckpt_00000200.h5",
        "ckpt_00000300.h5",
    ]
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.h5")) == [
        "ckpt_00000400.h5",
        "ckpt_00000500.h5",
    ]
    assert prune_checkpoints(tmp_path, keep_last=2) == []
    with pytest.raises(ValueError):
        prune_checkpoints(tmp_path, keep_last=0)


def test_prune_never_removes_latest_nor_counts_corrupt(tmp_path):
    for step in (100, 200, 300, 400):
        save_checkpoint(checkpoint_path(tmp_path, step), **small_payload(step))
    write_latest(tmp_path, checkpoint_path(tmp_path, 100))
    flip_byte_in(checkpoint_path(tmp_path, 400), "params/w")
    prune_checkpoints(tmp_path, keep_last=1)
    left = sorted(p.name for p in tmp_path.glob("ckpt_*.h5"))
    # 400 is corrupt (left in place, not counted), 300 is the newest good one, 100 is what `latest` names
    assert left == ["ckpt_00000100.h5", "ckpt_00000300.h5", "ckpt_00000400.h5"]
    assert find_latest(tmp_path) == checkpoint_path(tmp_path, 300)


def test_load_without_optimizer_skips_moments(tmp_path):
    """optimizer=False (inference) returns the same parameters and no moments."""
    path = tmp_path / "c.h5"
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_checkpoint(
        path,
        params=params,
        optimizer={"m": {"w": np.ones((2, 3), np.float32)}},
        state={"step": 1},
        config={},
        metrics={},
    )
    ck = load_checkpoint(path, optimizer=False)
    assert ck.optimizer == {}
    np.testing.assert_array_equal(ck.params["w"], params["w"])
    assert load_checkpoint(path).optimizer["m"]["w"].sum() == 6


def test_prune_counts_files_known_good_without_reading_them(tmp_path, monkeypatch):
    """The trainer passes what it wrote and verified itself: those are not read again (saves stay cheap); any
    other file in the window is still verified."""
    for step in (100, 200, 300):
        save_checkpoint(checkpoint_path(tmp_path, step), **small_payload(step))
    read = []
    real = rundir._verifies
    monkeypatch.setattr(rundir, "_verifies", lambda path: read.append(path.name) or real(path))
    prune_checkpoints(tmp_path, keep_last=2, verified=[checkpoint_path(tmp_path, 300)])
    assert read == ["ckpt_00000200.h5"]
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.h5")) == [
        "ckpt_00000200.h5",
        "ckpt_00000300.h5",
    ]
