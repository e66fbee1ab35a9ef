"""Cross-field checks of a Config that need nothing but the config itself.

Shapes that must divide, lengths that must fit, data settings that only make sense together.
The mixer settings are checked against the mixer registry on the model side
(models/config_check.py), which runs these first. Each check raises ConfigError with one line
naming the keys, what was given and what is allowed.
"""

from __future__ import annotations

from configs.schema import (
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    build_dataclass,
)


def parse_config(raw: dict) -> Config:
    """A raw config tree -> a typed Config that passed every check here; model.mixer_args is
    still the raw mapping (models/config_check.py resolves it)."""
    cfg = build_dataclass(Config, raw, "")
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Every config-only check, model first (the others refer to its sizes)."""
    check_model_shape(cfg.model)
    check_data(cfg.data, cfg.model)
    check_train(cfg.train, cfg.data)
    check_optim(cfg.optim)
    if not cfg.run_dir:
        raise ConfigError("run_dir must be a non-empty path")
    check_mesh(cfg.mesh)


def _positive(key: str, value: int | float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_model_shape(m: ModelConfig) -> None:
    """Positive sizes; heads dividing the width, key/value heads dividing the heads."""
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len", "n_kv_heads",
                "head_dim"):
        _positive(f"model.{key}", getattr(m, key))
    _positive("model.d_ff", m.d_ff, allow_zero=True)       # 0: blocks without an MLP
    _positive("model.init_std", m.init_std)
    if m.head_dim is None and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not divide model.d_model={m.d_model} "
            "(pick n_heads dividing d_model, or set model.head_dim)")
    if m.n_heads % m.resolved_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={m.resolved_kv_heads} must divide model.n_heads={m.n_heads}")


def check_data(d: DataConfig, m: ModelConfig) -> None:
    """Sizes, the window within the model's max_len, then the data kind's own settings."""
    for key in ("seq_len", "batch_size", "num_kv_pairs"):
        _positive(f"data.{key}", getattr(d, key))
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {d.eval_fraction}")
    if d.seq_len > m.max_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_len={m.max_len}")
    if d.kind == "mqar":
        check_mqar(d, m)
    elif d.kind == "needle":
        check_needle(d, m)
    else:
        check_file_data(d, m)
    check_packing(d, m)


def check_mqar(d: DataConfig, m: ModelConfig) -> None:
    if 4 * d.num_kv_pairs > d.seq_len:
        raise ConfigError(
            f"data.num_kv_pairs={d.num_kv_pairs} needs data.seq_len >= "
            f"{4 * d.num_kv_pairs} (pairs take 2 tokens each and need as many query slots)")
    if m.vocab_size < 2 * d.num_kv_pairs + 2:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is too small for MQAR with "
            f"{d.num_kv_pairs} pairs (need >= {2 * d.num_kv_pairs + 2})")


def check_needle(d: DataConfig, m: ModelConfig) -> None:
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


def check_file_data(d: DataConfig, m: ModelConfig) -> None:
    """bytes / tokens: a path to read, and room in the vocabulary for every byte."""
    if d.path is None:
        raise ConfigError(f"data.path is required for data.kind={d.kind!r}")
    if d.kind == "bytes" and m.vocab_size < 256:
        raise ConfigError(f"data.kind='bytes' needs model.vocab_size >= 256, "
                          f"got {m.vocab_size}")


def check_packing(d: DataConfig, m: ModelConfig) -> None:
    """Packing needs documents (files); eos_id only separates packed token documents."""
    if d.packing and d.kind not in ("bytes", "tokens"):
        raise ConfigError(f"data.packing needs data.kind 'bytes' or 'tokens' (documents "
                          f"in files); got {d.kind!r}")
    if d.eos_id is not None:
        if d.kind != "tokens" or not d.packing:
            raise ConfigError("data.eos_id separates documents of data.kind='tokens' with "
                              "data.packing=true; leave it null otherwise")
        if not 0 <= d.eos_id < m.vocab_size:
            raise ConfigError(f"data.eos_id={d.eos_id} must be in [0, model.vocab_size="
                              f"{m.vocab_size})")


def check_train(t: TrainConfig, d: DataConfig) -> None:
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


def check_optim(o: OptimConfig) -> None:
    _positive("optim.lr", o.lr)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")


def check_mesh(mesh: MeshConfig) -> None:
    """Axis sizes >= 1, or -1 ("the rest") for at most one axis."""
    sizes = mesh.sizes()
    named = ", ".join(f"{a}={n}" for a, n in zip(("data", "fsdp", "sequence", "tensor"), sizes))
    if any(n == 0 or n < -1 for n in sizes):
        raise ConfigError(f"mesh sizes must be >= 1 or -1 (the rest), got {named}")
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis can be -1 (the rest), got {named}")
