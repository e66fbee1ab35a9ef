"""kda op (Kimi Delta Attention): the chunkwise form (xla) against the token-by-token reference:
values, final states and the gradients of every input under a per-channel decay, strong gates
that would overflow the factored decay ratios, chunked continuation, bf16 inputs, and what KDA
reduces to (a gate equal across channels is Gated DeltaNet). Packed documents, the Pallas
backend and the libraries are in tests/test_packed_ops.py, test_op_pallas.py and
test_library_backends.py.

Shape legend: B batch, T time, H heads, K key dim, V value dim (K != V).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.gated_delta_rule import gated_delta_rule_reference
from pallas_kernels.kda import kda, kda_reference, kda_xla
from tests.parity import relative_error

B, H, K, V = 2, 2, 16, 8
# float32: summation order and the triangular solve (measured <= 5.9e-7 relative).
F32_TOL = 1e-4
# bf16 q, k, v and bf16 matmul operands against the float32 reference on the unrounded inputs
# (measured <= 9.8e-3 relative, beta's gradient; values 3.9e-3).
BF16_TOL = 1.5e-2


def make_inputs(t, seed, *, b=B, h=H, dk=K, dv=V):
    """q, k (L2-normalised), v, g = -softplus(randn - 3) per channel, beta, initial state,
    cotangents."""
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = jax.random.normal(ks[1], (b, t, h, dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (b, t, h, dk)) - 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h)))
    s0 = jax.random.normal(ks[5], (b, h, dk, dv))
    return q, k, v, g, beta, s0, jax.random.normal(ks[6], (b, t, h, dv)), \
        jax.random.normal(ks[7], (b, h, dk, dv))


@functools.partial(jax.jit, static_argnames=("backend", "chunk_size", "precision"))
def values_and_grads(q, k, v, g, beta, s0, ct_o, ct_s, *, backend, chunk_size=64,
                     precision="auto"):
    def loss(q, k, v, g, beta, s0):
        o, s = kda(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                   chunk_size=chunk_size, backend=backend, precision=precision)
        return jnp.sum(o.astype(jnp.float32) * ct_o) + jnp.sum(s * ct_s), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=tuple(range(6)), has_aux=True)(
        q, k, v, g, beta, s0)
    return o, s, grads


@pytest.mark.parametrize("t,chunk_size", [(1, 64), (63, 64), (200, 64), (200, 16)])
def test_xla_matches_reference(t, chunk_size):
    inputs = make_inputs(t, seed=t)
    o_ref, s_ref, g_ref = values_and_grads(*inputs, backend="reference")
    o, s, grads = values_and_grads(*inputs, backend="xla", chunk_size=chunk_size)
    assert o.shape == (B, t, H, V) and s.shape == (B, H, K, V) and s.dtype == jnp.float32
    assert relative_error(o, o_ref) < F32_TOL
    assert relative_error(s, s_ref) < F32_TOL
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, g_ref):
        assert np.isfinite(np.asarray(a)).all(), name
        assert relative_error(a, b) < F32_TOL, (name, relative_error(a, b))


def test_strong_per_channel_gates_stay_finite_and_correct():
    """Half the channels decay by -5 per step over long stretches: within a 64-token chunk
    their cumulative gate reaches -320, so the factored ratio exp(-G_j) would be inf (and
    inf * 0 = NaN in the values and gradients); the others barely decay, so the state still
    carries over chunk boundaries."""
    t = 512
    q, k, v, g, beta, s0, ct_o, ct_s = make_inputs(t, seed=7, b=1, h=1)
    strong = (jnp.arange(t) // 100 % 2 == 0)[None, :, None, None] & (jnp.arange(K) < K // 2)
    g = jnp.where(strong, -5.0, g)
    o, s, grads = values_and_grads(q, k, v, g, beta, s0, ct_o, ct_s, backend="xla")
    for x in (o, s, *grads):
        assert np.isfinite(np.asarray(x)).all()
    o_ref, s_ref, g_ref = values_and_grads(q, k, v, g, beta, s0, ct_o, ct_s,
                                           backend="reference")
    assert relative_error(o, o_ref) < F32_TOL and relative_error(s, s_ref) < F32_TOL
    for a, b in zip(grads, g_ref):
        assert relative_error(a, b) < F32_TOL


def test_a_gate_equal_across_channels_is_gated_deltanet():
    """With g_t the same in every key channel, diag(exp(g_t)) = exp(g_t) I: KDA is Gated
    DeltaNet (an independent reference, not this op's)."""
    q, k, v, g, beta, s0, _, _ = make_inputs(70, seed=3)
    o, s = jax.jit(functools.partial(kda_xla, output_final_state=True))(
        q, k, v, jnp.broadcast_to(g[..., :1], g.shape), beta, initial_state=s0)
    o_gdn, s_gdn = gated_delta_rule_reference(q, k, v, g[..., 0], beta, initial_state=s0,
                                              output_final_state=True)
    assert relative_error(o, o_gdn) < F32_TOL and relative_error(s, s_gdn) < F32_TOL


def test_chunked_continuation():
    """All T at once == the first 100 steps (keeping the state), then the rest from it."""
    q, k, v, g, beta, s0, _, _ = make_inputs(200, seed=5)
    run = jax.jit(functools.partial(kda, output_final_state=True, backend="xla"))
    o_all, s_all = run(q, k, v, g, beta, initial_state=s0)
    o1, s1 = run(*(x[:, :100] for x in (q, k, v, g, beta)), initial_state=s0)
    o2, s2 = run(*(x[:, 100:] for x in (q, k, v, g, beta)), initial_state=s1)
    assert relative_error(jnp.concatenate([o1, o2], axis=1), o_all) < F32_TOL
    assert relative_error(s2, s_all) < F32_TOL


def test_bf16_inputs_and_bf16_matmuls():
    """bf16 inputs with precision "bf16" (bf16 matmul operands, float32 state, gates and
    solve) against the float32 reference on the unrounded inputs."""
    inputs = make_inputs(63, seed=11)
    low = tuple(x.astype(jnp.bfloat16) for x in inputs[:3]) + inputs[3:]
    o, s, grads = values_and_grads(*low, backend="xla", precision="bf16")
    o_ref, s_ref, g_ref = values_and_grads(*inputs, backend="reference")
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert relative_error(o, o_ref) < BF16_TOL and relative_error(s, s_ref) < BF16_TOL
    for a, b in zip(grads, g_ref):
        assert relative_error(a, b) < BF16_TOL


def test_errors_name_the_argument():
    q, k, v, g, beta, s0, _, _ = make_inputs(5, seed=1)
    with pytest.raises(ValueError, match=r"kda: g must be \[B, T, H, K\]"):
        kda(q, k, v, g[..., 0], beta)
    with pytest.raises(ValueError, match="kda: beta must be"):
        kda(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="kda: unknown backend 'fla'"):
        kda(q, k, v, g, beta, backend="fla")
    o, s = kda(q, k, v, g, beta)
    assert s is None and o.dtype == q.dtype
    o_ref, _ = kda_reference(q, k, v, g, beta)
    assert relative_error(o, o_ref) < F32_TOL
