"""Median Trainer.train_step time in one process: the default training path (fp32, watchdog on, no fault).

    PYTHONPATH=TREE python scripts/bench/bench_trainer_step.py small 60      # TREE: a checkout (e.g. a git worktree)
    PYTHONPATH=TREE python scripts/bench/bench_trainer_step.py 6x384 8

Run it alternately on two checkouts to compare revisions side by side (docs/performance.md). Needs a prepared
shakespeare-char directory at /tmp/sc (`hpc-llm prepare tinyshakespeare.txt --tokenizer char --out /tmp/sc`).
"""

import sys
import tempfile

import hpc_llm
from hpc_llm.bench.timer import median_time
from hpc_llm.config import load_config
from hpc_llm.train.trainer import Trainer

from common import PRESETS, model_sets

preset = sys.argv[1]
shape = {"small": "shakespeare-char", "6x384": "6x384"}[preset]  # the vocabulary: the data's
sets = model_sets(shape, vocab=False) + [
    f"train.batch_size={PRESETS[shape]['batch']}",
    "data.path=/tmp/sc",
    "train.peak_tflops=1",
    "train.eval_iters=0",
    f"train.out_dir={tempfile.mkdtemp()}/run",
]
tr = Trainer(load_config(None, sets))
steps = int(sys.argv[2])
step_s = median_time(tr.train_step, steps, warmup=3)
print(hpc_llm.__file__, preset, f"median {1e3 * step_s:.2f} ms over {steps}")
