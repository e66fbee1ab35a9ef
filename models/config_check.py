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

from configs import Config, ConfigError, parse_config, read_config_tree
from layers.registry import resolve_mixer_args
from pallas_kernels.context_parallel import ZIGZAG_MIXERS


def check_mixers(cfg: Config) -> Config:
    """cfg with model.mixer_args resolved into checked Args objects (ConfigError otherwise)."""
    model = dataclasses.replace(cfg.model, mixer_args=resolve_mixer_args(cfg.model))
    if cfg.mesh.sequence_layout == "zigzag":
        others = sorted(set(cfg.model.mixers) - set(ZIGZAG_MIXERS))
        if others:
            raise ConfigError(f"mesh.sequence_layout=zigzag: mixer(s) {', '.join(others)} have "
                              "no sequence exchange that reads the layout; zigzag takes "
                              f"{', '.join(ZIGZAG_MIXERS)} (use contiguous or auto)")
    return dataclasses.replace(cfg, model=model)


def sequence_layout(cfg: Config) -> str:
    """The layout a run's rows take over the sequence shards: mesh.sequence_layout, with auto
    resolved (zigzag when the model has full causal attention and every mixer reads the
    layout: causal attention's work is then the same on every shard)."""
    if cfg.mesh.sequence_layout != "auto":
        return cfg.mesh.sequence_layout
    mixers = set(cfg.model.mixers)
    return "zigzag" if "attn" in mixers and mixers <= set(ZIGZAG_MIXERS) else "contiguous"


def config_from_dict(raw: dict) -> Config:
    """A raw config tree (a saved config.yaml, a checkpoint's copy) -> a checked Config."""
    return check_mixers(parse_config(raw))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """base.yaml <- `path` <- dotted `overrides`, fully checked. Raises ConfigError."""
    return config_from_dict(read_config_tree(path, overrides))
