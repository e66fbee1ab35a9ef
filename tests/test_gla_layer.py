"""The GLA layer: decode parity (float32, bf16), the xla backend against the reference (values
and gradients), the gate's range, a constant-size cache, and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import ConfigError
from layers.gla import GLA, GLAArgs
from models.config_check import load_config
from tests.parity import assert_backends_agree, assert_decode_parity

# d_model 32, 2 heads: K = 8, V = 16 per head; chunk_size 8 < T = 20 crosses chunk boundaries.
SMALL = GLAArgs(chunk_size=8)


def _model_cfg(dtype="float32"):
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.max_len=64",
                             "model.vocab_size=64", f"model.dtype={dtype}"])
    return cfg.model


def _x(dtype, t=20, seed=1):
    return jax.random.normal(jax.random.key(seed), (2, t, 32)).astype(dtype)


OTHER_WIDTHS = GLAArgs(n_heads=4, expand_k=1.0, expand_v=0.5, gate_low_rank=4, chunk_size=8)


# The second setting only changes widths, so float32 is enough for it (keeps the file fast).
@pytest.mark.parametrize("args,dtype", [(SMALL, jnp.float32), (SMALL, jnp.bfloat16),
                                        (OTHER_WIDTHS, jnp.float32)],
                         ids=["default-f32", "default-bf16", "h4_k1_v05-f32"])
def test_decode_parity(args, dtype):
    mixer = GLA(_model_cfg(jnp.dtype(dtype).name), args, rngs=nnx.Rngs(0))
    # A larger gate bias spread makes the decays differ a lot across channels.
    mixer.gk_up.bias[...] = jax.random.normal(jax.random.key(3), mixer.gk_up.bias.shape) * 3
    for prefill, chunk in [(3, 7), (11, 7)]:
        assert_decode_parity(mixer, _x(dtype), prefill=prefill, chunk=chunk, max_len=32,
                             dtype=dtype)


def test_xla_matches_reference_with_gradients():
    cfg = _model_cfg()
    ref = GLA(cfg, dataclasses.replace(SMALL, backend="reference"), rngs=nnx.Rngs(0))
    xla = GLA(cfg, dataclasses.replace(SMALL, backend="xla"), rngs=nnx.Rngs(0))
    assert_backends_agree(ref, xla, _x(jnp.float32))


def test_cache_bytes_do_not_depend_on_max_len():
    mixer = GLA(_model_cfg("bfloat16"), GLAArgs(), rngs=nnx.Rngs(0))
    small = mixer.init_cache(1, 1024, jnp.bfloat16).nbytes
    assert small == mixer.init_cache(1, 16384, jnp.bfloat16).nbytes
    # float32 state: 2 heads x K 8 x V 16 x 4 bytes.
    assert small == 2 * 8 * 16 * 4


@pytest.mark.parametrize("override,match", [
    ("model.mixer_args.gla.backend=bogus", "'auto', 'reference', 'xla', 'pallas'"),
    ("model.mixer_args.gla.expand_k=0.3", "model.mixer_args.gla.expand_k=0.3"),
    ("model.mixer_args.gla.expand_v=0", "model.mixer_args.gla.expand_v=0"),
    ("model.mixer_args.gla.gate_low_rank=0", "model.mixer_args.gla.gate_low_rank must be > 0"),
    ("model.mixer_args.gla.gate_normalizer=0", "model.mixer_args.gla.gate_normalizer must be"),
    ("model.mixer_args.gla.n_heads=3", "model.mixer_args.gla.expand_k"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/gla.yaml", [override])
