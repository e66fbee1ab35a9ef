"""Titans MAC and MAG mixers: decode parity in both dtypes (prefill and chunk sizes that cut the
segments and the memory's chunks), causality, MAC against a plain loop over segments (values
and gradients), constant-size caches, config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.rope import apply_rope
from layers.titans_variants import TitansMAC, TitansMACArgs, TitansMAG, TitansMAGArgs
from models.config_check import load_config
from pallas_kernels.titans import titans_memory
from tests.parity import assert_decode_parity

# Segment 6 and memory chunk 4 with T = 20: the last segment is partial, and MAC's memory
# chunks (on the y stream) and segments cut each other. MAG's memory grid is shifted by its 2
# persistent tokens; its window 5 is shorter than the sequence. theta_max 0.5 (default 0.01):
# memory writes that move the memory a lot, so any slip in what is read when shows.
MEM = dict(chunk_size=4, theta_max=0.5)
SETTINGS = {
    "mac": (TitansMAC, TitansMACArgs(segment_length=6, n_persistent=2, **MEM)),
    "mac_nopersist": (TitansMAC, TitansMACArgs(segment_length=6, n_persistent=0,
                                               memory_depth=1, **MEM)),
    "mag": (TitansMAG, TitansMAGArgs(window=5, n_persistent=2, memory_depth=1, **MEM)),
}


def _model_cfg(dtype="float32"):
    return load_config(None, ["model.d_model=32", "model.n_heads=2", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


@functools.cache
def _mixer(name: str, dtype: str = "float32"):
    cls, args = SETTINGS[name]
    return cls(_model_cfg(dtype), args, rngs=nnx.Rngs(0))


@functools.cache
def _forward(name: str):
    """The jitted full pass of an f32 mixer: (params, x) -> y."""
    graphdef, params = nnx.split(_mixer(name))

    def fwd(p, x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        return nnx.merge(graphdef, p)(x, positions=pos)[0]

    return jax.jit(fwd), params


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["mac", "mag"])
def test_decode_parity(name, dtype):
    mixer = _mixer(name, "float32" if dtype == jnp.float32 else "bfloat16")
    x = jax.random.normal(jax.random.key(1), (2, 20, 32)).astype(dtype)
    # Prefills of 7 and 3 and chunks of 5: none a multiple of the segment (6), the memory chunk
    # (4) or the window (5 + 2 sinks); every call starts mid-segment and mid-chunk.
    prefill = 7 if dtype == jnp.float32 else 3
    assert_decode_parity(mixer, x, prefill=prefill, chunk=5, max_len=32, dtype=dtype)


@pytest.mark.parametrize("name", ["mac_nopersist", "mag"])
def test_causal(name):
    fwd, params = _forward(name)
    x = jax.random.normal(jax.random.key(2), (2, 20, 32))
    j = 9                                   # mid-segment (segment 6) and mid-chunk (4)
    y = np.asarray(fwd(params, x))
    y2 = np.asarray(fwd(params, x.at[:, j].add(1.0)))
    np.testing.assert_allclose(y2[:, :j], y[:, :j], rtol=0, atol=1e-7)
    assert np.all(np.abs(y2[:, j:] - y[:, j:]).max(axis=(0, 2)) > 0)


def _mac_reference(mac: TitansMAC, x):
    """MAC written as an explicit loop over segments, rewriting the memory from M_0 each time.

    Segment n: h = readout(M*(q^x)) with M the memory after writing every earlier y; plain
    softmax attention over [persistent || h || segment], query i sees h_j and x_j for j <= i;
    the memory then writes [y_0 .. y_n] from scratch (q/k/v/gates and convs over the whole y
    sequence so far, the token-by-token reference rule) and token i reads after its own write;
    out = gate(y, readout(o, y))."""
    mem, attn, gate = mac.memory, mac.attn, mac.gate
    b, t, _ = x.shape
    c, p = mac.segment_length, mac.n_persistent
    h_, dh = attn.n_heads, attn.head_dim
    (qx, *_), _ = mem.qkv(x)
    pers = jnp.broadcast_to(mac.persistent[...], (b, p, x.shape[2]))
    memory, ys, outs = None, [], []                           # None: M_0
    for s in range(0, t, c):
        xs = x[:, s:s + c]
        n = xs.shape[1]
        h = mem.readout(mem.retrieve(qx[:, s:s + n], memory), xs)
        ctx = jnp.concatenate([pers, h, xs], axis=1)
        pos = np.concatenate([np.arange(p), p + np.arange(n), p + c + np.arange(n)])
        qkv = attn.qkv(ctx).reshape(b, p + 2 * n, 3, h_, dh)
        pos_b = jnp.broadcast_to(pos, (b, len(pos)))
        q = apply_rope(qkv[:, :, 0], pos_b, attn.rope_theta)[:, p + n:]
        k = apply_rope(qkv[:, :, 1], pos_b, attn.rope_theta)
        v = qkv[:, :, 2]
        tri = np.tril(np.ones((n, n), bool))
        mask = np.concatenate([np.ones((n, p), bool), tri, tri], axis=1)
        scores = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dh)
        probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        y = attn.out(jnp.einsum("bhij,bjhd->bihd", probs, v).reshape(b, n, h_ * dh))
        ys.append(y)
        gates_etc, _ = mem.qkv(jnp.concatenate(ys, axis=1))
        o, state = titans_memory(*gates_etc, memory0=mem.initial_state(b).memory,
                                 chunk_size=mem.chunk_size, output_final_state=True,
                                 backend="reference")
        memory = state.memory                                  # for the next segment's h
        m = mem.readout(o[:, s:], y)
        outs.append(gate.out(gate.y_norm(y) * jax.nn.sigmoid(gate.m_norm(m))))
    return jnp.concatenate(outs, axis=1)


def test_mac_matches_reference():
    mac = _mixer("mac")
    graphdef, params = nnx.split(mac)
    x = jax.random.normal(jax.random.key(3), (2, 10, 32))       # 2 segments, the last partial
    ct = jax.random.normal(jax.random.key(4), (2, 10, 32))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))

    def loss(fn, p, x):
        y = fn(nnx.merge(graphdef, p), x)
        return jnp.sum(y * ct), y

    layer = lambda m, x: m(x, positions=pos)[0]                 # noqa: E731
    grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1),  # noqa: E731
                                       has_aux=True))
    (gp, gx), y = grad(layer)(params, x)
    (gp_r, gx_r), y_r = grad(_mac_reference)(params, x)
    np.testing.assert_allclose(y, y_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, gx_r, rtol=1e-4, atol=1e-6)
    flat, flat_r = jax.tree.leaves(gp), jax.tree.leaves(gp_r)
    assert len(flat) == len(flat_r) > 15          # incl. M_0, persistent tokens, the gate
    for a, r in zip(flat, flat_r):
        assert float(jnp.max(jnp.abs(r))) > 0
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(r))))


def test_cache_bytes_do_not_grow_with_length():
    # Shapes only (jax.eval_shape): nbytes needs no values.
    caches = lambda m: (jax.eval_shape(lambda: m.init_cache(1, 64, jnp.bfloat16)),  # noqa: E731
                        jax.eval_shape(lambda: m.init_cache(1, 16384, jnp.bfloat16)))
    small, large = caches(_mixer("mac"))
    assert small.nbytes == large.nbytes
    # 4 rings (k, v, hk, hv) of C = 6 slots x 2 heads x 16 (bf16); the memory (2 heads, 16 -> 32
    # -> 16) four times in float32: segment start, weights, momentum, chunk start; the memory
    # offset and the length (int32); four float32 conv tails of 3 steps x 32 channels.
    assert small.nbytes == 4 * 6 * 2 * 16 * 2 + 4 * 2 * (16 * 32 + 32 * 16) * 4 + 8 + 4 * 96 * 4
    f32 = (small.segment_memory, small.state[:3], small.x_conv, small.y_conv)
    assert all(w.dtype == jnp.float32 for w in jax.tree.leaves(f32))

    small, large = caches(_mixer("mag"))
    assert small.memory.nbytes == large.memory.nbytes
    assert small.attn.k.shape[1] == large.attn.k.shape[1] == 2 + 5      # sinks + window
    assert small.nbytes == large.nbytes


@pytest.mark.parametrize("name", ["mac", "mag"])
def test_cache_is_donatable(name):
    # generate.py donates the cache to its decode step: no buffer may appear twice in it.
    cache = _mixer(name).init_cache(1, 32, jnp.float32)
    jax.jit(lambda c: c, donate_argnums=0)(cache)


@pytest.mark.parametrize("config,override,pattern", [
    ("mac", "segment_length=0", r"titans_mac.segment_length must be > 0, got 0"),
    ("mac", "segment_length=300",
     r"titans_mac.segment_length=300 is larger than model.max_len=256"),
    ("mac", "n_persistent=-1", r"titans_mac.n_persistent must be >= 0, got -1"),
    ("mac", "chunk_size=0", r"titans_mac.chunk_size must be >= 1, got 0"),
    ("mac", "memory_depth=0", r"titans_mac.memory_depth must be >= 1"),
    ("mag", "window=0", r"titans_mag.window must be > 0, got 0"),
    ("mag", "window=300", r"titans_mag.window=300 is larger than model.max_len=256"),
    ("mag", "n_persistent=-2", r"titans_mag.n_persistent must be >= 0, got -2"),
    ("mag", "n_heads=3", r"titans_mag.n_heads=3 does not divide model.d_model=64"),
    ("mag", "segment_length=4", r"unknown config key 'model.mixer_args.titans_mag.segment"),
])
def test_config_errors(config, override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(f"configs/titans_{config}.yaml",
                    [f"model.mixer_args.titans_{config}.{override}"])


def test_configs_resolve():
    mac = load_config("configs/titans_mac.yaml").model
    assert mac.layer_mixers() == ("titans_mac",) * 2
    assert mac.args_for("titans_mac").segment_length == 16
    mag = load_config("configs/titans_mag.yaml").model
    assert mag.args_for("titans_mag").window == 16
    assert mag.args_for("titans_mag").n_persistent == 4
