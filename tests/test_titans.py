"""Titans memory mixer: decode parity in both dtypes (prefill and chunk sizes that cut the
memory's chunks), xla == reference backend (values and gradients), the read rule through the
functional core, the constant-size cache, config errors, the MAL config end to end."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.titans import TitansArgs, TitansMemory
from models import build_model
from models.config_check import load_config
from tests.parity import assert_decode_parity

# Memory chunk 8 with T = 20: a pass crosses memory chunks and ends mid-chunk; the persistent
# tokens (3) shift the whole chunk grid by 3.
VARIANTS = {
    "mlp_persistent": dict(memory_depth=2, n_persistent=3),
    "matrix": dict(memory_depth=1),
}


def _model_cfg(dtype="float32"):
    return load_config(None, ["model.d_model=32", "model.n_heads=2", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


@functools.cache
def _mixer(variant: str, dtype: str = "float32", backend: str = "auto", seed: int = 0):
    # theta_max 0.2 (default 0.01): the memory's writes must weigh in what the tests compare.
    args = TitansArgs(chunk_size=8, backend=backend, theta_max=0.2, **VARIANTS[variant])
    return TitansMemory(_model_cfg(dtype), args, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_parity(variant, dtype):
    mixer = _mixer(variant, "float32" if dtype == jnp.float32 else "bfloat16")
    x = jax.random.normal(jax.random.key(1), (2, 20, 32)).astype(dtype)
    # f32: prefill 11 and prefill chunks of 9 (neither a multiple of the memory chunk 8);
    # bf16: a prefill shorter than one memory chunk, then chunks of 7 starting mid-chunk.
    # The single steps and every chunked call must follow the full pass's chunk grid.
    prefill, chunk = (11, 9) if dtype == jnp.float32 else (5, 7)
    assert_decode_parity(mixer, x, prefill=prefill, chunk=chunk, max_len=32, dtype=dtype)


def test_xla_backend_matches_reference():
    xla, ref = _mixer("mlp_persistent", backend="xla"), _mixer("mlp_persistent",
                                                               backend="reference")
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
    assert len(flat_x) == len(flat_r) > 10          # incl. M_0 and the persistent tokens
    for a, r in zip(flat_x, flat_r):
        assert float(jnp.max(jnp.abs(r))) > 0
        tol = 1e-4 * float(jnp.max(jnp.abs(r))) + 1e-7
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=tol)


def test_functional_core_read_rule():
    # Token t reads M_t, the memory after its own write: the last token's output is a plain
    # retrieve() with the final memory, and retrieve() with no memory reads M_0.
    mixer = _mixer("matrix")
    x = jax.random.normal(jax.random.key(5), (2, 12, 32))
    (q, k, v, theta, eta, alpha), _ = mixer.qkv(x)
    state0 = mixer.initial_state(2)
    o, state = mixer.memorize(q, k, v, theta, eta, alpha, state0)
    assert int(state.offset) == 12 % 8
    np.testing.assert_allclose(mixer.retrieve(q[:, -1:], state.memory), o[:, -1:],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixer.retrieve(q), 0.0)     # the last layer of M_0 starts at 0
    o_train, none = mixer.memorize(q, k, v, theta, eta, alpha)
    assert none is None
    np.testing.assert_allclose(o_train, o, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_bytes_do_not_grow_with_length(variant):
    mixer = _mixer(variant)
    small = mixer.init_cache(1, 1024, jnp.bfloat16)
    large = mixer.init_cache(1, 16384, jnp.bfloat16)
    assert small.nbytes == large.nbytes
    # 2 heads x K 16: memory, momentum and chunk-start weights (float32), the offset (int32),
    # three float32 conv tails of width - 1 = 3 steps x 32 channels.
    params = 16 * 32 + 32 * 16 if variant == "mlp_persistent" else 16 * 16
    assert small.nbytes == 3 * 2 * params * 4 + 4 + 3 * 3 * 32 * 4
    assert all(w.dtype == jnp.float32 for w in jax.tree.leaves(small.state[:3]))


@pytest.mark.parametrize("override,pattern", [
    ("model.mixer_args.titans.backend=pallas",
     r"model.mixer_args.titans.backend: expected one of 'auto', 'reference', 'xla'"),
    ("model.mixer_args.titans.memory_depth=0",
     r"model.mixer_args.titans.memory_depth must be >= 1 \(1 = matrix memory\), got 0"),
    ("model.mixer_args.titans.memory_expand=0.01",
     r"model.mixer_args.titans.memory_expand=0.01 gives a hidden width < 1"),
    ("model.mixer_args.titans.chunk_size=0",
     r"model.mixer_args.titans.chunk_size must be >= 1, got 0"),
    ("model.mixer_args.titans.conv_width=0",
     r"model.mixer_args.titans.conv_width must be >= 1, got 0"),
    ("model.mixer_args.titans.n_persistent=-1",
     r"model.mixer_args.titans.n_persistent must be >= 0, got -1"),
    ("model.mixer_args.titans.theta_max=0",
     r"model.mixer_args.titans.theta_max must be > 0, got 0"),
    ("model.mixer_args.titans.n_heads=3",
     r"model.mixer_args.titans.n_heads=3 does not divide model.d_model=64"),
    ("model.mixer_args.titans.depth=2",
     r"unknown config key 'model.mixer_args.titans.depth'; did you mean"),
])
def test_config_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/titans_mal.yaml", [override])


def test_mal_config_builds_and_runs():
    cfg = load_config("configs/titans_mal.yaml", ["model.mixer_args.titans.n_persistent=2"])
    assert cfg.model.layer_mixers() == ("titans", "swa")
    assert cfg.model.args_for("titans").memory_depth == 2
    model = build_model(cfg.model)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.model.vocab_size)
    graphdef, state = nnx.split(model)
    logits, _ = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    assert logits.shape == (2, 24, cfg.model.vocab_size)
    assert np.all(np.isfinite(np.asarray(logits)))
