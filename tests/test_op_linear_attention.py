"""linear_attention: the chunkwise XLA path against the token-by-token reference (values and
gradients of every input, with and without the normalizer), stability at T = 8192, chunked
continuation (what decoding relies on), bf16 inputs, and the state / backend conventions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backends import interpret_kernels
from pallas_kernels.linear_attention import linear_attention

B, H, K, V = 2, 2, 8, 6          # K != V so that a swapped state axis cannot pass
# float32: the two paths differ only in summation order; errors are measured relative to the
# largest reference entry, a few hundred ulps of headroom.
TOL32 = 2e-5
# bf16 inputs are rounded the same way for both paths (the reference sees them upcast), and
# compute is float32, so what differs is the bf16 rounding of o: 2^-9 relative, plus margin.
TOL16 = 1e-2


def _inputs(t, normalize, seed=0, dtype=jnp.float32, b=B, h=H, k_dim=K, v_dim=V):
    """q, k, v, initial state and loss cotangents; numpy-generated (no eager compiles).

    With normalize, q and k go through elu + 1 (Katharopoulos et al. 2020, Eq. 7) so that the
    denominator is positive, which is the regime the normalizer is defined for.
    """
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    q, k, v = normal(b, t, h, k_dim), normal(b, t, h, k_dim), normal(b, t, h, v_dim)
    s0, ct, cs = normal(b, h, k_dim, v_dim), normal(b, t, h, v_dim), normal(b, h, k_dim, v_dim)
    if normalize:
        elu1 = lambda x: np.where(x > 0, x + 1.0, np.exp(x)).astype(np.float32)
        q, k = elu1(q), elu1(k)
        s0 = (s0, np.abs(normal(b, h, k_dim)) * t)      # z0: a plausible positive key sum
        cs = (cs, normal(b, h, k_dim))
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), jax.tree.map(jnp.asarray, s0), jnp.asarray(ct), \
        jax.tree.map(jnp.asarray, cs)


@functools.partial(jax.jit, static_argnames=("normalize", "backend", "with_init", "chunk_size"))
def _run(q, k, v, s0, *, normalize, backend, with_init, chunk_size=64):
    return linear_attention(q, k, v, normalize=normalize, initial_state=s0 if with_init else None,
                            output_final_state=True, chunk_size=chunk_size, backend=backend)


@functools.partial(jax.jit, static_argnames=("normalize", "backend", "chunk_size"))
def _run_with_grads(q, k, v, s0, ct, cs, *, normalize, backend, chunk_size=64):
    """o, final state, and d(sum(o * ct) + sum(final_state * cs)) / d(q, k, v, s0)."""
    def loss(q, k, v, s0):
        o, s = linear_attention(q, k, v, normalize=normalize, initial_state=s0,
                                output_final_state=True, chunk_size=chunk_size, backend=backend)
        state_term = sum(jnp.sum(a * c) for a, c in zip(jax.tree.leaves(s), jax.tree.leaves(cs)))
        return jnp.sum(o * ct) + state_term, (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=range(4), has_aux=True)(q, k, v, s0)
    return o, s, grads


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)


def _assert_trees_close(got, ref, tol):
    for x, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        assert x.shape == r.shape
        assert _rel_err(x, r) < tol, _rel_err(x, r)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("t", [1, 63, 64, 200])
@pytest.mark.parametrize("with_init", [False, True])
def test_xla_matches_reference(normalize, t, with_init):
    q, k, v, s0, *_ = _inputs(t, normalize, seed=t + 1000 * with_init)
    ref = _run(q, k, v, s0, normalize=normalize, backend="reference", with_init=with_init)
    got = _run(q, k, v, s0, normalize=normalize, backend="xla", with_init=with_init)
    assert got[0].shape == (B, t, H, V) and got[0].dtype == q.dtype
    if normalize:                          # the state is the tuple (S, z)
        assert got[1][0].shape == (B, H, K, V) and got[1][1].shape == (B, H, K)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got[1]))
    _assert_trees_close(got, ref, TOL32)


# Gradients compile slowly on CPU, so they run on fewer shapes: a padded single chunk, several
# chunks, and small chunks; always with an initial state so that its gradient is checked too.
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("t,chunk_size", [(63, 64), (200, 64), (200, 16)])
def test_xla_gradients_match_reference(normalize, t, chunk_size):
    q, k, v, s0, ct, cs = _inputs(t, normalize, seed=t + 7)
    ref = _run_with_grads(q, k, v, s0, ct, cs, normalize=normalize, backend="reference")
    got = _run_with_grads(q, k, v, s0, ct, cs, normalize=normalize, backend="xla",
                          chunk_size=chunk_size)
    _assert_trees_close(got, ref, TOL32)


@pytest.mark.parametrize("normalize", [False, True])
def test_long_sequence_is_finite(normalize):
    q, k, v, s0, ct, cs = _inputs(8192, normalize, seed=11, b=1, h=1, k_dim=16, v_dim=16)
    o, s, grads = _run_with_grads(q, k, v, s0, ct, cs, normalize=normalize, backend="xla")
    for x in jax.tree.leaves((o, s, grads)):
        assert bool(jnp.all(jnp.isfinite(x)))
    ref = _run(q, k, v, s0, normalize=normalize, backend="reference", with_init=True)
    # Without decay the state grows like T; still float32-accurate relative to its size.
    _assert_trees_close((o, s), ref, TOL32)


@pytest.mark.parametrize("normalize", [False, True])
def test_chunked_continuation(normalize):
    # T = 200 split at P = 100 (not a chunk multiple): prefill then continue from its state.
    q, k, v, s0, *_ = _inputs(200, normalize, seed=3)
    run = functools.partial(_run, normalize=normalize, backend="xla")
    o_full, s_full = run(q, k, v, s0, with_init=False)
    o1, s1 = run(q[:, :100], k[:, :100], v[:, :100], s0, with_init=False)
    o2, s2 = run(q[:, 100:], k[:, 100:], v[:, 100:], s1, with_init=True)
    _assert_trees_close((jnp.concatenate([o1, o2], axis=1), s2), (o_full, s_full), TOL32)


@pytest.mark.parametrize("normalize", [False, True])
def test_bf16_inputs(normalize):
    q32, k32, v32, s0, *_ = _inputs(200, normalize, seed=5)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
    o, s = _run(q, k, v, s0, normalize=normalize, backend="xla", with_init=True)
    assert o.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s))
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    o_ref, s_ref = _run(*up, s0, normalize=normalize, backend="reference", with_init=True)
    assert _rel_err(o, o_ref) < TOL16
    # The state is never rounded to bf16: only summation order differs.
    _assert_trees_close(s, s_ref, TOL32)
    # Against the unrounded float32 inputs, the inputs' own bf16 rounding adds about as much.
    o_ref32, _ = _run(q32, k32, v32, s0, normalize=normalize, backend="reference",
                      with_init=True)
    assert _rel_err(o, o_ref32) < 2 * TOL16


def test_state_format_and_backend_errors():
    q, k, v, s0, *_ = _inputs(5, normalize=True)
    with pytest.raises(ValueError, match="tuple"):
        linear_attention(q, k, v, normalize=True, initial_state=s0[0])
    with pytest.raises(ValueError, match="tuple"):
        linear_attention(q, k, v, normalize=False, initial_state=s0)
    o_auto, _ = linear_attention(q, k, v)
    o_xla, _ = linear_attention(q, k, v, backend="xla")
    np.testing.assert_array_equal(o_auto, o_xla)
    with interpret_kernels(False), pytest.raises(
            ValueError, match="linear_attention: backend 'pallas_gpu' is a GPU kernel and this"):
        linear_attention(q, k, v, backend="pallas")
    with pytest.raises(ValueError, match="'reference', 'xla'"):
        linear_attention(q, k, v, backend="cuda")
