"""Loading a run's config: configs/ reads and checks it, the mixer registry checks its mixers.

`load_config("configs/X.yaml", ["model.d_model=128"])` merges base.yaml <- X.yaml <- overrides,
checks every key and type and the cross-field rules (configs/checks.py), then the mixer names
and each used mixer's settings (layers/registry.py), and returns a frozen `Config` whose
`model.mixer_args` holds typed Args objects. Every problem raises `ConfigError` with one line
that names the key, what was given and what is allowed; the CLIs print that line and exit 2,
before anything is compiled.

Here, not in configs/, because the mixer checks need the layers (and so jax); configs/ stays
importable without them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from configs import Config, parse_config, read_config_tree
from layers.registry import resolve_mixer_args


def check_mixers(cfg: Config) -> Config:
    """cfg with model.mixer_args resolved into checked Args objects (ConfigError otherwise)."""
    model = dataclasses.replace(cfg.model, mixer_args=resolve_mixer_args(cfg.model))
    return dataclasses.replace(cfg, model=model)


def config_from_dict(raw: dict) -> Config:
    """A raw config tree (a saved config.yaml, a checkpoint's copy) -> a checked Config."""
    return check_mixers(parse_config(raw))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """base.yaml <- `path` <- dotted `overrides`, fully checked. Raises ConfigError."""
    return config_from_dict(read_config_tree(path, overrides))
