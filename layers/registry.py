"""Mixer registry: the names used in `model.mixers` -> mixer classes and default settings.

Every registered class is a `Mixer` (the Protocol below; tests/test_registry.py checks each
one's signatures). A mixer may also be a `MixerWithAuxLoss`: a weighted term the LM adds to
the training loss (MoM's router balance). Register a new family by adding a line here and its
defaults under `model.mixer_args` in configs/base.yaml.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax

from configs.schema import ConfigError, ModelConfig, build_dataclass, to_plain
from layers.attention import Attention, AttentionArgs
from layers.based import Based, BasedArgs
from layers.cca import CCA, CCAArgs
from layers.delta_net import DeltaNet, DeltaNetArgs
from layers.gated_conv import GatedConv, GatedConvArgs
from layers.gla import GLA, GLAArgs
from layers.kda import KDA, KDAArgs
from layers.mamba2 import Mamba2, Mamba2Args
from layers.mla import MLA, MLAArgs
from layers.mom import MoM, MoMArgs
from layers.nsa import NSA, NSAArgs
from layers.parallel import Parallel, ParallelArgs
from layers.titans import TitansArgs, TitansMemory
from layers.titans_variants import TitansMAC, TitansMACArgs, TitansMAG, TitansMAGArgs


class Mixer(Protocol):
    """A token mixer: [B, T, D] -> [B, T, D], causal, with a decode cache.

    Args: a frozen dataclass of its settings (model.mixer_args.<name>).
    check_config: problems with (model config, args), one line each naming `name`'s keys;
    empty when fine. A staticmethod: it runs before anything is built.
    init_cache: an empty decode cache for batch_size sequences of up to max_len tokens.
    __call__: x [B, T, D] at `positions` [B, T] -> (y [B, T, D], the updated cache; None when
    called without one). segment_ids: None, or [B, T] ids of packed documents (0 = padding;
    cache-free calls only); every mixer keeps documents apart (no state crosses a start).
    """

    Args: ClassVar[type]

    @staticmethod
    def check_config(model_cfg: ModelConfig, args: Any, name: str) -> list[str]: ...

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = ...) -> Any: ...

    def __call__(self, x: jax.Array, *, positions: jax.Array, cache: Any = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Any]: ...


@runtime_checkable
class MixerWithAuxLoss(Mixer, Protocol):
    """A mixer with an auxiliary training loss: aux_loss(x, segment_ids) -> float32 scalar,
    already weighted by its config (x: the mixer's input; padding of packed rows left out)."""

    def aux_loss(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    cls: type[Mixer]
    defaults: object   # an Args instance: what a name means before any config touches it


MIXERS: dict[str, MixerSpec] = {
    "attn": MixerSpec(Attention, AttentionArgs()),
    "swa": MixerSpec(Attention, AttentionArgs(window=64)),
    # -- based / conv / gla (layers/based.py, layers/gated_conv.py, layers/gla.py) --
    "based": MixerSpec(Based, BasedArgs()),
    "conv": MixerSpec(GatedConv, GatedConvArgs()),
    "gla": MixerSpec(GLA, GLAArgs()),
    # -- deltanet / gated_deltanet (layers/delta_net.py) --
    "deltanet": MixerSpec(DeltaNet, DeltaNetArgs(gated=False)),
    "gated_deltanet": MixerSpec(DeltaNet, DeltaNetArgs(gated=True)),
    # -- kda (layers/kda.py) --
    "kda": MixerSpec(KDA, KDAArgs()),
    # -- mamba2 (layers/mamba2.py) --
    "mamba2": MixerSpec(Mamba2, Mamba2Args()),
    # -- parallel: hybrid heads, several mixers side by side in one layer (layers/parallel.py)
    "parallel": MixerSpec(Parallel, ParallelArgs()),
    # -- cca / ccgqa (layers/cca.py) --
    "cca": MixerSpec(CCA, CCAArgs()),
    "ccgqa": MixerSpec(CCA, CCAArgs(n_kv_heads=2)),
    # -- mla (layers/mla.py) --
    "mla": MixerSpec(MLA, MLAArgs()),
    # -- nsa: native sparse attention (layers/nsa.py) --
    "nsa": MixerSpec(NSA, NSAArgs()),
    # -- mom (layers/mom.py) --
    "mom": MixerSpec(MoM, MoMArgs()),
    # -- titans (layers/titans.py) --
    "titans": MixerSpec(TitansMemory, TitansArgs()),
    # -- titans_mac / titans_mag (layers/titans_variants.py) --
    "titans_mac": MixerSpec(TitansMAC, TitansMACArgs()),
    "titans_mag": MixerSpec(TitansMAG, TitansMAGArgs()),
}


def resolve_mixer_args(model_cfg: ModelConfig) -> dict:
    """model.mixers and model.mixer_args (raw dicts) -> {name: Args} for every registered
    mixer, checked.

    Raises ConfigError for an unknown mixer name, an unknown setting, a wrong type, or a
    setting the mixer rejects (check_config).
    """
    _check_mixer_names(model_cfg.mixers)
    raw = model_cfg.mixer_args or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"model.mixer_args: expected a mapping, got {raw!r}")
    out = {name: _build_args(name, spec, raw.get(name)) for name, spec in MIXERS.items()}
    for name in raw:
        if name not in MIXERS:
            close = difflib.get_close_matches(str(name), list(MIXERS), n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key 'model.mixer_args.{name}'{hint} "
                              f"(mixers: {', '.join(sorted(MIXERS))})")
    for name in set(model_cfg.mixers):
        errs = MIXERS[name].cls.check_config(model_cfg, out[name], name)
        if errs:
            raise ConfigError(errs[0])
    return out


def _check_mixer_names(mixers) -> None:
    for i, name in enumerate(mixers):
        if name not in MIXERS:
            close = difflib.get_close_matches(name, list(MIXERS), n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.mixers[{i}]: unknown mixer '{name}'{hint} "
                              f"(available: {', '.join(sorted(MIXERS))})")


def _build_args(name: str, spec: MixerSpec, given):
    """The registry's defaults for `name` overridden by `given` (a raw mapping, an Args
    object, or None), as a checked Args object."""
    if given is None:
        given = {}
    if dataclasses.is_dataclass(given):
        given = to_plain(given)
    merged = {**to_plain(spec.defaults), **given}
    return build_dataclass(type(spec.defaults), merged, f"model.mixer_args.{name}.")


def branch_args(model_cfg: ModelConfig, name: str):
    """`name`'s checked Args from model_cfg.mixer_args (raw mappings or built Args): for a
    mixer used inside another (layers/parallel.py's branches)."""
    raw = model_cfg.mixer_args or {}
    return _build_args(name, MIXERS[name], raw.get(name) if isinstance(raw, dict) else None)


def build_mixer(model_cfg: ModelConfig, name: str, *, rngs) -> Mixer:
    spec = MIXERS[name]
    return spec.cls(model_cfg, model_cfg.args_for(name), rngs=rngs)
