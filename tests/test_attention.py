"""Softmax attention: against the plain reference (values and gradients), decode parity in all
settings and dtypes, and the ring-buffer cache's constant size."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers import attention
from layers.attention import Attention, AttentionArgs, attention_mask, softmax_attention
from models.config_check import load_config
from pallas_kernels.attention import attention_reference
from tests.parity import PARITY_TOL, assert_decode_parity, decode_paths, relative_error

SETTINGS = {
    "full": AttentionArgs(),
    "window": AttentionArgs(window=5),
    "window_sinks": AttentionArgs(window=5, n_sinks=2),
    "gqa": AttentionArgs(n_heads=4, n_kv_heads=2),
    "mqa_window_sinks": AttentionArgs(n_heads=4, n_kv_heads=1, window=7, n_sinks=1),
}


def _layer_attention(q, k, v, window, n_sinks):
    pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
    mask = attention_mask(pos, pos, window, n_sinks)
    return softmax_attention(q, k, v, mask, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("h,hkv,window,n_sinks", [(4, 4, None, 0), (4, 2, 6, 0), (4, 1, 6, 2),
                                                  (2, 2, 1, 0), (4, 2, 30, 3)])
def test_attention_matches_reference(h, hkv, window, n_sinks):
    kq, kk, kv = jax.random.split(jax.random.key(h * 100 + hkv + (window or 0)), 3)
    b, t, dh = 2, 19, 8
    q = jax.random.normal(kq, (b, t, h, dh))
    k = jax.random.normal(kk, (b, t, hkv, dh))
    v = jax.random.normal(kv, (b, t, hkv, dh))
    layer = jax.jit(lambda *a: _layer_attention(*a, window, n_sinks))
    ref_fn = jax.jit(lambda *a: attention_reference(*a, window=window, n_sinks=n_sinks))
    out = layer(q, k, v)
    np.testing.assert_allclose(out, ref_fn(q, k, v), rtol=1e-5, atol=1e-5)

    # Gradients of every input, through a random cotangent.
    ct = jax.random.normal(jax.random.key(7), out.shape)
    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * ct), argnums=(0, 1, 2)))
    g_layer = grads(layer)(q, k, v)
    g_ref = grads(ref_fn)(q, k, v)
    for a, r in zip(g_layer, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_window_one_sees_only_itself():
    # With window 1 and no sinks each output is exactly its own value vector.
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 9, 2, 4)) for i in range(3))
    np.testing.assert_allclose(_layer_attention(q, k, v, 1, 0), v, rtol=1e-6, atol=1e-6)


def _model_cfg(dtype="float32", **kw):
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.max_len=64",
                             "model.vocab_size=64", f"model.dtype={dtype}"])
    return dataclasses.replace(cfg.model, **kw)


def _mixer(args: AttentionArgs, dtype: str, seed: int = 0):
    cfg = _model_cfg(dtype, n_heads=4)
    return Attention(cfg, args, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_attention_decode_parity(name, dtype):
    mixer = _mixer(SETTINGS[name], "float32" if dtype == jnp.float32 else "bfloat16")
    x = jax.random.normal(jax.random.key(1), (2, 23, 32)).astype(dtype)
    # Prefill shorter and longer than the window; chunks larger than the ring, to exercise
    # eviction inside one write.
    for prefill, chunk in [(3, 4), (11, 9)]:
        assert_decode_parity(mixer, x, prefill=prefill, chunk=chunk, max_len=32, dtype=dtype)


def test_bf16_paths_stay_close_to_float32():
    # The bf16 tolerance is honest only if bf16 itself tracks float32 at that level.
    args = SETTINGS["window_sinks"]
    m32 = _mixer(args, "float32")
    m16 = _mixer(args, "bfloat16")
    x = jax.random.normal(jax.random.key(3), (2, 16, 32))
    full32, _, _ = decode_paths(m32, x, prefill=4, chunk=5, max_len=32, cache_dtype=jnp.float32)
    full16, step16, _ = decode_paths(m16, x.astype(jnp.bfloat16), prefill=4, chunk=5,
                                     max_len=32, cache_dtype=jnp.bfloat16)
    assert relative_error(full16, full32) < 3e-2
    assert relative_error(step16, full32) < 3e-2
    assert PARITY_TOL[jnp.bfloat16] < 3e-2


def test_window_cache_bytes_do_not_grow_with_length():
    windowed = _mixer(AttentionArgs(window=16, n_sinks=4), "bfloat16")
    full = _mixer(AttentionArgs(), "bfloat16")
    small = windowed.init_cache(1, 1024, jnp.bfloat16).nbytes
    large = windowed.init_cache(1, 16384, jnp.bfloat16).nbytes
    assert small == large
    # 20 slots x (k + v) x 4 heads x 8 dims x 2 bytes, plus slot positions and the length.
    assert small == 20 * 2 * 4 * 8 * 2 + 20 * 4 + 4
    assert full.init_cache(1, 16384, jnp.bfloat16).nbytes > 15 * full.init_cache(
        1, 1024, jnp.bfloat16).nbytes


def test_window_decodes_past_its_ring_many_times():
    # 3 x the ring size in single steps: the ring wraps repeatedly and still matches.
    mixer = _mixer(AttentionArgs(window=4, n_sinks=1), "float32")
    x = jax.random.normal(jax.random.key(5), (1, 20, 32))
    full, stepped, _ = decode_paths(mixer, x, prefill=1, chunk=20, max_len=8,
                                    cache_dtype=jnp.float32)
    assert relative_error(stepped, full) < PARITY_TOL[jnp.float32]


def test_full_cache_rejects_a_chunk_longer_than_itself():
    mixer = _mixer(AttentionArgs(), "float32")
    cache = mixer.init_cache(1, 4, jnp.float32)
    x = jnp.zeros((1, 6, 32))
    with pytest.raises(ValueError, match="do not fit"):
        mixer(x, positions=jnp.arange(6)[None], cache=cache)


def test_in_place_ring_step_equals_the_chunk_path(monkeypatch):
    # A one-token step on a ring writes its slot in place and attends over the ring; the chunk
    # path (ring ++ token, then every slot rebuilt: attention.concat_keys) must give the same
    # outputs and the same cache, step after step as the ring wraps, sinks included, at batch 3.
    mixer = _mixer(AttentionArgs(window=4, n_sinks=2), "float32")
    x = jax.random.normal(jax.random.key(7), (3, 15, 32))
    graphdef, state = nnx.split(mixer)

    def run():
        # A fresh jit per path: cached_keys is looked up when the step is traced.
        step = jax.jit(lambda st, xt, pos, c: nnx.merge(graphdef, st)(xt, positions=pos,
                                                                      cache=c))
        cache, outs, caches = mixer.init_cache(3, 8, jnp.float32), [], []
        for t in range(15):
            y, cache = step(state, x[:, t:t + 1], jnp.full((3, 1), t, jnp.int32), cache)
            outs.append(y)
            caches.append(cache)
        return outs, caches

    in_place = run()
    monkeypatch.setattr(attention, "cached_keys", attention.concat_keys)
    chunked = run()
    for y_in, y_ch in zip(in_place[0], chunked[0]):
        np.testing.assert_allclose(y_in, y_ch, rtol=1e-6, atol=1e-6)
    for c_in, c_ch in zip(in_place[1], chunked[1]):
        for a, b in zip(jax.tree.leaves(c_in), jax.tree.leaves(c_ch)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
