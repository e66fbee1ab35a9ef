"""The Mamba-2 layer (layers/mamba2.py): its scan against the SSD recurrence written out here
token by token (independent of the simple_gla op it runs through), decode parity (float32,
bf16), the xla backend against the reference (values and every parameter's gradient), groups
of B / C, a constant-size cache, and config errors. Packed documents:
tests/test_packed_model.py (every registered mixer)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.mamba2 import Mamba2, Mamba2Args
from models.config_check import load_config
from tests.parity import assert_backends_agree, assert_decode_parity, relative_error

# d_model 32, expand 2: E = 64, head_dim 16: H = 4; chunk_size 8 < T = 20.
SMALL = Mamba2Args(head_dim=16, state_dim=8, chunk_size=8)
GROUPED = Mamba2Args(head_dim=8, state_dim=8, n_groups=2, chunk_size=8)


def _model_cfg(dtype="float32"):
    return load_config(None, ["model.d_model=32", "model.n_heads=2", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


def _x(dtype, t=20, seed=1):
    return jax.random.normal(jax.random.key(seed), (2, t, 32)).astype(dtype)


def ssd_by_hand(m: Mamba2, x):
    """Mamba-2's forward from its own parameters, the scan a Python loop over tokens:
    h = exp(dt A) h + dt B x^T, y = C^T h + D x, out = W_o RMSNorm(y SiLU(z)) (float32)."""
    b, t, _ = x.shape
    e, h, p, g, n = m.inner, m.n_heads, m.head_dim, m.n_groups, m.state_dim
    z, xbc, dt = jnp.split(m.in_proj(x), [e, e + m.conv_dim], axis=-1)
    w = m.conv.kernel[...]
    padded = jnp.concatenate([jnp.zeros((b, w.shape[0] - 1, xbc.shape[-1])), xbc], axis=1)
    conv = sum(padded[:, i:i + t] * w[i] for i in range(w.shape[0])) + m.conv.bias[...]
    xs, bs, cs = jnp.split(jax.nn.silu(conv), [e, e + g * n], axis=-1)
    xs = xs.reshape(b, t, h, p)
    bs, cs = (jnp.repeat(a.reshape(b, t, g, n), h // g, axis=2) for a in (bs, cs))
    dt = jax.nn.softplus(dt + m.dt_bias[...])
    a = -jnp.exp(m.A_log[...])
    state = jnp.zeros((b, h, n, p))
    ys = []
    for i in range(t):
        state = (jnp.exp(dt[:, i] * a)[..., None, None] * state
                 + jnp.einsum("bhn,bhp->bhnp", bs[:, i], dt[:, i, :, None] * xs[:, i]))
        ys.append(jnp.einsum("bhn,bhnp->bhp", cs[:, i], state) + m.D[...][:, None] * xs[:, i])
    y = jnp.stack(ys, axis=1).reshape(b, t, e) * jax.nn.silu(z)
    y = y.reshape(b, t, g, -1)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + m.eps)
    return m.out(y.reshape(b, t, e) * m.norm_scale[...])


def scan_dominant(m: Mamba2) -> Mamba2:
    """At init dt is small (softplus of dt_bias: 1e-3..1e-1), B and C are small (the input
    projection's init) and D x dominates the output; O(1) B, C, dt and a smaller D make the
    scan carry it, so a comparison tests the scan and its state."""
    m.in_proj.kernel[...] = 20.0 * m.in_proj.kernel[...]
    m.dt_bias[...] = jnp.linspace(-1.0, 1.0, m.n_heads)
    m.D[...] = jnp.full((m.n_heads,), 0.1)
    return m


@pytest.mark.parametrize("args", [SMALL, GROUPED], ids=["one-group", "two-groups"])
def test_matches_the_ssd_recurrence(args):
    m = scan_dominant(Mamba2(_model_cfg(), dataclasses.replace(args, backend="xla"),
                             rngs=nnx.Rngs(0)))
    x = _x(jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    with jax.default_matmul_precision("highest"):
        want = np.asarray(ssd_by_hand(m, x))
        got = np.asarray(m(x, positions=pos)[0])
        m.D[...] = jnp.zeros((m.n_heads,))
        scan_only = np.asarray(ssd_by_hand(m, x))
    assert np.abs(scan_only).max() > 0.5 * np.abs(want).max()      # the scan matters
    # float32, summation order only (measured <= 1.2e-6 relative).
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("args,dtype", [(SMALL, jnp.float32), (SMALL, jnp.bfloat16),
                                        (GROUPED, jnp.float32)],
                         ids=["default-f32", "default-bf16", "groups-f32"])
def test_decode_parity(args, dtype):
    mixer = scan_dominant(Mamba2(_model_cfg(jnp.dtype(dtype).name), args, rngs=nnx.Rngs(0)))
    for prefill, chunk in [(3, 7), (11, 7)]:
        assert_decode_parity(mixer, _x(dtype), prefill=prefill, chunk=chunk, max_len=32,
                             dtype=dtype)


def test_xla_matches_reference_with_gradients():
    cfg = _model_cfg()
    ref = scan_dominant(Mamba2(cfg, dataclasses.replace(SMALL, backend="reference"),
                               rngs=nnx.Rngs(0)))
    xla = scan_dominant(Mamba2(cfg, dataclasses.replace(SMALL, backend="xla"),
                               rngs=nnx.Rngs(0)))
    gp_xla = assert_backends_agree(ref, xla, _x(jnp.float32))
    assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(gp_xla))


def test_cache_bytes_do_not_depend_on_max_len():
    mixer = Mamba2(_model_cfg("bfloat16"), SMALL, rngs=nnx.Rngs(0))
    cache = mixer.init_cache(1, 1024, jnp.bfloat16)
    assert cache.nbytes == mixer.init_cache(1, 16384, jnp.bfloat16).nbytes
    assert cache.state.nbytes == 4 * 8 * 16 * 4         # float32: 4 heads x N 8 x P 16


@pytest.mark.parametrize("override,match", [
    ("model.mixer_args.mamba2.head_dim=24", "head_dim=24 must divide the inner width"),
    ("model.mixer_args.mamba2.n_groups=3", "n_groups=3 must divide the heads"),
    ("model.mixer_args.mamba2.state_dim=0", "state_dim must be >= 1"),
    ("model.mixer_args.mamba2.backend=bogus", "'auto', 'reference', 'xla', 'pallas'"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["model.mixers=[mamba2]", "model.d_model=32", override])
