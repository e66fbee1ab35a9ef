"""Run configuration: YAML files in this folder, read into typed frozen objects and checked.

This package needs only the config itself (no layers/, models/ or jax). A run loads its config
with models.config_check.load_config, which adds the checks against the mixer registry.
"""

from configs.checks import check_config, parse_config
from configs.schema import (
    BASE_CONFIG,
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    WandbConfig,
    build_dataclass,
    read_config_tree,
    save_config,
    to_plain,
)

__all__ = [
    "BASE_CONFIG", "Config", "ConfigError", "DataConfig", "MeshConfig", "ModelConfig",
    "OptimConfig", "TrainConfig", "WandbConfig", "build_dataclass", "check_config",
    "parse_config", "read_config_tree", "save_config", "to_plain",
]
