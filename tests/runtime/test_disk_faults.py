"""Real disk faults, not injected ones: a small tmpfs mounted by the test (root only; a machine that cannot mount
skips, which CI=true turns into a failure with the reason), filled to a few KB at each kind of write, and mounted
read-only. Every verb must end with one line (no traceback, no crash of the HDF5 library: status 1 or 2, never 139),
leave no temporary file, and keep its inputs and the newest checkpoint intact (docs/reliability.md)."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest
from helpers import hpc_llm_cli, tiny_config, write_toml

from hpc_llm.checkpoint import list_checkpoints, verify_checkpoint

cli = functools.partial(hpc_llm_cli, timeout=200)
LEFT_FREE = 16 << 10  # what a full disk still has: less than any checkpoint or token file here


@pytest.fixture
def disk(tmp_path):
    """mount(name, size_mb, readonly=False) -> a fresh tmpfs at tmp_path/name, unmounted at the end."""
    mounted = []

    def mount(name: str, size_mb: int = 16, readonly: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        opts = f"size={size_mb}m" + (",ro" if readonly else "")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
        )
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> None:
    """Leave LEFT_FREE bytes free on path's filesystem."""
    st = os.statvfs(path)
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize - LEFT_FREE))


def one_line(r, *words) -> str:
    """The process ended with one `hpc-llm:` line naming `words`, no traceback, not killed by a signal."""
    assert r.returncode in (1, 2), (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hpc-llm:")]
    assert len(lines) >= 1 and all(w in lines[-1] for w in words), r.stderr[-3000:]
    return lines[-1]


def temporaries(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob(".*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def lora_run(data_dir, tmp_path_factory):
    """A LoRA run's directory (what merge-lora merges, generate reads), one checkpoint at step 2."""
    root = tmp_path_factory.mktemp("lora")
    cfg = tiny_config(data_dir, root / "run", **{"train.max_iters": 2, "model.lora_rank": 2})
    r = cli("train", write_toml(cfg, root / "lora.toml"))
    assert r.returncode == 0, r.stderr
    return root / "run"


@pytest.mark.timeout(300)
def test_a_full_disk_in_saves_ends_in_one_line_and_the_newest_checkpoint_survives(
    data_dir, tmp_path, disk
):
    """The run saves step 2; the disk is then full. Resumed with checkpoint.on_error=continue, the saves at steps 4
    and 6 fail (the last one ends the run, status 1): no crash of HDF5 in the next save or at exit (status 139
    before the save reserved its file's space), step 2 still the newest checkpoint, verified."""
    run = disk("disk") / "run"
    cfg = tiny_config(data_dir, run, **{"train.max_iters": 2, "checkpoint.interval": 2})
    toml = write_toml(cfg, tmp_path / "run.toml")
    assert cli("train", toml).returncode == 0
    fill(run.parent)
    r = cli(
        "train",
        toml,
        "--resume",
        "auto",
        "--set",
        "train.max_iters=6",
        "--set",
        "checkpoint.on_error=continue",
    )
    line = one_line(r, "not saved", "failed in save at step 6", "No space left on device")
    assert r.returncode == 1, line
    said = r.stdout + r.stderr
    assert "failed in save at step 4" in said and "on_error=continue" in said, said[-3000:]
    assert [s for s, _ in list_checkpoints(run)] == [2]
    verify_checkpoint(run / "ckpt_00000002.h5")
    assert temporaries(run) == []


OUTPUTS = {
    # verb: argv (run: the LoRA run directory, corpus: a text file, out: the output on the full disk)
    "prepare": "prepare {corpus} --out {out}",
    "merge-lora": "merge-lora {run} --out {out}.h5",
    "generate --out": "generate {run} --max-new-tokens 128 --num-samples 32 --out {out}.jsonl",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("verb", OUTPUTS)
def test_an_output_onto_a_full_disk_is_one_line(verb, lora_run, corpus_file, tmp_path, disk):
    full = disk("disk")
    fill(full)
    before = sorted(os.listdir(lora_run))
    corpus = tmp_path / "corpus.txt"  # ten times what the disk has left
    corpus.write_text(corpus_file.read_text() * (10 * LEFT_FREE // corpus_file.stat().st_size + 1))
    argv = OUTPUTS[verb].format(run=lora_run, corpus=corpus, out=full / "out").split()
    one_line(cli(*argv), "No space left on device")
    assert temporaries(full) == [] and sorted(os.listdir(lora_run)) == before
    verify_checkpoint(list_checkpoints(lora_run)[0][1])


READ_ONLY = {
    # case: argv ({ro}: a read-only mount; merge-lora's save checks its directory itself)
    "train into a new directory": "train {toml} --set train.out_dir={ro}/new",
    "prepare --out": "prepare {corpus} --out {ro}/tokens",
    "generate --out": "generate {run} --max-new-tokens 2 --out {ro}/samples.jsonl",
}


@pytest.mark.timeout(300)
def test_a_read_only_directory_is_one_line_before_any_work(
    data_dir, lora_run, corpus_file, tmp_path, disk
):
    """Every verb that writes, aimed at a read-only filesystem: exit 2, one line naming the directory and the reason
    (before: a traceback, rc 1, train's in 'data loading')."""
    ro = disk("ro", readonly=True)
    toml = write_toml(tiny_config(data_dir, ro / "run"), tmp_path / "run.toml")
    for case, argv in READ_ONLY.items():
        filled = argv.format(toml=toml, ro=ro, corpus=corpus_file, run=lora_run).split()
        r = cli(*filled)
        line = one_line(r, "read-only filesystem", str(ro))
        assert r.returncode == 2, (case, line)
