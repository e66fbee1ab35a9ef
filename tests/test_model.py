"""The LM: mixer pattern, decode parity end to end, dtypes, tied/untied heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import build_model, lm_loss
from models.config_check import load_config
from tests.parity import PARITY_TOL, relative_error

BASE = ["model.d_model=32", "model.n_heads=4", "model.n_layers=3", "model.vocab_size=64",
        "model.max_len=48", "data.seq_len=32", "model.mixers=[swa, swa, attn]",
        "model.mixer_args.swa.window=6", "model.mixer_args.swa.n_sinks=1",
        "model.n_kv_heads=2"]


def _cfg(*extra):
    return load_config("configs/quickstart.yaml", BASE + list(extra)).model


def _logits_paths(model, tokens, prefill, chunk):
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda st, tok, c: nnx.merge(graphdef, st)(tok, cache=c))
    full, _ = call(state, tokens, None)
    cache = model.init_cache(tokens.shape[0], 48)
    outs = []
    for s, e in [(0, prefill)] + [(i, i + 1) for i in range(prefill, tokens.shape[1])]:
        y, cache = call(state, tokens[:, s:e], cache)
        outs.append(y)
    stepped = jnp.concatenate(outs, axis=1)
    assert int(cache.length) == tokens.shape[1]
    cache, outs = model.init_cache(tokens.shape[0], 48), []
    for s in range(0, tokens.shape[1], chunk):
        y, cache = call(state, tokens[:, s:s + chunk], cache)
        outs.append(y)
    return np.asarray(full), np.asarray(stepped), np.asarray(jnp.concatenate(outs, axis=1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_decode_parity(dtype):
    model = build_model(_cfg(f"model.dtype={dtype}", "model.tie_embeddings=false"), seed=1)
    tokens = jax.random.randint(jax.random.key(0), (2, 21), 0, 64)
    full, stepped, chunked = _logits_paths(model, tokens, prefill=5, chunk=8)
    tol = PARITY_TOL[jnp.float32 if dtype == "float32" else jnp.bfloat16]
    assert relative_error(stepped, full) < tol
    assert relative_error(chunked, full) < tol


def test_mixer_pattern_cycles_and_params_are_float32():
    cfg = _cfg("model.n_layers=5", "model.dtype=bfloat16")
    model = build_model(cfg)
    assert [b.mixer_name for b in model.blocks] == ["swa", "swa", "attn", "swa", "swa"]
    windows = [b.mixer.window for b in model.blocks]
    assert windows == [6, 6, None, 6, 6]
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
    logits, _ = model(jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 4, 64)


def test_tied_embeddings_share_the_table():
    tied = build_model(_cfg("model.tie_embeddings=true"))
    untied = build_model(_cfg("model.tie_embeddings=false"))
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert count(untied) - count(tied) == 32 * 64
    assert tied.head is None


def test_d_ff_zero_builds_mixer_only_blocks():
    """model.d_ff 0 (Mamba-2's stack): no MLP parameters, and the same function as a model whose
    MLPs output zero (their down-projections zeroed), from the same initial mixers."""
    with_mlp = build_model(_cfg("model.dtype=float32"), seed=3)
    without = build_model(_cfg("model.dtype=float32", "model.d_ff=0"), seed=3)
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    d, f = 32, with_mlp.blocks[0].mlp.down.kernel.shape[0]
    assert count(with_mlp) - count(without) == 3 * (3 * d * f + d)   # SwiGLU + its norm
    assert all(b.mlp is None and b.mlp_norm is None for b in without.blocks)
    for a, b in zip(with_mlp.blocks, without.blocks):
        nnx.update(b.mixer, nnx.state(a.mixer))
        a.mlp.down.kernel[...] = jnp.zeros_like(a.mlp.down.kernel[...])
    nnx.update(without.embed, nnx.state(with_mlp.embed))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    np.testing.assert_array_equal(np.asarray(without(tokens)[0]),
                                  np.asarray(with_mlp(tokens)[0]))


def test_causality_future_tokens_do_not_change_past_logits():
    model = build_model(_cfg("model.dtype=float32"))
    a = jax.random.randint(jax.random.key(1), (1, 16), 0, 64)
    b = a.at[:, 10:].set((a[:, 10:] + 7) % 64)
    la, _ = model(a)
    lb, _ = model(b)
    np.testing.assert_allclose(la[:, :10], lb[:, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(la[:, 10:], lb[:, 10:])


def _moved(params, direction, step):
    return jax.tree.map(lambda p, d: p + step * d, params, direction)


def test_loss_gradients_match_finite_differences():
    model = build_model(_cfg("model.dtype=float32"), seed=2)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 64)
    mask = jnp.ones((2, 11))

    def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens[:, :-1])
        return lm_loss(logits, tokens[:, 1:], mask)[0]

    grads = jax.grad(loss)(params)
    g_leaves, treedef = jax.tree.flatten(grads)
    g_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in g_leaves))
    keys = jax.random.split(jax.random.key(4), len(g_leaves))
    random_dir = [jax.random.normal(k, g.shape) for k, g in zip(keys, g_leaves)]
    r_norm = jnp.sqrt(sum(jnp.sum(r * r) for r in random_dir))
    # Directional derivatives along unit directions (the gradient's own, and a random one) by
    # central differences; eps = 1e-2 in a unit direction moves each weight by ~1e-5, where
    # float32 round-off in the loss (~1e-7) and curvature both stay below the tolerance.
    for direction in ([g / g_norm for g in g_leaves], [r / r_norm for r in random_dir]):
        d_tree = jax.tree.unflatten(treedef, direction)
        eps = 1e-2
        fd = (loss(_moved(params, d_tree, eps)) - loss(_moved(params, d_tree, -eps))) / (2 * eps)
        analytic = sum(jnp.vdot(g, d) for g, d in zip(g_leaves, direction))
        assert abs(float(fd) - float(analytic)) < 2e-2 * float(g_norm), (fd, analytic)
    assert float(g_norm) > 1e-3


def test_large_preset_shapes_via_eval_shape():
    cfg = load_config("configs/quickstart.yaml", [
        "model.d_model=2048", "model.n_layers=24", "model.n_heads=16", "model.n_kv_heads=4",
        "model.vocab_size=32000", "model.max_len=4096", "model.mixers=[swa, swa, attn]",
        "model.mixer_args.swa.window=1024"]).model
    shapes = nnx.eval_shape(lambda: build_model(cfg))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    head_dim = 2048 // 16
    per_layer = 2048 * (16 + 2 * 4) * head_dim + 16 * head_dim * 2048 + 3 * 2048 * 5504 + 2 * 2048
    assert n == 32000 * 2048 + 24 * per_layer + 2048
