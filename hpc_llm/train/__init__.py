"""Training: the Trainer and its loop (trainer), its start-up checks (startup, compat), its compute objects (build),
the skip policy (guards), the loop's checkpointed state (state), reporting (metrics), resume or fresh start (resume).
The optimizer it steps is hpc_llm/optim.py (the planner prices it too).

``from hpc_llm.train import Trainer, train`` is the public entry the CLI and scripts use.
"""

from hpc_llm.train.metrics import Metrics
from hpc_llm.train.trainer import Trainer, train

__all__ = ["Metrics", "Trainer", "train"]
