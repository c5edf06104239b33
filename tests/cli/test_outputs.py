"""Output flags with --force: the existing file is replaced, through a temporary name beside it (none left behind);
a writer killed mid-write leaves the old file intact. (The refusals, without --force or onto an input, are rows of
tests/cli/test_bad_input.py.)"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import FIXTURES, REPO, hpc_llm_cli

from hpc_llm.errors import UserError
from hpc_llm.runtime.fsio import check_output

CLUSTER = REPO / "inputs" / "clusters" / "h100_nvlink_ib400.toml"

TINY_TOML = """\
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16

[data]
path = "{data}"

[train]
batch_size = 4
max_iters = 2
lr = 1e-2
min_lr = 1e-3
warmup_iters = 1
lr_decay_iters = 2
eval_interval = 1000
eval_iters = 2
log_interval = 1000
peak_tflops = 1.0
out_dir = "{out}"
"""


cli = functools.partial(hpc_llm_cli, timeout=300)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("outputs")
    cfg = root / "tiny.toml"
    cfg.write_text(TINY_TOML.format(data=data_dir, out=root / "run"))
    r = cli("train", cfg)
    assert r.returncode == 0, r.stderr
    return root


def test_generate_force_replaces_the_file(trained, tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("earlier samples\n")
    r = cli("generate", trained / "run", "--max-new-tokens", 3, "--num-samples", 2, "--out", out)
    assert r.returncode == 2 and "file exists: give --force" in r.stderr, r.stderr
    assert out.read_text() == "earlier samples\n"
    r = cli(
        "generate",
        trained / "run",
        "--max-new-tokens",
        3,
        "--num-samples",
        2,
        "--out",
        out,
        "--force",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(row["tokens"]) == 3 for row in rows)
    assert leftovers(tmp_path) == []


def test_prepare_force_replaces_a_preparation(tmp_path, corpus_file):
    out = tmp_path / "data"
    assert cli("prepare", corpus_file, "--out", out).returncode == 0
    meta = (out / "meta.json").read_text()
    (out / "notes.txt").write_text("mine\n")
    r = cli("prepare", corpus_file, "--out", out, "--tokenizer", "char")
    assert r.returncode == 2 and "of an earlier preparation: give --force" in r.stderr, r.stderr
    assert (out / "meta.json").read_text() == meta
    r = cli("prepare", corpus_file, "--out", out, "--tokenizer", "char", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "char"
    assert (out / "notes.txt").read_text() == "mine\n"  # prepare writes only its three files


def test_plan_timeline_force_replaces_the_drawing(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(TINY_TOML.format(data=tmp_path / "nodata", out=tmp_path / "run"))
    png = tmp_path / "t.png"
    png.write_bytes(b"an earlier drawing")
    args = ("plan", cfg, "--cluster", CLUSTER, "--gpus", 2, "--set", "model.vocab_size=64")
    r = cli(*args, "--timeline", png)
    assert r.returncode == 2 and "file exists: give --force" in r.stderr, r.stderr
    r = cli(*args, "--timeline", png, "--force")
    assert r.returncode == 0, r.stderr
    assert png.read_bytes().startswith(b"\x89PNG")
    assert leftovers(tmp_path) == []


def test_import_gpt2_force_replaces_the_checkpoint(tmp_path):
    pytest.importorskip("safetensors")
    out = tmp_path / "gpt2.h5"
    out.write_bytes(b"an earlier import")
    r = cli("import-gpt2", FIXTURES / "hf_gpt2_tiny", "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().startswith(b"\x89HDF")
    assert leftovers(tmp_path) == []


def test_check_output_sees_inputs_through_links(tmp_path):
    """The same file by a symbolic link, a hard link, or a file of an input directory: refused even with force."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "ckpt_00000002.h5"
    ckpt.write_bytes(b"weights")
    (tmp_path / "soft.h5").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.h5")
    for out, given in (("soft.h5", ckpt), ("hard.h5", ckpt), ("run/ckpt_00000002.h5", run)):
        with pytest.raises(UserError, match="writing it would destroy it"):
            check_output(tmp_path / out, "--out", (given,), force=True)
    assert check_output(tmp_path / "new.h5", "--out", (run,)) == tmp_path / "new.h5"
    with pytest.raises(UserError, match="file exists: give --force"):
        check_output(tmp_path / "soft.h5", "--out", (tmp_path / "other",))


def test_a_kill_mid_write_leaves_the_old_file(tmp_path):
    """A writer SIGKILLed between writing half its output and the rename: the old file is whole, the new half lies
    in a temporary file beside it (never under the output's name)."""
    out = tmp_path / "out.json"
    out.write_text("the old file\n")
    script = textwrap.dedent(
        f"""
        import os, signal
        from hpc_llm.runtime.fsio import atomic_output
        with atomic_output({str(out)!r}) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert out.read_text() == "the old file\n"
    (tmp,) = leftovers(tmp_path)
    assert tmp.startswith(".out.json.") and tmp.endswith(".tmp.json")
