"""DeltaNet / Gated DeltaNet mixers: decode parity in both dtypes, xla == reference backend
(values and gradients), the decode step against the op's reference, init ranges, the
constant-size cache, and config errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.delta_net import DeltaNet, DeltaNetArgs
from layers.delta_rule import recurrent_step
from models.config_check import load_config
from pallas_kernels.gated_delta_rule import gated_delta_rule_reference
from tests.parity import assert_decode_parity, relative_error

VARIANTS = {"deltanet": False, "gated_deltanet": True}


def _model_cfg(dtype="float32"):
    return load_config(None, ["model.d_model=32", "model.n_heads=2", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


@functools.cache
def _mixer(gated: bool, dtype: str = "float32", backend: str = "auto", seed: int = 0):
    # chunk_size 8 with T = 20: the chunked op crosses chunk boundaries and pads the last one.
    args = DeltaNetArgs(gated=gated, chunk_size=8, backend=backend, expand_v=1.5)
    return DeltaNet(_model_cfg(dtype), args, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_parity(name, dtype):
    mixer = _mixer(VARIANTS[name], "float32" if dtype == jnp.float32 else "bfloat16")
    x = jax.random.normal(jax.random.key(1), (2, 20, 32)).astype(dtype)
    # f32: a prefill and prefill chunks longer than the op's chunk (8), not dividing T = 20;
    # bf16: a prefill shorter than one op chunk, chunks 7, 7, 6 each starting mid-stream.
    prefill, chunk = (11, 9) if dtype == jnp.float32 else (5, 7)
    assert_decode_parity(mixer, x, prefill=prefill, chunk=chunk, max_len=32, dtype=dtype)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_stays_close_to_float32(name):
    # bf16 rounds every projection, the conv, q/k/v and the op output (8-bit mantissa), so
    # elementwise errors of ~1% are expected; the parity tolerance (2e-2) sits at that level.
    m32, m16 = _mixer(VARIANTS[name], "float32"), _mixer(VARIANTS[name], "bfloat16")
    x = jax.random.normal(jax.random.key(3), (2, 20, 32))
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    y32 = np.asarray(jax.jit(lambda x: m32(x, positions=pos)[0])(x))
    y16 = np.asarray(jax.jit(lambda x: m16(x, positions=pos)[0])(x.astype(jnp.bfloat16)),
                     np.float32)
    assert np.mean(np.abs(y16 - y32)) / np.mean(np.abs(y32)) < 2e-2
    assert relative_error(y16, y32) < 5e-2


@pytest.mark.parametrize("name", list(VARIANTS))
def test_xla_backend_matches_reference(name):
    xla, ref = _mixer(VARIANTS[name], backend="xla"), _mixer(VARIANTS[name], backend="reference")
    gd_x, params = nnx.split(xla, nnx.Param)
    gd_r, _ = nnx.split(ref, nnx.Param)   # same seed, so same params; the xla ones are used
    x = jax.random.normal(jax.random.key(2), (2, 20, 32))
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    ct = jax.random.normal(jax.random.key(4), (2, 20, 32))

    def loss(gd, p, x):
        y, _ = nnx.merge(gd, p)(x, positions=pos)
        return jnp.sum(y * ct), y

    grad = lambda gd: jax.jit(jax.grad(functools.partial(loss, gd), argnums=(0, 1),
                                       has_aux=True))
    (gp_x, gx_x), y_x = grad(gd_x)(params, x)
    (gp_r, gx_r), y_r = grad(gd_r)(params, x)
    np.testing.assert_allclose(y_x, y_r, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gx_x, gx_r, rtol=1e-4, atol=1e-6)
    flat_x, flat_r = jax.tree.leaves(gp_x), jax.tree.leaves(gp_r)
    assert len(flat_x) == len(flat_r) > 8
    for a, r in zip(flat_x, flat_r):
        tol = 1e-4 * float(jnp.max(jnp.abs(r))) + 1e-7
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=tol)


def test_recurrent_step_matches_op_reference():
    # The decode step, run token by token, is the op's reference recurrence (gated and not).
    b, t, h, kd, vd = 2, 6, 3, 4, 5
    keys = jax.random.split(jax.random.key(6), 5)
    q = jax.random.normal(keys[0], (b, t, h, kd))
    k = jax.random.normal(keys[1], (b, t, h, kd))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(keys[2], (b, t, h, vd))
    beta = jax.nn.sigmoid(jax.random.normal(keys[3], (b, t, h)))
    g = -jax.nn.softplus(jax.random.normal(keys[4], (b, t, h)))
    s0 = jax.random.normal(jax.random.key(7), (b, h, kd, vd))
    for gate in (g, None):
        o_ref, s_ref = gated_delta_rule_reference(
            q, k, v, jnp.zeros_like(g) if gate is None else gate, beta, scale=0.3,
            initial_state=s0, output_final_state=True)
        s, outs = s0, []
        step = jax.jit(recurrent_step, static_argnums=6)
        for i in range(t):
            o, s = step(s, q[:, i], k[:, i], v[:, i], beta[:, i],
                                  None if gate is None else gate[:, i], 0.3)
            outs.append(o)
        np.testing.assert_allclose(jnp.stack(outs, 1), o_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s, s_ref, rtol=1e-5, atol=1e-5)


def test_gated_init_follows_mamba2():
    mixer = DeltaNet(dataclasses.replace(_model_cfg(), n_heads=16), DeltaNetArgs(gated=True),
                     rngs=nnx.Rngs(0))
    a = np.exp(np.asarray(mixer.A_log[...]))
    dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
    assert a.shape == dt.shape == (16,)
    assert np.all((a >= 1.0) & (a <= 16.0))
    assert np.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 1e-1 * (1 + 1e-5)))
    g = mixer._decay(jnp.zeros((1, 1, 32)))
    assert np.all(np.asarray(g) < 0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cache_bytes_do_not_grow_with_length(name):
    mixer = _mixer(VARIANTS[name])
    small = mixer.init_cache(1, 1024, jnp.bfloat16)
    large = mixer.init_cache(1, 16384, jnp.bfloat16)
    assert small.nbytes == large.nbytes
    # float32 state 2 heads x K 16 x V 24, plus 3 bf16 conv tails of width - 1 = 3 steps.
    assert small.state.dtype == jnp.float32
    assert small.nbytes == 2 * 16 * 24 * 4 + 3 * (32 + 32 + 48) * 2


@pytest.mark.parametrize("override,pattern", [
    ("model.mixer_args.gated_deltanet.backend=triton",
     r"model.mixer_args.gated_deltanet.backend: expected one of 'auto', 'reference', 'xla', "
     "'pallas'"),
    ("model.mixer_args.gated_deltanet.conv_width=0",
     r"model.mixer_args.gated_deltanet.conv_width must be >= 1, got 0"),
    ("model.mixer_args.gated_deltanet.chunk_size=0",
     r"model.mixer_args.gated_deltanet.chunk_size must be >= 1"),
    ("model.mixer_args.gated_deltanet.n_heads=3",
     r"model.mixer_args.gated_deltanet.n_heads=3 does not divide model.d_model=64"),
    ("model.mixer_args.gated_deltanet.head_dim=-1",
     r"model.mixer_args.gated_deltanet.head_dim must be > 0"),
    ("model.mixer_args.gated_deltanet.expand_v=0.01",
     r"model.mixer_args.gated_deltanet.expand_v=0.01 gives a value dim < 1"),
    ("model.mixer_args.gated_deltanet.gate=true",
     r"unknown config key 'model.mixer_args.gated_deltanet.gate'; did you mean"),
])
def test_config_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/gated_deltanet.yaml", [override])


def test_config_resolves_both_names():
    cfg = load_config("configs/hybrid_gdn_swa.yaml",
                      ["model.mixer_args.gated_deltanet.n_heads=2",
                       "model.mixer_args.gated_deltanet.head_dim=8"])
    args = cfg.model.args_for("gated_deltanet")
    assert args.gated and args.n_heads == 2 and args.head_dim == 8
    assert not cfg.model.args_for("deltanet").gated
    assert cfg.model.layer_mixers() == ("gated_deltanet",) * 3 + ("swa",)
