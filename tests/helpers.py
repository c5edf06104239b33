"""What the test files share (they import it from here, never from one another; conftest.py keeps the fixtures):
tiny runs and their configs, launching the CLI under mpiexec, the comparisons and the all-ranks verdict of the MPI
tests, checkpoint probes, and random models (ours and a tiny Hugging Face GPT-2)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from mpi4py import MPI
from pytest_mpi.parallel_assert import parallel_assert

from hpc_llm import checkpoint as ckpt
from hpc_llm.config import Config, ModelConfig
from hpc_llm.config.checks import validated
from hpc_llm.model.gpt import GPT
from hpc_llm.parallel.grid import make_grid
from hpc_llm.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


# -- tiny runs ---------------------------------------------------------------------------------------------------------

STEPS = 5  # run_config's steps (and its one eval, at the end)


def tiny_config(data_path, out_dir, **overrides) -> Config:
    """A validated tiny run: 2 layers, 2 heads, 32 dim, block 16, batch 4; no peak-FLOP measurement at start.

    overrides: {"section.key": value}, e.g. tiny_config(d, o, **{"model.dropout": 0.1, "train.max_iters": 5}).
    """
    cfg = Config()
    m, t = cfg.model, cfg.train
    m.n_layer, m.n_head, m.n_embd, m.block_size = 2, 2, 32, 16
    cfg.data.path = str(data_path)
    t.batch_size = 4
    t.max_iters = 10
    t.lr, t.min_lr = 1e-2, 1e-3
    t.warmup_iters, t.lr_decay_iters = 3, 60
    t.eval_interval, t.eval_iters = 1000, 2
    t.log_interval = 1000
    t.peak_tflops = 1.0
    t.out_dir = str(out_dir)
    for key, value in overrides.items():
        section, name = key.split(".")
        sub = getattr(cfg, section)
        assert hasattr(sub, name), key  # a typo in a test must not pass silently
        setattr(sub, name, value)
    return validated(cfg)


def write_toml(cfg: Config, path) -> Path:
    """cfg as a TOML config file, for tests that go through `hpc-llm train` (TOML's strings, numbers and booleans
    are written as JSON writes them)."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines.append("")
    Path(path).write_text("\n".join(lines))
    return Path(path)


def run_config(data_dir, out_dir, **overrides):
    """The tiny run of the MPI tests: 2 layers, 4 heads, 32 dim, block 16, batch 4 (divisible by every DP size
    used), gradient buckets of 0.01 MiB (a dozen or more: the nonblocking path overlaps backward)."""
    base = {
        "model.n_head": 4,
        "train.max_iters": STEPS,
        "train.eval_iters": 1,
        "train.eval_interval": STEPS,
        "parallel.bucket_mb": 0.01,
    }
    return tiny_config(data_dir, out_dir, **{**base, **overrides})


def train(cfg, grid, resume=None) -> Trainer:
    """cfg trained on grid to its end; the trainer, its run's summary in .summary."""
    tr = Trainer(cfg, resume=resume, grid=grid)
    tr.summary = tr.run()
    return tr


def write_run_config(path: Path, data_dir, out_dir) -> Path:
    """A two-step TOML run (2 layers, 4 heads, 32 dim, block 16, batch 4, no eval) for tests of the CLI."""
    path.write_text(f"""
[model]
n_layer = 2
n_head = 4
n_embd = 32
block_size = 16

[data]
path = "{data_dir}"

[train]
batch_size = 4
max_iters = 2
eval_iters = 0
peak_tflops = 1.0
out_dir = "{out_dir}"
""")
    return path


# -- the CLI under mpiexec ---------------------------------------------------------------------------------------------

CLI_TIMEOUT = 120


def mpiexec() -> str:
    """The mpiexec next to this Python (the MPI that mpi4py is built with)."""
    found = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    assert Path(found).exists(), "mpiexec not found (scripts/test.sh puts the venv's bin on PATH)"
    return found


def hpc_llm_cli(*args, cwd=None, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m hpc_llm ARGS` in one process, no launcher (the exit status, stdout and stderr as text)."""
    return subprocess.run(
        [sys.executable, "-m", "hpc_llm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def run_mpi(
    nprocs: int, args: list[str], timeout: float = CLI_TIMEOUT, entry: tuple = ("-m", "hpc_llm")
):
    """Run `python -m hpc_llm ARGS` (or `python ENTRY ARGS`) under mpiexec in a session of its own; on a timeout the
    whole session is killed and the test fails, and whatever of it outlived the launcher is killed after it too (no
    stray ranks). (exit status, stdout, stderr, seconds)."""
    cmd = [mpiexec(), "--oversubscribe", "-n", str(nprocs), sys.executable, *entry, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    kill_session(
        proc.pid
    )  # a rank that outlived its launcher (one hung outside MPI when the job was aborted)
    return proc.returncode, out, err, time.monotonic() - t0


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (Linux /proc). Open MPI's launcher puts each rank in a process group
    of its own, so killing the launcher's group leaves the ranks; they stay in its session."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # after the command's closing parenthesis: state, ppid, pgrp, session
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) == sid:
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, IndexError, ValueError):
            pass  # gone meanwhile, or not ours to read


# -- comparisons, and one verdict for all ranks ------------------------------------------------------------------------

F64_RTOL = 1e-10  # float64 runs that differ only in the order of sums (test_parallel.py derives it)
TP_RTOL = 1e-12  # one sharded layer against the unsharded one (test_tensor_parallel.py derives it)


def check(ok: bool, msg: str = "") -> None:
    """parallel_assert with every failing rank's message in the error (the parent shows rank 0's report)."""
    comm = MPI.COMM_WORLD
    msgs = comm.allgather(None if ok else f"rank {comm.rank}: {msg}")
    parallel_assert(bool(ok), "\n".join(m for m in msgs if m))


def rel_diff(a, b) -> float:
    """The largest elementwise |a - b| / |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def crc(buf) -> int:
    """crc32 of an array's bytes (a bitwise fingerprint to compare across ranks)."""
    return zlib.crc32(np.ascontiguousarray(buf).tobytes())


def full_flat(tr: Trainer):
    """The trainer's master weights as a whole flat buffer: model.flat, or under ZeRO-3 (where a rank keeps only
    its pieces) a copy with every unit gathered from its owners (a collective over the data-parallel group)."""
    if tr.zero is not None and tr.zero.stage >= 3:
        return tr.zero.gathered(tr.model.flat)
    return tr.model.flat


def replica_checks(tr: Trainer) -> list[str]:
    """Parameters bitwise identical over the DP group (every rank holds the same flat buffer; ZeRO-3: once
    gathered), and the replicated tensors (LayerNorms, biases after g, wpe) bitwise identical over the TP group."""
    bad = []
    flat = full_flat(tr)
    dp_crcs = tr.grid.dp_comm.mpi.allgather(crc(flat))
    if len(set(dp_crcs)) != 1:
        bad.append(f"parameters differ across the DP group: crc32 {dp_crcs}")
    replicated = np.concatenate([flat[a:b] for a, b in tr.model.replicated_ranges()])
    tp_crcs = tr.grid.tp_comm.mpi.allgather(crc(replicated))
    if len(set(tp_crcs)) != 1:
        bad.append(f"replicated parameters differ across the TP group: crc32 {tp_crcs}")
    return bad


F32_RTOL = 1e-5
F32_LR_FRACTION = 1e-3


def compare_runs(par: Trainer, ref: Trainer, dtype: str) -> list[str]:
    """Loss, grad norm and eval histories and every parameter of the parallel run against the reference, to
    test_parallel.py's tolerances: F64_RTOL in float64; in float32 F32_RTOL, and parameters within F32_LR_FRACTION
    of the sum of the learning rates used."""
    bad = []
    rtol = F64_RTOL if dtype == "float64" else F32_RTOL
    pt, rt = par.metrics.train, ref.metrics.train
    if pt["step"] != rt["step"] or len(pt["step"]) != STEPS:
        return [f"{dtype}: steps {pt['step']} vs reference {rt['step']}"]
    for key in ("loss", "grad_norm"):
        if not rel_diff(pt[key], rt[key]) <= rtol:
            bad.append(
                f"{dtype} {key}: {pt[key]} vs reference {rt[key]} (relative {rel_diff(pt[key], rt[key]):.2e})"
            )
    if pt["lr"] != rt["lr"]:
        bad.append(f"{dtype} lr: {pt['lr']} vs reference {rt['lr']}")
    pe, re_ = par.metrics.eval, ref.metrics.eval
    if (
        pe["step"] != re_["step"]
        or not rel_diff(pe["val_loss"] + pe["train_loss"], re_["val_loss"] + re_["train_loss"])
        <= rtol
    ):
        bad.append(f"{dtype} eval: {pe} vs reference {re_}")

    got, want = par.model.full_tensors(full_flat(par)), ref.model.full_tensors(ref.model.flat)
    lr_sum = sum(rt["lr"])
    for name, w in want.items():
        g = got[name]
        if g.dtype != np.dtype(dtype) or g.shape != w.shape:
            bad.append(f"{dtype} {name}: {g.dtype} {g.shape} vs reference {w.dtype} {w.shape}")
            continue
        err = float(np.max(np.abs(g.astype(np.float64) - w)))
        bound = (
            F64_RTOL * float(np.max(np.abs(w))) if dtype == "float64" else F32_LR_FRACTION * lr_sum
        )
        if not err <= bound:
            bad.append(f"{dtype} parameter {name}: max abs difference {err:.3e} > {bound:.3e}")
    return bad


def mismatch(got, want, what: str, rtol: float = TP_RTOL, scale: float | None = None) -> list[str]:
    """[] if got matches want normwise (max |got - want| <= rtol * scale, scale = max |want| by default), else
    [a description]. rtol=0: bitwise."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return [f"{what}: shape {got.shape}, expected {want.shape}"]
    if got.dtype != want.dtype:
        return [f"{what}: dtype {got.dtype}, expected {want.dtype}"]
    if rtol == 0:
        return [] if np.array_equal(got, want) else [f"{what}: not bitwise equal"]
    if not np.all(np.isfinite(got)):
        return [f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite values"]
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if scale is None else scale
    return (
        [] if err <= rtol * scale else [f"{what}: max abs error {err:.3e} > {rtol:g} * {scale:.3e}"]
    )


def reference_checks(tr, ref, name: str, steps: slice = slice(None)) -> list[str]:
    """The histories (loss, grad norm, lr, evals) and every parameter this rank holds, against the reference."""
    bad = []
    got, want = tr.metrics.train, ref.metrics.train
    if got["step"] != want["step"]:
        return [f"{name}: steps {got['step']} vs reference {want['step']}"]
    for key in ("loss", "grad_norm"):
        a, b = got[key][steps], want[key][steps]
        if not rel_diff(a, b) <= F64_RTOL:
            bad.append(f"{name} {key}: {a} vs reference {b} (relative {rel_diff(a, b):.2e})")
    if got["lr"] != want["lr"]:
        bad.append(f"{name} lr: {got['lr']} vs reference {want['lr']}")
    # a resumed run also holds the first run's closing eval at K
    after = -1 if steps.start is None else steps.start
    ge, re_ = (
        {k: [v for s, v in zip(e["step"], e[k]) if s > after] for k in e}
        for e in (tr.metrics.eval, ref.metrics.eval)
    )
    if (
        ge["step"] != re_["step"]
        or not rel_diff(ge["val_loss"] + ge["train_loss"], re_["val_loss"] + re_["train_loss"])
        <= F64_RTOL
    ):
        bad.append(f"{name} eval: {ge} vs reference {re_}")
    params, ref_params = (
        tr.model.full_tensors(full_flat(tr)),
        ref.model.full_tensors(ref.model.flat),
    )
    for pname, g in params.items():
        w = ref_params[pname]
        err, bound = float(np.max(np.abs(g - w))), F64_RTOL * float(np.max(np.abs(w)))
        if g.dtype != np.float64 or g.shape != w.shape or not err <= bound:
            bad.append(
                f"{name} parameter {pname}: {g.dtype} {g.shape}, max abs difference {err:.3e} > {bound:.3e}"
            )
    return bad


def cache_bytes(obj, seen=None) -> int:
    """Bytes of the distinct arrays a cache holds: views are counted once, by the array that owns their memory."""
    seen = {} if seen is None else seen
    if isinstance(obj, np.ndarray):
        base = obj
        while isinstance(base.base, np.ndarray):
            base = base.base
        seen[id(base)] = base.nbytes
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            cache_bytes(o, seen)
    return sum(seen.values())


# -- checkpoints -------------------------------------------------------------------------------------------------------


def flip_byte_in(path, dataset, index=0):
    """Flip the low bit of byte `index` of `dataset`'s data in the HDF5 file at path (a corruption to detect); of a
    virtual dataset (the parts writer's), byte `index` of the part file dataset its first mapping reads."""
    with h5py.File(path, "r") as f:
        if f[dataset].is_virtual:
            source = f[dataset].virtual_sources()[0]
            path = Path(path).parent / source.file_name
            with h5py.File(path, "r") as part:
                offset = part[source.dset_name].id.get_offset()
        else:
            offset = f[dataset].id.get_offset()
        assert offset is not None
    with open(path, "r+b") as fh:
        fh.seek(offset + index)
        byte = fh.read(1)
        fh.seek(offset + index)
        fh.write(bytes([byte[0] ^ 0x01]))


@contextlib.contextmanager
def count_reads():
    """Elements each group ("params", "optimizer/m", ...) of CheckpointFile.read handed this rank."""
    counts = collections.Counter()
    original = ckpt.CheckpointFile.read

    def counting(self, group, name, index=(), out=None):
        out = original(self, group, name, index, out)
        counts[group] += out.size
        return out

    ckpt.CheckpointFile.read = counting
    try:
        yield counts
    finally:
        ckpt.CheckpointFile.read = original


def hyperslab_checks(tr, read) -> list[str]:
    """A resumed rank read its TP shard of every parameter (model.local_size elements) and, of each Adam moment, the
    rows covering the ranges it owns: its whole shard without ZeRO-1, about 1/dp of it with it."""
    m, bad = tr.model, []
    owned = sum(b - a for a, b in tr.sync.owned)
    # each owned range, cut at tensor boundaries, is read as whole rows: at most two partial rows per piece
    pieces = sum(
        1 for a, b in tr.sync.owned for s in m.specs if max(a, s.offset) < min(b, s.offset + s.size)
    )
    slack = 2 * pieces * max(s.size // s.local_shape[0] for s in m.specs)
    if m.kept is not None:  # ZeRO-3: the parameters too are read only for the owned ranges
        if not owned <= read["params"] <= owned + slack:
            bad.append(f"params: read {read['params']} elements, owns {owned} (+ at most {slack})")
    elif read["params"] != m.local_size:
        bad.append(f"read {read['params']} parameter elements, this rank holds {m.local_size}")
    for slot in ("optimizer/m", "optimizer/v"):
        if tr.sync.zero and not owned <= read[slot] <= owned + slack:
            bad.append(
                f"{slot}: read {read[slot]} elements, owns {owned} (+ at most {slack} of partial rows)"
            )
        if not tr.sync.zero and read[slot] != m.local_size:
            bad.append(f"{slot}: read {read[slot]} elements, this rank holds {m.local_size}")
    return bad


# the checkpoint tests' layouts (test_checkpoint_parallel.py, test_checkpoint_mpio.py)
INTERLEAVED = {
    "parallel.schedule": "interleaved",
    "parallel.virtual_stages": 2,
    "model.n_layer": 4,
    "train.grad_accum": 2,
}
# name: (ranks, parallel.tp, parallel.pp, parallel.zero, other settings)
CHECKPOINT_LAYOUTS = {
    "TP2": (2, 2, 1, 0, {}),
    "DP2-zero1": (2, 1, 1, 1, {}),
    "PP2": (2, 1, 2, 0, {}),
    "PP2-interleaved": (2, 1, 2, 0, INTERLEAVED),
    "DP2xTP2-zero1": (4, 2, 1, 1, {}),
    "PP2xDP2-zero1": (4, 1, 2, 1, {}),
    "PP2xDP2-zero3": (4, 1, 2, 3, {}),
    "PP2xDP2xTP2-zero1": (8, 2, 2, 1, {}),
    "DP2-zero2": (2, 1, 1, 2, {}),
    "DP2xTP2-SP-zero3-kept": (
        4,
        2,
        1,
        3,
        {"parallel.sequence_parallel": True, "parallel.reshard_after_forward": False},
    ),
}


def layout_trainer(data_dir, out_dir, layout: str, resume=None, **overrides) -> Trainer:
    """A Trainer for run_config at one of CHECKPOINT_LAYOUTS (on exactly its ranks), no eval, the gather writer."""
    ranks, tp, pp, zero, extra = CHECKPOINT_LAYOUTS[layout]
    assert MPI.COMM_WORLD.Get_size() == ranks
    cfg = run_config(
        data_dir,
        out_dir,
        **{
            "train.eval_iters": 0,
            "parallel.tp": tp,
            "parallel.pp": pp,
            "parallel.zero": zero,
            "checkpoint.writer": "gather",
            **extra,
            **overrides,
        },
    )
    return Trainer(cfg, resume=resume, grid=make_grid(MPI.COMM_WORLD, tp, pp))


# Python's own objects during a save (per dataset: h5py objects, the plan; JSON, pickles)
SAVE_SLACK = 512 << 10


def save_failure_problems(tr, rank: int, run=None) -> list[str]:
    """Run `tr` (4 steps, checkpoints at 2 and 4; or `run()`), whose step-4 save fails on `rank`: what is wrong on
    this rank with the outcome (for every writer alike): not one SaveFailed line, the same on every rank,
    naming the rank, the file and the error; a temporary file left; step 2 not the newest checkpoint, not verified,
    or not the one `latest` names."""
    try:
        (run or tr.run)()
        error = None
    except ckpt.SaveFailed as e:
        error = str(e)
    errors = MPI.COMM_WORLD.allgather(error)
    run_dir = tr.out_dir
    bad = []
    if error is None or len(set(errors)) != 1 or "\n" in error:
        bad.append(f"errors: {errors}")
    elif not (
        f"rank {rank} failed in save at step 4" in error
        and "ckpt_00000004.h5" in error
        and "No space left on device" in error
    ):
        bad.append(f"the message should name rank {rank}, the file and the error: {error}")
    if MPI.COMM_WORLD.rank == 0:
        named = {ckpt.rundir.parts_of(p) for _s, p in ckpt.list_checkpoints(run_dir)}
        left = [
            p
            for p in run_dir.iterdir()
            if ".tmp-" in p.name or (".parts-" in p.name and p not in named)
        ]
        if left or [s for s, _ in ckpt.list_checkpoints(run_dir)] != [2]:
            bad.append(f"left in the run directory: {sorted(os.listdir(run_dir))}")
        ckpt.verify_checkpoint(ckpt.checkpoint_path(run_dir, 2))
        if ckpt.read_latest(run_dir) != ckpt.checkpoint_path(run_dir, 2):
            bad.append(f"latest names {ckpt.read_latest(run_dir)}")
    return bad


# -- random models -----------------------------------------------------------------------------------------------------


def random_model(shape, dtype="float64", seed=0, std=0.5, pos_scale=1.0) -> GPT:
    """A model with every parameter (LayerNorm gains and biases included) random and large enough that attention
    is far from uniform and logits spread over several units. pos_scale > 1 makes the position embedding dominate,
    so greedy decoding does not collapse onto one token and its output depends on the positions used."""
    n_layer, n_head, n_embd, block_size, vocab = shape
    cfg = ModelConfig(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=block_size,
        vocab_size=vocab,
        dtype=dtype,
    )
    model = GPT(cfg, seed=None)
    rng = np.random.default_rng(seed)
    model.flat[:] = (rng.standard_normal(model.num_params) * std).astype(model.dtype)
    model.params["wpe.weight"][...] *= pos_scale
    return model


# a tiny GPT-2 in Hugging Face's format: 77, not a multiple of 64, so wte gets padded
N_EMBD, N_LAYER, N_HEAD, N_POSITIONS, VOCAB = 32, 2, 4, 16, 77


def hf_config(**overrides) -> dict:
    """config.json of the tiny GPT-2, as transformers writes it; overrides replace keys."""
    cfg = {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": 76,
        "embd_pdrop": 0.1,
        "eos_token_id": 76,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": N_POSITIONS,
        "n_embd": N_EMBD,
        "n_head": N_HEAD,
        "n_inner": None,
        "n_layer": N_LAYER,
        "n_positions": N_POSITIONS,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": VOCAB,
    }
    cfg.update(overrides)
    return cfg


def hf_tensors(
    seed: int = 0, prefix: str = "transformer.", buffers: bool = True, head: bool = True
) -> dict:
    """float32 tensors under HF's names, Conv1D weights (in, out). Scales are large enough that attention is far
    from uniform and every LayerNorm/bias matters, so a wrong mapping cannot hide."""
    rng = np.random.default_rng(seed)
    C, V, P = N_EMBD, VOCAB, N_POSITIONS

    def w(*shape, std=0.3):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {f"{prefix}wte.weight": w(V, C, std=0.5), f"{prefix}wpe.weight": w(P, C, std=0.3)}
    for i in range(N_LAYER):
        p = f"{prefix}h.{i}."
        t |= {
            p + "ln_1.weight": 1 + w(C, std=0.2),
            p + "ln_1.bias": w(C, std=0.2),
            p + "attn.c_attn.weight": w(C, 3 * C, std=0.4),
            p + "attn.c_attn.bias": w(3 * C, std=0.2),
            p + "attn.c_proj.weight": w(C, C, std=0.2),
            p + "attn.c_proj.bias": w(C, std=0.1),
            p + "ln_2.weight": 1 + w(C, std=0.2),
            p + "ln_2.bias": w(C, std=0.2),
            p + "mlp.c_fc.weight": w(C, 4 * C, std=0.3),
            p + "mlp.c_fc.bias": w(4 * C, std=0.2),
            p + "mlp.c_proj.weight": w(4 * C, C, std=0.1),
            p + "mlp.c_proj.bias": w(C, std=0.1),
        }
        # what older transformers versions saved: the causal mask and the masked-score constant
        if buffers:
            t[p + "attn.bias"] = np.tril(np.ones((P, P), dtype=np.float32))[None, None]
            t[p + "attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    t |= {f"{prefix}ln_f.weight": 1 + w(C, std=0.2), f"{prefix}ln_f.bias": w(C, std=0.2)}
    if head:
        t["lm_head.weight"] = t[f"{prefix}wte.weight"].copy()  # tied, as GPT2LMHeadModel has it
    return t


def probe_gpu():
    """(cupy, None) where CuPy and a usable GPU are here, else (cupy or None, why not); HPC_LLM_REQUIRE_GPU=1 turns
    "not here" into an error (a GPU machine's CI must not skip the gpu tests)."""
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        return cupy, None
    except ImportError:
        cupy, why = None, "CuPy is not installed (pip install hpc_llm[gpu])"
    except Exception as e:  # noqa: BLE001 - any CUDA failure means: no usable GPU here
        why = f"no usable GPU: {e}"
    if os.environ.get("HPC_LLM_REQUIRE_GPU") == "1":
        raise RuntimeError(f"HPC_LLM_REQUIRE_GPU=1, but {why}")
    return cupy, why


def plan_cluster_dict(**drop) -> dict:
    """The planner tests' cluster as a dict: 4 devices a node, intra 5 GB/s, inter 1 GB/s; drop="section__key"
    removes a field."""
    d = {
        "name": "test",
        "node": {"devices": 4, "memory_bytes": 16e9, "runtime_bytes": 0},
        "compute": {
            "gemm_call_s": 1e-6,
            "call_s": 1e-6,
            "transcendental_rate": 1e9,
            "scatter_rate": 1e8,
            "elementwise_bw": {"65536": 1e11, "67108864": 2e10},
            "gemm": {"float32": {"32": 5e10, "1024": 1e11}, "float64": {"32": 2e10, "1024": 5e10}},
        },
        "link": {"intra": {"latency_s": 2e-6, "bw": 5e9}, "inter": {"latency_s": 5e-6, "bw": 1e9}},
        "storage": {"write_bw": 5e8},
    }
    for path in drop:
        section, key = path.split("__")
        del d[section][key]
    return d
