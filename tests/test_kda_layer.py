"""The KDA layer (layers/kda.py): decode parity (float32, bf16), the xla backend against the
token-by-token reference (values and every parameter's gradient), per-channel decays that
really differ across channels, a constant-size cache, and config errors. Packed documents:
tests/test_packed_model.py (every registered mixer)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import ConfigError
from layers.kda import KDA, KDAArgs
from models.config_check import load_config
from tests.parity import assert_backends_agree, assert_decode_parity

# d_model 32, 2 heads: K = V = 16; chunk_size 8 < T = 20 crosses chunk boundaries.
SMALL = KDAArgs(chunk_size=8)
OTHER_WIDTHS = KDAArgs(n_heads=4, expand_v=2.0, gate_rank=4, chunk_size=8)


def _model_cfg(dtype="float32"):
    return load_config(None, ["model.d_model=32", "model.n_heads=2", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


def _x(dtype, t=20, seed=1):
    return jax.random.normal(jax.random.key(seed), (2, t, 32)).astype(dtype)


def _spread_gates(mixer):
    """Channel decays far apart (the init's dt_bias spans 1e-3..1e-1 already; a spread of the
    forget-gate bias-free logits through A_log makes some channels forget within a chunk)."""
    mixer.A_log[...] = jnp.log(jnp.linspace(0.5, 8.0, mixer.A_log.shape[0]))
    return mixer


@pytest.mark.parametrize("args,dtype", [(SMALL, jnp.float32), (SMALL, jnp.bfloat16),
                                        (OTHER_WIDTHS, jnp.float32)],
                         ids=["default-f32", "default-bf16", "h4_v2_r4-f32"])
def test_decode_parity(args, dtype):
    mixer = _spread_gates(KDA(_model_cfg(jnp.dtype(dtype).name), args, rngs=nnx.Rngs(0)))
    for prefill, chunk in [(3, 7), (11, 7)]:
        assert_decode_parity(mixer, _x(dtype), prefill=prefill, chunk=chunk, max_len=32,
                             dtype=dtype)


def test_decays_differ_across_channels():
    mixer = _spread_gates(KDA(_model_cfg(), SMALL, rngs=nnx.Rngs(0)))
    g = mixer._decay(_x(jnp.float32))                              # [B, T, H, K]
    assert g.shape == (2, 20, 2, 16) and bool(jnp.all(g <= 0))
    spread = jnp.max(g, axis=-1) - jnp.min(g, axis=-1)             # across channels
    assert float(jnp.min(spread)) > 1e-3                           # not one scalar per head


def test_xla_matches_reference_with_gradients():
    cfg = _model_cfg()
    ref = _spread_gates(KDA(cfg, dataclasses.replace(SMALL, backend="reference"),
                            rngs=nnx.Rngs(0)))
    xla = _spread_gates(KDA(cfg, dataclasses.replace(SMALL, backend="xla"), rngs=nnx.Rngs(0)))
    # float32; the chunked form sums in another order (measured <= 1e-6 relative).
    gp_xla = assert_backends_agree(ref, xla, _x(jnp.float32))
    # Every parameter learns something (the gates' included).
    assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(gp_xla))


def test_cache_bytes_do_not_depend_on_max_len():
    mixer = KDA(_model_cfg("bfloat16"), KDAArgs(), rngs=nnx.Rngs(0))
    small = mixer.init_cache(1, 1024, jnp.bfloat16)
    assert small.nbytes == mixer.init_cache(1, 16384, jnp.bfloat16).nbytes
    assert small.state.nbytes == 2 * 16 * 16 * 4           # float32: 2 heads x K 16 x V 16


@pytest.mark.parametrize("override,match", [
    ("model.mixer_args.kda.backend=bogus", "'auto', 'reference', 'xla', 'pallas'"),
    ("model.mixer_args.kda.gate_rank=0", "gate_rank must be >= 1 or null"),
    ("model.mixer_args.kda.n_heads=3", "model.mixer_args.kda"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.mixers=[kda]", "model.d_model=32", override])
