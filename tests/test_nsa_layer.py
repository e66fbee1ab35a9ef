"""The NSA layer (layers/nsa.py): decode parity (float32, bf16; the cache's compressed tokens
written every d tokens), the xla backend against the reference (values and every parameter's
gradient, the compressor's included), what the compressor starts as, the cache's shapes, and
config errors. Packed documents: tests/test_packed_model.py (every registered mixer); the op:
tests/test_op_nsa.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.nsa import NSA, NSAArgs
from models.config_check import load_config
from tests.parity import assert_backends_agree, assert_decode_parity

# d_model 32, 4 query heads over 2 key/value heads (head dim 8); blocks small enough that a
# 30-token sequence has many compressed tokens and blocks and a window shorter than it.
SMALL = NSAArgs(n_heads=4, n_kv_heads=2, cmp_block=4, cmp_stride=2, block_size=4,
                block_count=3, window=4, query_chunk=8)


def _model_cfg(dtype="float32"):
    return load_config(None, ["model.d_model=32", "model.n_heads=4", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


def _x(dtype, t=30, seed=1):
    return jax.random.normal(jax.random.key(seed), (2, t, 32)).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("compress", ["mlp", "mean"])
def test_decode_parity(dtype, compress):
    """Prefill 7 then single tokens (compressed tokens completing one step at a time), and
    chunks of 8 (several completing per chunk, some straddling chunks)."""
    layer = NSA(_model_cfg(jnp.dtype(dtype).name),
                dataclasses.replace(SMALL, compress=compress), rngs=nnx.Rngs(0))
    assert_decode_parity(layer, _x(dtype), prefill=7, chunk=8, max_len=40, dtype=dtype)


@pytest.mark.parametrize("backend", ["xla", "pallas_gpu"])
def test_backend_equals_reference_with_gradients(backend):
    """pallas_gpu: the Triton kernels in the interpreter (conftest), through the layer."""
    ref = NSA(_model_cfg(), dataclasses.replace(SMALL, backend="reference"), rngs=nnx.Rngs(0))
    other = NSA(_model_cfg(), dataclasses.replace(SMALL, backend=backend), rngs=nnx.Rngs(0))
    grads = assert_backends_agree(ref, other, _x(jnp.float32))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)


def test_compressor_starts_near_mean_pooling_and_learns_the_rest():
    """phi = mean + MLP(x + pos): at init the MLP's output is at the residual-branch scale,
    small beside the mean; with its last layer zeroed phi is exactly mean pooling."""
    layer = NSA(_model_cfg(), SMALL, rngs=nnx.Rngs(0))
    blocks = jax.random.normal(jax.random.key(2), (2, 5, 4, 2, 8))
    mean = np.asarray(blocks.mean(axis=2))
    phi = np.asarray(layer.k_compress(blocks))
    assert 0 < np.abs(phi - mean).max() < 0.2 * np.abs(mean).max()
    layer.k_compress.proj.kernel[...] = jnp.zeros_like(layer.k_compress.proj.kernel[...])
    np.testing.assert_allclose(np.asarray(layer.k_compress(blocks)), mean, rtol=1e-6)


def test_cache_holds_keys_and_compressed_tokens():
    layer = NSA(_model_cfg(), SMALL, rngs=nnx.Rngs(0))
    cache = layer.init_cache(3, 40, jnp.bfloat16)
    assert cache.kv.k.shape == cache.kv.v.shape == (3, 40, 2, 8)
    assert cache.k_cmp.shape == cache.v_cmp.shape == (3, (40 - 4) // 2 + 1, 2, 8)
    # keys and values, compressed ones, slot positions (int32) and the length
    assert cache.nbytes == 2 * (3 * 40 * 2 * 8 * 2) + 2 * (3 * 19 * 2 * 8 * 2) + 3 * 40 * 4 + 4


def test_a_chunk_longer_than_the_cache_is_refused():
    layer = NSA(_model_cfg(), SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="do not fit the KV cache of 16 slots"):
        layer(_x(jnp.float32, t=20), positions=jnp.zeros((2, 20), jnp.int32),
              cache=layer.init_cache(2, 16))


@pytest.mark.parametrize("override,message", [
    ("model.mixer_args.nsa.block_count=2", "nsa.block_count=2 must be >= 3"),
    ("model.mixer_args.nsa.cmp_stride=3", "nsa.cmp_stride=3 must divide cmp_block=32"),
    ("model.mixer_args.nsa.compress=max", "compress: expected one of 'mlp', 'mean'"),
    ("model.mixer_args.nsa.n_kv_heads=3", "n_kv_heads=3 must divide"),
])
def test_bad_settings_are_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config("configs/quickstart.yaml", ["model.mixers=[nsa]", override])
    assert "\n" not in str(e.value)
