"""Mixer registry: the names used in `model.mixers` -> mixer classes and default settings.

A mixer class provides `Args` (a frozen dataclass of its settings), `check_config(model_cfg,
args, name) -> list[str]`, `init_cache(batch_size, max_len, dtype)` and
`__call__(x, *, positions, cache) -> (y, cache)`; a mixer that takes packed documents also
accepts `segment_ids=` there (models/lm.packing_mixers lists them). Register a new family by
adding a line here and its defaults under `model.mixer_args` in configs/base.yaml. A mixer may
also define `aux_loss(x, segment_ids=None) -> float32 scalar` (x: its input; padding of packed
rows left out): a weighted term the LM adds to the training loss (MoM's router balance).
"""

from __future__ import annotations

import dataclasses

from layers.attention import Attention, AttentionArgs
from layers.based import Based, BasedArgs
from layers.cca import CCA, CCAArgs
from layers.delta_net import DeltaNet, DeltaNetArgs
from layers.gated_conv import GatedConv, GatedConvArgs
from layers.gla import GLA, GLAArgs
from layers.mla import MLA, MLAArgs
from layers.mom import MoM, MoMArgs
from layers.titans import TitansArgs, TitansMemory
from layers.titans_variants import TitansMAC, TitansMACArgs, TitansMAG, TitansMAGArgs


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    cls: type
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
    # -- cca / ccgqa (layers/cca.py) --
    "cca": MixerSpec(CCA, CCAArgs()),
    "ccgqa": MixerSpec(CCA, CCAArgs(n_kv_heads=2)),
    # -- mla (layers/mla.py) --
    "mla": MixerSpec(MLA, MLAArgs()),
    # -- mom (layers/mom.py) --
    "mom": MixerSpec(MoM, MoMArgs()),
    # -- titans (layers/titans.py) --
    "titans": MixerSpec(TitansMemory, TitansArgs()),
    # -- titans_mac / titans_mag (layers/titans_variants.py) --
    "titans_mac": MixerSpec(TitansMAC, TitansMACArgs()),
    "titans_mag": MixerSpec(TitansMAG, TitansMAGArgs()),
}


def resolve_mixer_args(model_cfg) -> dict:
    """model.mixer_args (raw dicts) -> {name: Args} for every registered or configured mixer.

    Raises ConfigError for an unknown mixer name, an unknown setting, a wrong type, or a
    setting the mixer rejects (check_config).
    """
    from configs.schema import ConfigError, build_dataclass, to_plain

    raw = model_cfg.mixer_args or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"model.mixer_args: expected a mapping, got {raw!r}")
    out = {}
    for name, spec in MIXERS.items():
        given = raw.get(name, {})
        if given is None:
            given = {}
        if dataclasses.is_dataclass(given):
            given = to_plain(given)
        merged = {**to_plain(spec.defaults), **given}
        out[name] = build_dataclass(type(spec.defaults), merged, f"model.mixer_args.{name}.")
    for name in raw:
        if name not in MIXERS:
            import difflib
            close = difflib.get_close_matches(str(name), list(MIXERS), n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key 'model.mixer_args.{name}'{hint} "
                              f"(mixers: {', '.join(sorted(MIXERS))})")
    for name in set(model_cfg.mixers):
        errs = MIXERS[name].cls.check_config(model_cfg, out[name], name)
        if errs:
            raise ConfigError(errs[0])
    return out


def build_mixer(model_cfg, name: str, *, rngs):
    spec = MIXERS[name]
    return spec.cls(model_cfg, model_cfg.args_for(name), rngs=rngs)
