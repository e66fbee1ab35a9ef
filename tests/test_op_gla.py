"""gla / simple_gla: the chunkwise XLA path against the token-by-token reference (values and
gradients of every input), stability at T = 8192 with strongly negative gates, chunked
continuation (what decoding relies on), bf16 inputs, and backend selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gla import gla, simple_gla

OPS = {"gla": gla, "simple_gla": simple_gla}
B, H, K, V = 2, 2, 8, 6          # K != V so that a swapped state axis cannot pass
# float32: the two paths differ only in summation order; errors are measured relative to the
# largest reference entry (values ~1, sums over <= 200 tokens), a few hundred ulps of headroom.
TOL32 = 2e-5
# bf16 inputs are rounded the same way for both paths (the reference sees them upcast), and
# compute is float32, so what differs is the bf16 rounding of o: 2^-9 relative, plus margin.
TOL16 = 1e-2


def _inputs(op, t, seed=0, dtype=jnp.float32, k_dim=K, v_dim=V, b=B, h=H):
    kq, kk, kv, kg, ks, kc, kc2 = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(kq, (b, t, h, k_dim))
    k = jax.random.normal(kk, (b, t, h, k_dim))
    v = jax.random.normal(kv, (b, t, h, v_dim))
    gate_shape = (b, t, h, k_dim) if op == "gla" else (b, t, h)
    # Realistic gates: log_sigmoid of a unit normal, i.e. decays spread over ~(0.1, 0.9).
    g = jax.nn.log_sigmoid(jax.random.normal(kg, gate_shape) + 1.0)
    s0 = jax.random.normal(ks, (b, h, k_dim, v_dim))
    ct = jax.random.normal(kc, (b, t, h, v_dim))
    ct2 = jax.random.normal(kc2, (b, h, k_dim, v_dim))
    cast = lambda x: x.astype(dtype)
    return cast(q), cast(k), cast(v), cast(g), s0, ct, ct2


@functools.partial(jax.jit, static_argnames=("op", "backend", "chunk_size", "with_init"))
def _run_with_grads(q, k, v, g, s0, ct, ct2, *, op, backend, chunk_size=64, with_init=True):
    """o, final state, and d(sum(o * ct) + sum(S_T * ct2)) / d(q, k, v, g, s0)."""
    def loss(q, k, v, g, s0):
        o, s = OPS[op](q, k, v, g, initial_state=s0 if with_init else None,
                       output_final_state=True, chunk_size=chunk_size, backend=backend)
        return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(s * ct2), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=range(5), has_aux=True)(q, k, v, g, s0)
    return o, s, grads


@functools.partial(jax.jit, static_argnames=("op", "backend", "with_init"))
def _run(q, k, v, g, s0, *, op, backend, with_init):
    return OPS[op](q, k, v, g, initial_state=s0 if with_init else None, output_final_state=True,
                   backend=backend)


def _rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("t,with_init,chunk_size", [
    (1, False, 64), (1, True, 64), (63, False, 64), (63, True, 64), (64, False, 64),
    (64, True, 64), (200, False, 64), (200, True, 64),
    (200, True, 16),      # several sub-chunk-free chunks
    (200, True, 20),      # chunk not a multiple of the 16-token sub-chunk: one sub-chunk
])
def test_xla_matches_reference(op, t, with_init, chunk_size):
    q, k, v, g, s0, ct, ct2 = _inputs(op, t, seed=t + 1000 * with_init)
    ref = _run_with_grads(q, k, v, g, s0, ct, ct2, op=op, backend="reference",
                          with_init=with_init)
    got = _run_with_grads(q, k, v, g, s0, ct, ct2, op=op, backend="xla", chunk_size=chunk_size,
                          with_init=with_init)
    assert got[0].shape == (B, t, H, V) and got[0].dtype == q.dtype
    assert got[1].shape == (B, H, K, V) and got[1].dtype == jnp.float32
    names = ["o", "final_state", "dq", "dk", "dv", "dg"] + (["ds0"] if with_init else [])
    for name, x, r in zip(names, [got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        assert _rel_err(x, r) < TOL32, (name, _rel_err(x, r))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("gates", ["realistic", "minus5"])
def test_long_sequence_is_finite(op, gates):
    t = 8192
    q, k, v, g, s0, ct, ct2 = _inputs(op, t, seed=7, k_dim=16, v_dim=16, b=1, h=1)
    if gates == "realistic":
        g = jax.nn.log_sigmoid(jax.random.normal(jax.random.key(8), g.shape) * 2.0)
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
    q, k, v, g, s0, *_ = _inputs(op, 200, seed=5, dtype=jnp.bfloat16)
    o, s = _run(q, k, v, g, s0, op=op, backend="xla", with_init=True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    up = [x.astype(jnp.float32) for x in (q, k, v, g)]
    o_ref, s_ref = _run(*up, s0, op=op, backend="reference", with_init=True)
    assert _rel_err(o, o_ref) < TOL16
    # The state is never rounded to bf16: only summation order differs.
    assert _rel_err(s, s_ref) < TOL32


def test_backend_selection():
    q, k, v, g, *_ = _inputs("simple_gla", 5)
    o_auto, _ = simple_gla(q, k, v, g)
    o_xla, _ = simple_gla(q, k, v, g, backend="xla")
    np.testing.assert_array_equal(o_auto, o_xla)
    with pytest.raises(ValueError, match="not built yet"):
        simple_gla(q, k, v, g, backend="pallas")
    with pytest.raises(ValueError, match="'reference', 'xla'"):
        simple_gla(q, k, v, g, backend="triton")
    with pytest.raises(ValueError, match="shape mismatch"):
        gla(q, k, v, g)                      # gla needs a per-channel gate [B, T, H, K]
