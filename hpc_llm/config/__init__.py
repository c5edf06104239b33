"""The run configuration: its sections (dataclasses), how a TOML file and `--set` overrides become one (load), and
the checks every rank makes before any compute (checks). The names a caller needs, from one place."""

from hpc_llm.config.checks import LORA_TARGETS, canonical_targets, validated
from hpc_llm.config.load import config_from_dict, load_config, parse_override, read_toml
from hpc_llm.config.sections import (
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    TrainConfig,
    stage_layers,
)

__all__ = [
    "LORA_TARGETS",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "ParallelConfig",
    "TrainConfig",
    "canonical_targets",
    "config_from_dict",
    "load_config",
    "parse_override",
    "read_toml",
    "stage_layers",
    "validated",
]
