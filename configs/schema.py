"""Typed, frozen run configuration, loaded from YAML with dotted command-line overrides.

`load_config("configs/X.yaml", ["model.d_model=128"])` merges base.yaml <- X.yaml <- overrides,
checks every key and type, runs the cross-field checks (heads dividing the width, windows within
max_len, ...) and returns a frozen `Config`. Every problem raises `ConfigError` with one line
that names the key, what was given and what is allowed; the CLIs print that line and exit 2,
before anything is compiled.
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
    # None: the SwiGLU hidden width is 8/3 d_model rounded up to a multiple of 64.
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
    # keeps only the projections' outputs (models/lm.py: REMAT_POLICIES).
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
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
    # parallel with params and optimizer state sharded (ZeRO-3 / FSDP); tensor: heads and MLP
    # width sharded (Megatron-style).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def sizes(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


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


def _positive(key: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> Config:
    """Cross-field checks; returns cfg with model.mixer_args resolved into typed Args objects."""
    from layers.registry import MIXERS, resolve_mixer_args  # late import: layers need jax

    m = cfg.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len", "n_kv_heads",
                "head_dim", "d_ff"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.init_std", m.init_std)
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model} "
            "(pick n_heads dividing d_model, or set model.head_dim)")
    if m.n_heads % m.resolved_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={m.resolved_kv_heads} must divide model.n_heads={m.n_heads}")
    for i, name in enumerate(m.mixers):
        if name not in MIXERS:
            close = difflib.get_close_matches(name, list(MIXERS), n=1, cutoff=0.4)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.mixers[{i}]: unknown mixer '{name}'{hint} "
                              f"(available: {', '.join(sorted(MIXERS))})")
    mixer_args = resolve_mixer_args(m)
    m = dataclasses.replace(m, mixer_args=mixer_args)

    d = cfg.data
    for key in ("seq_len", "batch_size", "num_kv_pairs"):
        _positive(f"data.{key}", getattr(d, key))
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    if d.seq_len > m.max_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}")
    if d.kind == "mqar":
        if 4 * d.num_kv_pairs > d.seq_len:
            raise ConfigError(
                f"data.num_kv_pairs={d.num_kv_pairs} needs data.seq_len >= "
                f"{4 * d.num_kv_pairs} (pairs take 2 tokens each and need as many query slots)")
        if m.vocab_size < 2 * d.num_kv_pairs + 2:
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} is too small for MQAR with "
                f"{d.num_kv_pairs} pairs (need >= {2 * d.num_kv_pairs + 2})")
    elif d.kind == "needle":
        _positive("data.needle_key_len", d.needle_key_len)
        _positive("data.needle_value_len", d.needle_value_len)
        _positive("data.needle_distractors", d.needle_distractors, allow_zero=True)
        need = (d.needle_distractors + 2) * (d.needle_key_len + d.needle_value_len) - 1
        if d.seq_len < need:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is too short for the needle task with "
                f"data.needle_key_len={d.needle_key_len}, data.needle_value_len="
                f"{d.needle_value_len} and data.needle_distractors={d.needle_distractors} "
                f"(need >= {need}: needles, query and answer)")
        if m.vocab_size < 4:
            raise ConfigError(f"model.vocab_size={m.vocab_size} is too small for the needle "
                              "task (need >= 4: filler, key and value ranges)")
    else:
        if d.path is None:
            raise ConfigError(f"data.path is required for data.kind={d.kind!r}")
        if d.kind == "bytes" and m.vocab_size < 256:
            raise ConfigError(f"data.kind='bytes' needs model.vocab_size >= 256, "
                              f"got {m.vocab_size}")
    if d.packing:
        from models.lm import packing_mixers  # late import, as above

        if d.kind not in ("bytes", "tokens"):
            raise ConfigError(f"data.packing needs data.kind 'bytes' or 'tokens' (documents "
                              f"in files); got {d.kind!r}")
        can = packing_mixers()
        bad = sorted({name for name in m.mixers if name not in can})
        if bad:
            raise ConfigError(f"data.packing: mixer(s) {', '.join(bad)} do not keep packed "
                              f"documents apart yet; mixers that do: {', '.join(can)}")
    if d.eos_id is not None:
        if d.kind != "tokens" or not d.packing:
            raise ConfigError("data.eos_id separates documents of data.kind='tokens' with "
                              "data.packing=true; leave it null otherwise")
        if not 0 <= d.eos_id < m.vocab_size:
            raise ConfigError(f"data.eos_id={d.eos_id} must be in [0, model.vocab_size="
                              f"{m.vocab_size})")

    t = cfg.train
    for key in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every",
                "keep_checkpoints", "grad_accum_steps"):
        _positive(f"train.{key}", getattr(t, key))
    if d.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                          f"data.batch_size={d.batch_size} (each micro-batch takes "
                          "batch_size / grad_accum_steps rows)")
    if t.early_stop_acc is not None and not 0 < t.early_stop_acc <= 1:
        raise ConfigError(f"train.early_stop_acc must be in (0, 1] or null, got "
                          f"{t.early_stop_acc}")
    o = cfg.optim
    _positive("optim.lr", o.lr)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if not cfg.run_dir:
        raise ConfigError("run_dir must be a non-empty path")
    sizes = cfg.mesh.sizes()
    if any(n == 0 or n < -1 for n in sizes):
        raise ConfigError(f"mesh sizes must be >= 1 or -1 (the rest), got data={sizes[0]}, "
                          f"fsdp={sizes[1]}, tensor={sizes[2]}")
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis can be -1 (the rest), got data={sizes[0]}, "
                          f"fsdp={sizes[1]}, tensor={sizes[2]}")
    return dataclasses.replace(cfg, model=m)


def config_from_dict(raw: dict) -> Config:
    return validate(build_dataclass(Config, raw, ""))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """base.yaml <- `path` <- dotted `overrides`, validated. Raises ConfigError."""
    raw = _read_yaml(BASE_CONFIG)
    if path is not None:
        raw = _merge(raw, _read_yaml(Path(path)))
    raw = _merge(raw, parse_overrides(list(overrides or [])))
    return config_from_dict(raw)


def save_config(cfg: Config, path) -> None:
    """Writes cfg as YAML; path: a str, a pathlib.Path or an etils.epath.Path (a bucket)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (Path(path) if isinstance(path, str) else path).write_text(text)
