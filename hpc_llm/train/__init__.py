"""Training: the Trainer and its loop (trainer), the optimizer (optim).

``from hpc_llm.train import Trainer, train`` is the public entry the CLI and scripts use.
"""

from hpc_llm.train.trainer import Metrics, Trainer, train

__all__ = ["Metrics", "Trainer", "train"]
