"""Hybrid heads (layers/parallel.py): the combined output is what each branch gives on the same
input (summed, or RMS-normalised and averaged), decode parity through the branches' composed
caches (float32, bf16), a model that alternates a hybrid-heads layer with another mixer, and
config errors. Packed documents: tests/test_packed_model.py (every registered mixer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.parallel import Parallel
from models.config_check import load_config
from models.lm import build_model
from tests.parity import assert_decode_parity, relative_error


def _model_cfg(dtype="float32", branches=("swa", "mamba2"), combine="sum"):
    return load_config(None, [
        "model.d_model=32", "model.n_heads=2", "model.max_len=64", "model.vocab_size=64",
        f"model.dtype={dtype}", "model.mixers=[parallel]", "model.mixer_args.swa.window=6",
        "model.mixer_args.kda.chunk_size=8", "model.mixer_args.mamba2.chunk_size=8",
        f"model.mixer_args.parallel.branches=[{', '.join(branches)}]",
        f"model.mixer_args.parallel.combine={combine}"]).model


def _x(dtype, t=20, seed=1):
    return jax.random.normal(jax.random.key(seed), (2, t, 32)).astype(dtype)


@pytest.mark.parametrize("combine", ["sum", "mean_norm"])
def test_output_combines_the_branches_on_the_same_input(combine):
    cfg = _model_cfg(combine=combine)
    layer = Parallel(cfg, cfg.args_for("parallel"), rngs=nnx.Rngs(0))
    x = _x(jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    y = layer(x, positions=pos)[0]
    outs = [np.asarray(m(x, positions=pos)[0]) for m in layer.branches]
    if combine == "sum":
        want = outs[0] + outs[1]
    else:      # each normalised to unit RMS (times its scale, 1 at init), then the mean
        rms = lambda o: o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + cfg.norm_eps)
        want = (rms(outs[0]) + rms(outs[1])) / 2
    assert relative_error(np.asarray(y), want) < 1e-5


@pytest.mark.parametrize("branches,dtype", [
    (("swa", "mamba2"), jnp.float32), (("swa", "mamba2"), jnp.bfloat16),
    (("attn", "kda"), jnp.float32)], ids=["swa-mamba2-f32", "swa-mamba2-bf16", "attn-kda-f32"])
def test_decode_parity(branches, dtype):
    cfg = _model_cfg(jnp.dtype(dtype).name, branches)
    layer = Parallel(cfg, cfg.args_for("parallel"), rngs=nnx.Rngs(0))
    for prefill, chunk in [(3, 7), (11, 7)]:
        assert_decode_parity(layer, _x(dtype), prefill=prefill, chunk=chunk, max_len=32,
                             dtype=dtype)


def test_a_model_alternates_hybrid_heads_with_another_mixer():
    cfg = load_config("configs/hybrid_heads.yaml", ["model.n_layers=2"])
    model = build_model(cfg.model)
    kinds = [type(block.mixer).__name__ for block in model.blocks]
    assert kinds == ["Parallel", "DeltaNet"]
    logits = model(jnp.zeros((1, 8), jnp.int32))[0]
    assert logits.shape == (1, 8, cfg.model.vocab_size)


@pytest.mark.parametrize("override,match", [
    ("model.mixer_args.parallel.branches=[swa]", "at least two mixers"),
    ("model.mixer_args.parallel.branches=[swa, bogus]", r"branches\[1\]: unknown mixer"),
    ("model.mixer_args.parallel.branches=[parallel, swa]", "cannot be a branch of itself"),
    ("model.mixer_args.parallel.branches=[swa, mom]", "auxiliary training loss"),
    ("model.mixer_args.parallel.branches=[swa, swa]", "appears twice"),
    ("model.mixer_args.parallel.combine=max", "expected one of 'sum', 'mean_norm'"),
    ("model.mixer_args.mamba2.n_groups=3", "n_groups=3 must divide the heads"),   # a branch's
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.mixers=[parallel]", "model.d_model=32", override])
