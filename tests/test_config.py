"""Configs: base.yaml holds every default, overrides, one-line errors, frozen objects."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs import Config, ConfigError, parse_config, read_config_tree, save_config
from configs.schema import BASE_CONFIG, to_plain
from layers.registry import MIXERS
from models.config_check import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _fields(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def test_base_yaml_holds_every_default():
    raw = yaml.safe_load(BASE_CONFIG.read_text())
    defaults = to_plain(Config())
    for section, values in defaults.items():
        if not isinstance(values, dict):
            assert raw[section] == values or section == "run_dir"
            continue
        assert set(raw[section]) == set(values), section
        for key, value in values.items():
            if key == "mixer_args":
                continue
            got = raw[section][key]
            assert got == (list(value) if isinstance(value, tuple) else value), (section, key)
    # Every registered mixer has its settings in base.yaml, equal to the registry's defaults.
    assert set(raw["model"]["mixer_args"]) == set(MIXERS)
    for name, spec in MIXERS.items():
        assert raw["model"]["mixer_args"][name] == to_plain(spec.defaults), name


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.n_layers >= 1
    assert set(cfg.model.layer_mixers()) <= set(MIXERS)


def test_dotted_overrides_and_types():
    cfg = load_config("configs/quickstart.yaml", [
        "model.d_model=128", "train.steps=200", "run_dir=runs/a", "model.mixers=[swa, attn]",
        "model.mixer_args.swa.window=32", "optim.lr=1e-3", "model.n_layers=5"])
    assert cfg.model.d_model == 128 and cfg.train.steps == 200 and cfg.run_dir == "runs/a"
    assert cfg.model.layer_mixers() == ("swa", "attn", "swa", "attn", "swa")
    assert cfg.model.args_for("swa").window == 32 and cfg.model.args_for("attn").window is None
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-3


def test_configs_are_frozen():
    cfg = load_config("configs/quickstart.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.args_for("attn").window = 3


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["model.mixers=[swa]",
                                                  "model.mixer_args.swa.n_sinks=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override,pattern", [
    ("model.d_modle=64", r"unknown config key 'model.d_modle'; did you mean 'model.d_model'"),
    ("trian.steps=3", r"unknown config key 'trian'; did you mean 'train'"),
    ("model.mixer_args.swa.windw=3", r"did you mean 'model.mixer_args.swa.window'"),
    ("model.d_model=abc", r"model.d_model: expected int, got 'abc'"),
    ("model.tie_embeddings=3", r"model.tie_embeddings: expected bool"),
    ("model.dtype=float16", r"model.dtype: expected one of 'float32', 'bfloat16'"),
    ("model.n_heads=3", r"model.n_heads=3 does not divide model.d_model=64"),
    ("model.n_kv_heads=3", r"n_kv_heads=3 must divide model.n_heads=4"),
    ("model.mixers=[swa]", None),
    ("model.mixers=[atn]", r"unknown mixer 'atn'; did you mean 'attn'"),
    ("model.mixers=[swa] model.mixer_args.swa.window=4096",
     r"window=4096 is larger than model.max_len=256"),
    ("model.mixers=[attn] model.mixer_args.attn.n_sinks=2", r"n_sinks=2 needs a window"),
    ("data.seq_len=512", r"data.seq_len=512 exceeds model.max_len=256"),
    ("data.kind=bytes", r"data.path is required"),
    ("train.steps=0", r"train.steps must be > 0"),
    ("model.d_ff=-1", r"model.d_ff must be >= 0, got -1"),
    ("model.d_ff=0", None),
    ("model.mixer_args.nope.window=3", r"unknown config key 'model.mixer_args.nope'"),
])
def test_bad_input_is_one_clear_line(override, pattern):
    overrides = override.split()
    if pattern is None:
        load_config("configs/quickstart.yaml", overrides)
        return
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config("configs/quickstart.yaml", overrides)
    assert "\n" not in str(e.value)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'configs/nope.yaml' does not exist"):
        load_config("configs/nope.yaml")


def test_configs_imports_no_model_code():
    """Reading a config needs no layers, models, kernels or jax: the model side imports configs/,
    never the other way round (no import cycle, and a config check starts in a blink)."""
    code = ("import sys, configs, configs.checks, configs.schema; "
            "print(' '.join(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('layers', 'models', 'pallas_kernels', 'jax'))))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_config_checks_without_the_registry():
    """configs.parse_config runs the config-only checks; the mixer settings stay raw until the
    model side (models.config_check) resolves them."""
    raw = read_config_tree("configs/quickstart.yaml", ["model.mixer_args.swa.window=32"])
    cfg = parse_config(raw)
    assert cfg.model.mixer_args["swa"]["window"] == 32
    with pytest.raises(ConfigError, match="data.seq_len=512 exceeds model.max_len=256"):
        parse_config(read_config_tree("configs/quickstart.yaml", ["data.seq_len=512"]))
    assert config_from_dict(raw).model.args_for("swa").window == 32


@pytest.mark.slow
def test_train_cli_rejects_bad_input_before_touching_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    cases = [["model.d_modle=64"], ["model.n_heads=3"], ["data.kind=bytes",
                                                         "data.path=/no/such/file"]]
    for extra in cases:
        proc = subprocess.run(
            [sys.executable, "train.py", "configs/quickstart.yaml", f"run_dir={run_dir}", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr
        assert not run_dir.exists()


def test_warmup_longer_than_the_run_is_halved_and_peaks():
    # A smoke run of a real config (warmup 50, 30 steps) trains: warmup over 15 steps, peak lr
    # at step 15, then a decay below the peak by the last step.
    from training.optim import effective_warmup, learning_rate_schedule

    cfg = load_config(None, ["optim.warmup_steps=50", "train.steps=30", "optim.lr=0.01"])
    assert effective_warmup(cfg.optim, 30) == 15
    sched = learning_rate_schedule(cfg.optim, 30)
    lrs = [float(sched(i)) for i in range(31)]
    assert max(lrs) == pytest.approx(0.01) and lrs.index(max(lrs)) == 15
    assert lrs[0] == 0.0 and lrs[29] < 0.01
    # An ordinary warmup is kept as given.
    assert effective_warmup(load_config(None, ["optim.warmup_steps=10"]).optim, 1000) == 10
