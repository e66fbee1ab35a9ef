"""gla / simple_gla: the chunkwise XLA path against the token-by-token reference (values and
gradients of every input), stability at T = 8192 with strongly negative gates, chunked
continuation (what decoding relies on), bf16 inputs, and backend selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backends import interpret_kernels
from pallas_kernels.gla import gla, simple_gla

OPS = {"gla": gla, "simple_gla": simple_gla}
B, H, K, V = 2, 2, 8, 6          # K != V so that a swapped state axis cannot pass
# float32: the two paths differ only in summation order; errors are measured relative to the
# largest reference entry (values ~1, sums over <= 200 tokens), a few hundred ulps of headroom.
TOL32 = 2e-5
# bf16 inputs are rounded the same way for both paths (the reference sees them upcast), and
# compute is float32, so what differs is the bf16 rounding of o: 2^-9 relative, plus margin.
TOL16 = 1e-2


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _inputs(op, t, seed=0, dtype=jnp.float32, k_dim=K, v_dim=V, b=B, h=H):
    """q, k, v, gate, s0 and the loss cotangents ct, ct2; numpy-generated (no eager compiles)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    q, k, v = normal(b, t, h, k_dim), normal(b, t, h, k_dim), normal(b, t, h, v_dim)
    gate_shape = (b, t, h, k_dim) if op == "gla" else (b, t, h)
    # Realistic gates: log_sigmoid(N(1, 1)), i.e. decays spread over ~(0.3, 0.95).
    g = _log_sigmoid(normal(*gate_shape) + 1.0)
    s0, ct, ct2 = normal(b, h, k_dim, v_dim), normal(b, t, h, v_dim), normal(b, h, k_dim, v_dim)
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), cast(g), jnp.asarray(s0), jnp.asarray(ct), jnp.asarray(ct2)


@functools.partial(jax.jit, static_argnames=("op", "backend", "chunk_size", "with_init"))
def _run_with_grads(q, k, v, g, s0, ct, ct2, *, op, backend, chunk_size=64, with_init=True):
    """o, final state, and d(sum(o * ct) + sum(S_T * ct2)) / d(q, k, v, g, s0)."""
    def loss(q, k, v, g, s0):
        o, s = OPS[op](q, k, v, g, initial_state=s0 if with_init else None,
                       output_final_state=True, chunk_size=chunk_size, backend=backend)
        return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(s * ct2), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=range(5), has_aux=True)(q, k, v, g, s0)
    return o, s, grads


@functools.partial(jax.jit, static_argnames=("op", "backend", "with_init", "chunk_size"))
def _run(q, k, v, g, s0, *, op, backend, with_init, chunk_size=64):
    return OPS[op](q, k, v, g, initial_state=s0 if with_init else None, output_final_state=True,
                   chunk_size=chunk_size, backend=backend)


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("t", [1, 63, 64, 200])
@pytest.mark.parametrize("with_init", [False, True])
def test_xla_matches_reference(op, t, with_init):
    q, k, v, g, s0, *_ = _inputs(op, t, seed=t + 1000 * with_init)
    o_ref, s_ref = _run(q, k, v, g, s0, op=op, backend="reference", with_init=with_init)
    o, s = _run(q, k, v, g, s0, op=op, backend="xla", with_init=with_init)
    assert o.shape == (B, t, H, V) and o.dtype == q.dtype
    assert s.shape == (B, H, K, V) and s.dtype == jnp.float32
    assert _rel_err(o, o_ref) < TOL32 and _rel_err(s, s_ref) < TOL32


# Gradients compile slowly on CPU, so they run on fewer shapes: a padded single chunk, several
# chunks, small chunks, and (gla) a chunk that is not a multiple of the 8-token sub-chunk.
@pytest.mark.parametrize("op,t,chunk_size", [
    ("gla", 63, 64), ("gla", 200, 64), ("gla", 200, 16), ("gla", 200, 20),
    ("simple_gla", 63, 64), ("simple_gla", 200, 64), ("simple_gla", 200, 16),
])
def test_xla_gradients_match_reference(op, t, chunk_size):
    q, k, v, g, s0, ct, ct2 = _inputs(op, t, seed=t + 7)
    ref = _run_with_grads(q, k, v, g, s0, ct, ct2, op=op, backend="reference")
    got = _run_with_grads(q, k, v, g, s0, ct, ct2, op=op, backend="xla", chunk_size=chunk_size)
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "ds0"]
    for name, x, r in zip(names, [got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        assert _rel_err(x, r) < TOL32, (name, _rel_err(x, r))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("gates", ["realistic", "minus5"])
def test_long_sequence_is_finite(op, gates):
    t = 8192
    q, k, v, g, s0, ct, ct2 = _inputs(op, t, seed=7, k_dim=16, v_dim=16, b=1, h=1)
    if gates == "realistic":
        g = jnp.asarray(_log_sigmoid(np.random.default_rng(8).standard_normal(g.shape) * 2.0),
                        jnp.float32)
    else:
        # -5 per step: the cumulative gate reaches -320 in a 64-token chunk, where exp(-G) of a
        # naive factorization would overflow float32 (exp(88) ~ 3e38) after 18 steps.
        g = jnp.full(g.shape, -5.0)
    o, s, grads = _run_with_grads(q, k, v, g, s0, ct, ct2, op=op, backend="xla")
    for x in (o, s, *grads):
        assert bool(jnp.all(jnp.isfinite(x)))
    o_ref, s_ref = _run(q, k, v, g, s0, op=op, backend="reference", with_init=True)
    assert _rel_err(o, o_ref) < TOL32 and _rel_err(s, s_ref) < TOL32


@pytest.mark.parametrize("op", list(OPS))
def test_chunked_continuation(op):
    # T = 200 split at P = 100 (not a chunk multiple): prefill then continue from its state.
    q, k, v, g, s0, *_ = _inputs(op, 200, seed=3)
    o_full, s_full = _run(q, k, v, g, s0, op=op, backend="xla", with_init=False)
    first = [x[:, :100] for x in (q, k, v, g)]
    rest = [x[:, 100:] for x in (q, k, v, g)]
    o1, s1 = _run(*first, s0, op=op, backend="xla", with_init=False)
    o2, s2 = _run(*rest, s1, op=op, backend="xla", with_init=True)
    assert _rel_err(jnp.concatenate([o1, o2], axis=1), o_full) < TOL32
    assert _rel_err(s2, s_full) < TOL32


@pytest.mark.parametrize("op", list(OPS))
def test_bf16_inputs(op):
    q32, k32, v32, g32, s0, *_ = _inputs(op, 200, seed=5)
    q, k, v, g = (x.astype(jnp.bfloat16) for x in (q32, k32, v32, g32))
    o, s = _run(q, k, v, g, s0, op=op, backend="xla", with_init=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    up = [x.astype(jnp.float32) for x in (q, k, v, g)]
    o_ref, s_ref = _run(*up, s0, op=op, backend="reference", with_init=True)
    assert _rel_err(o, o_ref) < TOL16
    # The state is never rounded to bf16: only summation order differs.
    assert _rel_err(s, s_ref) < TOL32
    # Against the unrounded float32 inputs, the inputs' own bf16 rounding adds about as much.
    o_ref32, _ = _run(q32, k32, v32, g32, s0, op=op, backend="reference", with_init=True)
    assert _rel_err(o, o_ref32) < 2 * TOL16


def test_backend_selection():
    q, k, v, g, *_ = _inputs("simple_gla", 5)
    o_auto, _ = simple_gla(q, k, v, g)
    o_xla, _ = simple_gla(q, k, v, g, backend="xla")
    np.testing.assert_array_equal(o_auto, o_xla)
    with interpret_kernels(False), pytest.raises(
            ValueError, match="simple_gla: backend 'pallas_gpu' is a GPU kernel and this is cpu"):
        simple_gla(q, k, v, g, backend="pallas")
    with pytest.raises(ValueError, match="'reference', 'xla'"):
        simple_gla(q, k, v, g, backend="triton")
    with pytest.raises(ValueError, match="shape mismatch"):
        gla(q, k, v, g)                      # gla needs a per-channel gate [B, T, H, K]
