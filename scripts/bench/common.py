"""What the benchmark scripts share: the model shapes they measure, peak memory, a random-token data directory.

The scripts beside this file import it as `from common import ...`: Python puts a script's own folder first on
sys.path, so `python scripts/bench/bench_train.py` (from anywhere) finds it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hpc_llm.config import Config
from hpc_llm.data.tokens import FORMAT, FORMAT_VERSION

REPO = Path(__file__).resolve().parents[2]
# the corpus the workplace keeps beside the repository (../shared/data/)
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

# Model shapes and the batch each is benchmarked at: nanoGPT's shakespeare-char CPU setting (vocab 65), the middle
# row of the targets (6 layers x 384), GPT-2 small's shape (vocab 50304, padded to a multiple of 64)
PRESETS = {
    "shakespeare-char": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, batch=12
    ),
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65, batch=8),
    "gpt2-small": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, batch=1
    ),
}


def model_shape(preset: str, vocab: bool = True) -> dict:
    """The preset's model config keys; without vocab_size where the model takes its vocabulary from the data."""
    return {
        k: v for k, v in PRESETS[preset].items() if k != "batch" and (vocab or k != "vocab_size")
    }


def model_sets(preset: str, vocab: bool = True) -> list[str]:
    """The preset's model shape as `--set` overrides: ["model.n_layer=4", ...]."""
    return [f"model.{k}={v}" for k, v in model_shape(preset, vocab).items()]


def vm_hwm() -> int:
    """This process's peak resident memory in bytes (VmHWM; not ru_maxrss, which Linux carries over exec from the
    parent that spawned the process)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def resident_bytes(buf) -> int:
    """Bytes of a NumPy array's memory resident now (mincore over its pages): what a ZeRO-2/3 buffer
    (backend.releasable_zeros) really holds, which tracemalloc cannot see and nbytes overstates."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = buf.ctypes.data // page * page
    length = buf.ctypes.data + buf.nbytes - start
    pages = -(-length // page)
    vec = (ctypes.c_ubyte * pages)()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in bytes(vec)) * page


def random_tokens(directory: Path, vocab: int, n: int) -> None:
    """A data directory of uniform random tokens (what the benchmark trains on does not matter for speed)."""
    rng = np.random.default_rng(0)
    for split, size in (("train", n), ("val", n // 10)):
        rng.integers(0, vocab, size, dtype=np.uint16).tofile(directory / f"{split}.bin")
    # any vocabulary size, below the surrogate code points
    chars = "".join(chr(0x100 + i) for i in range(vocab))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tokenizer": "char",
        "chars": chars,
        "vocab_size": vocab,
        "n_train": n,
        "n_val": n // 10,
        "n_files": 0,
        "n_skipped": 0,
        "sources": [],
    }
    (directory / "meta.json").write_text(json.dumps(meta))


def preset_config(world, preset: str, data_dir: Path, n_tokens: int) -> Config:
    """A benchmark run of a preset's model and batch on random tokens: world rank 0 writes n_tokens of them into
    data_dir (every rank waits for it), the run's directory inside it, no eval, a fixed MFU peak (no matmul measured
    at start). The script sets its own layout on top."""
    if world.rank == 0:
        random_tokens(data_dir, PRESETS[preset]["vocab_size"], n_tokens)
    world.Barrier()
    cfg = Config()
    for k, v in model_shape(preset).items():
        setattr(cfg.model, k, v)
    cfg.data.path = str(data_dir)
    cfg.train.batch_size = PRESETS[preset]["batch"]
    cfg.train.out_dir = str(data_dir / "run")
    cfg.train.peak_tflops = 1.0
    cfg.train.eval_iters = 0
    return cfg
