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

# Mixers whose memory runs by a head split under a sharded sequence (context_parallel/
# ulysses.py): zigzag needs mesh.sequence to divide their heads.
HEAD_SPLIT_MIXERS = ("titans", "titans_mag")


def zigzag_blockers(model, sequence: int) -> list[str]:
    """Why the zigzag layout cannot take this model on `sequence` shards (empty: it can)."""
    out = []
    others = sorted(set(model.mixers) - set(ZIGZAG_MIXERS))
    if others:
        out.append(f"mixer(s) {', '.join(others)} have no sequence exchange that reads the "
                   f"layout; zigzag takes {', '.join(ZIGZAG_MIXERS)}")
    if sequence > 1:
        for name in sorted(set(model.mixers) & set(HEAD_SPLIT_MIXERS)):
            heads = model.mixer_args[name].n_heads or model.n_heads
            if heads % sequence:
                out.append(f"the memory of {name} runs by a head split, and mesh.sequence="
                           f"{sequence} does not divide its {heads} heads "
                           f"(model.mixer_args.{name}.n_heads or model.n_heads)")
    return out


def check_mixers(cfg: Config) -> Config:
    """cfg with model.mixer_args resolved into checked Args objects (ConfigError otherwise)."""
    model = dataclasses.replace(cfg.model, mixer_args=resolve_mixer_args(cfg.model))
    if cfg.mesh.sequence_layout == "zigzag":
        blockers = zigzag_blockers(model, cfg.mesh.sequence)
        if blockers:
            raise ConfigError(f"mesh.sequence_layout=zigzag: {'; '.join(blockers)} (use "
                              "contiguous or auto)")
    return dataclasses.replace(cfg, model=model)


def sequence_layout(cfg: Config) -> str:
    """The layout a run's rows take over the sequence shards: mesh.sequence_layout, with auto
    resolved (zigzag when the model has full causal attention and the layout can take every
    mixer: causal attention's work is then the same on every shard)."""
    if cfg.mesh.sequence_layout != "auto":
        return cfg.mesh.sequence_layout
    zigzag = "attn" in cfg.model.mixers and not zigzag_blockers(cfg.model, cfg.mesh.sequence)
    return "zigzag" if zigzag else "contiguous"


def config_from_dict(raw: dict) -> Config:
    """A raw config tree (a saved config.yaml, a checkpoint's copy) -> a checked Config."""
    return check_mixers(parse_config(raw))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """base.yaml <- `path` <- dotted `overrides`, fully checked. Raises ConfigError."""
    return config_from_dict(read_config_tree(path, overrides))
