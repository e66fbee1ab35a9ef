"""Run configuration: YAML files in this folder, loaded into typed frozen objects."""

from configs.schema import (
    BASE_CONFIG,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    WandbConfig,
    config_from_dict,
    load_config,
    save_config,
)

__all__ = [
    "BASE_CONFIG", "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig",
    "TrainConfig", "WandbConfig", "config_from_dict", "load_config", "save_config",
]
