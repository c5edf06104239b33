"""Median Trainer.train_step time in one process: the default training path (fp32, watchdog on, no fault).

    PYTHONPATH=TREE python scripts/bench_trainer_step.py small 60      # TREE: a checkout (e.g. a git worktree)
    PYTHONPATH=TREE python scripts/bench_trainer_step.py 6x384 8

Run it alternately on two checkouts to compare revisions side by side (docs/performance.md). Needs a prepared
shakespeare-char directory at /tmp/sc (`hpc-llm prepare tinyshakespeare.txt --tokenizer char --out /tmp/sc`).
"""

import statistics
import sys
import tempfile
import time

import hpc_llm
from hpc_llm.config import load_config
from hpc_llm.train.trainer import Trainer

preset = sys.argv[1]
P = {
    "small": "model.n_layer=4 model.n_head=4 model.n_embd=128 model.block_size=64 train.batch_size=12",
    "6x384": "model.n_layer=6 model.n_head=6 model.n_embd=384 model.block_size=256 train.batch_size=8",
}[preset]
sets = P.split() + [
    "data.path=/tmp/sc",
    "train.peak_tflops=1",
    "train.eval_iters=0",
    f"train.out_dir={tempfile.mkdtemp()}/run",
]
tr = Trainer(load_config(None, sets))
for _ in range(3):
    tr.train_step()
ts = []
for _ in range(int(sys.argv[2])):
    t0 = time.perf_counter()
    tr.train_step()
    ts.append(time.perf_counter() - t0)
print(hpc_llm.__file__, preset, f"median {1e3 * statistics.median(ts):.2f} ms over {len(ts)}")
