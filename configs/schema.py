"""Typed, frozen run configuration: its sections, YAML reading, dotted command-line overrides.

`read_config_tree("configs/X.yaml", ["model.d_model=128"])` merges base.yaml <- X.yaml <-
overrides into a raw tree; `build_dataclass(Config, tree, "")` checks every key and type and
returns a frozen `Config`. The cross-field checks are in configs/checks.py; the mixer settings
(`model.mixers`, `model.mixer_args`) are checked against the mixer registry by
models/config_check.py, whose `load_config` runs all of it. Every problem raises `ConfigError`
with one line that names the key, what was given and what is allowed.

This package imports nothing of layers/, models/ or jax: reading a config is cheap, and the
model code may depend on it without a cycle.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent
BASE_CONFIG = CONFIG_DIR / "base.yaml"


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    # None: as many key/value heads as query heads (MHA); 1 is MQA; in between is GQA.
    n_kv_heads: int | None = None
    # None: d_model // n_heads.
    head_dim: int | None = None
    # Mixer names repeat cyclically over the layers: [swa, swa, attn] with 6 layers is 2 x that.
    mixers: tuple[str, ...] = ("attn",)
    # Per-mixer settings, keyed by mixer name; validated against the mixer's own Args class.
    mixer_args: dict = dataclasses.field(default_factory=dict)
    # None: the SwiGLU hidden width is 8/3 d_model rounded up to a multiple of 64. 0: no MLP
    # sublayer, each block is norm -> mixer -> residual only (the Mamba / Mamba-2 papers' stack).
    d_ff: int | None = None
    max_len: int = 2048
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Compute dtype; parameters are always float32 (optimizer updates need the precision).
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # Matmul operands of the chunked ops: pallas_kernels/precision.Precision (the same names;
    # tests/test_precision.py checks they agree, without configs importing jax).
    precision: Literal["auto", "highest", "bf16"] = "auto"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return -(-(8 * self.d_model // 3) // 64) * 64

    def layer_mixers(self) -> tuple[str, ...]:
        """The mixer name of every layer (the `mixers` pattern repeated cyclically)."""
        return tuple(self.mixers[i % len(self.mixers)] for i in range(self.n_layers))

    def args_for(self, name: str):
        """The validated Args object of mixer `name`."""
        return self.mixer_args[name]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    kind: Literal["mqar", "needle", "bytes", "tokens"] = "mqar"
    seq_len: int = 64
    batch_size: int = 64
    seed: int = 0
    # bytes: a UTF-8 text file or a directory of them; tokens: a flat binary file of token ids.
    path: str | None = None
    # Optional separate held-out file/directory; without it the last eval_fraction is held out.
    eval_path: str | None = None
    eval_fraction: float = 0.05
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    # The text <-> ids mapping of the run (data/tokenizer.py): a tokenizer.json, a SentencePiece
    # .model, a directory holding one, or "bytes"; used by generate.py --prompt, lm-eval and
    # bits-per-byte evals. None: token ids only (synthetic tasks, pre-tokenized files).
    tokenizer: str | None = None
    # bytes / tokens: mark the documents inside each window (segment_ids, in-document
    # positions) so no layer carries a document's state into the next (data/stream.py).
    packing: bool = False
    # tokens with packing: the id that separates documents (it opens the next one); None:
    # only file boundaries separate documents.
    eos_id: int | None = None
    # MQAR (Zoology / Based): key-value pairs at the start, queries after; keys come from the
    # first half of the vocabulary and values from the second half.
    num_kv_pairs: int = 8
    # Exponent of the power law that places queries (Zoology's alpha); smaller puts queries
    # closer to the pairs, 1.0 spreads them evenly.
    mqar_power_a: float = 0.01
    # Needle in a haystack (data/needle.py): one needle of key tokens then value tokens in
    # filler, queried at the end; filler, keys and values come from disjoint vocabulary ranges.
    needle_key_len: int = 1
    needle_value_len: int = 1
    needle_filler: Literal["random", "constant"] = "random"
    needle_distractors: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250
    eval_batches: int = 8
    # Checkpoint every N steps (and at the end, and on SIGTERM); keep the newest `keep`.
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    progress_bar: bool = True
    # Activation checkpointing per block (models/lm.py): none keeps every activation for the
    # backward pass; full keeps only each block's input and recomputes the rest; dots keeps
    # the matmul outputs and recomputes the cheap elementwise work around them; dots_no_batch
    # keeps only the projections' outputs; offload keeps those in host memory (models/lm.py:
    # REMAT_POLICIES).
    remat: Literal["none", "full", "dots", "dots_no_batch", "offload"] = "none"
    # Gradients summed over this many micro-batches of data.batch_size / grad_accum_steps rows
    # before one optimizer step (the same update as one batch of data.batch_size rows).
    grad_accum_steps: int = 1
    # Stop (with a checkpoint) after the first eval whose accuracy reaches this; null: never.
    # The recall protocol's "early stop at 0.99" (Zoology; benchmarks/recall.py).
    early_stop_acc: float | None = None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Device mesh axes (training/sharding.py); their product is the device count, and one of
    # them may be -1 ("the rest"). data: pure data parallelism (params replicated); fsdp: data
    # parallel with params and optimizer state sharded (ZeRO-3 / FSDP); sequence: the time axis
    # of activations sharded (context parallelism, pallas_kernels/context_parallel); tensor:
    # heads and MLP width sharded (Megatron-style).
    data: int = -1
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    # How a row is laid out over the sequence shards: contiguous slices, or zigzag (shard r
    # holds pieces r and 2N - 1 - r of 2N: causal attention's work balanced); auto: zigzag when
    # the model has full causal attention and every mixer reads the layout, else contiguous
    # (pallas_kernels/context_parallel).
    sequence_layout: Literal["auto", "contiguous", "zigzag"] = "auto"
    # Softmax attention over the sequence shards: all_gather (keys / values gathered) or ring
    # (passed shard to shard with an online softmax).
    sequence_attention: Literal["all_gather", "ring"] = "all_gather"

    def sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.sequence, self.tensor)


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "mnemax"
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return to_plain(self)


# ----------------------------------------------------------------------------- loading


def to_plain(obj: Any) -> Any:
    """Dataclasses/tuples/dicts -> plain YAML-serializable values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["model.d_model=128", "run_dir=runs/a"]` -> nested dict; values parsed as YAML."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key '{key}' is malformed")
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return tree


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; returns the value in its typed form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key}: expected a non-empty list, got {value!r}")
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the float it means.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls: type, data: dict, prefix: str) -> Any:
    """Recursively build frozen dataclass `cls` from `data`, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint} (allowed: {allowed})")
    kwargs = {}
    for name in fields:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(data[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def read_config_tree(path: str | Path | None = None,
                     overrides: list[str] | None = None) -> dict:
    """base.yaml <- `path` <- dotted `overrides`, merged into one raw tree (nothing checked
    beyond YAML syntax and the override form). Raises ConfigError."""
    raw = _read_yaml(BASE_CONFIG)
    if path is not None:
        raw = _merge(raw, _read_yaml(Path(path)))
    return _merge(raw, parse_overrides(list(overrides or [])))


def save_config(cfg: Config, path) -> None:
    """Writes cfg as YAML; path: a str, a pathlib.Path or an etils.epath.Path (a bucket)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (Path(path) if isinstance(path, str) else path).write_text(text)
