"""delta_rule op: the chunkwise WY form (xla) against the token-by-token reference — values,
gradients of every input, long-sequence stability, chunked continuation and bf16 inputs.

Shape legend: B batch, T time, H heads, K key dim, V value dim. K != V so a transposed state
cannot pass by accident.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backends import interpret_kernels
from pallas_kernels.delta_rule import delta_rule, delta_rule_reference, delta_rule_xla

B, H, K, V = 2, 2, 16, 8
# max |xla - reference| / max |reference|, per tensor. float32 differs only by summation order
# and the triangular solve (measured <= 6e-7 for values and gradients).
F32_TOL = 1e-4
# bf16 inputs (8 mantissa bits) against the float32 reference on the unrounded inputs: input
# rounding propagates through the recurrence and the output is rounded to bf16 again
# (measured <= 5e-3).
BF16_TOL = 1.5e-2


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def make_inputs(t, seed, *, b=B, h=H, dk=K, dv=V, beta_bias=0.0):
    """Random q, k (L2-normalised), v, beta = sigmoid(randn + bias), initial state, cotangents."""
    ks = jax.random.split(jax.random.key(seed), 7)
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = jax.random.normal(ks[1], (b, t, h, dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, dv))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)) + beta_bias)
    s0 = jax.random.normal(ks[4], (b, h, dk, dv))
    ct_o = jax.random.normal(ks[5], (b, t, h, dv))
    ct_s = jax.random.normal(ks[6], (b, h, dk, dv))
    return q, k, v, beta, s0, ct_o, ct_s


@functools.partial(jax.jit, static_argnames=("backend", "chunk_size"))
def values_and_grads(q, k, v, beta, s0, ct_o, ct_s, *, backend, chunk_size=64):
    """(o, final_state, grads wrt (q, k, v, beta, s0)) of loss = sum(o ct_o) + sum(S ct_s)."""
    def loss(q, k, v, beta, s0):
        o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True,
                          chunk_size=chunk_size, backend=backend)
        return jnp.sum(o * ct_o) + jnp.sum(s * ct_s), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        q, k, v, beta, s0)
    return o, s, grads


@functools.cache
def reference_case(t):
    """The reference's values and gradients for one random case (shared across chunk sizes)."""
    return values_and_grads(*make_inputs(t, seed=t), backend="reference")


# Gradients on the edge cases that matter: one step, a padded tail, several chunks, a second
# chunk size. T = 64 (no padding) is covered by the forward tests below.
@pytest.mark.parametrize("t,chunk_size", [(1, 64), (63, 64), (200, 64), (200, 16)])
def test_xla_matches_reference_with_initial_state(t, chunk_size):
    # Values (o, final state) and the gradients of every input, initial state included.
    o_ref, s_ref, g_ref = reference_case(t)
    o, s, g = values_and_grads(*make_inputs(t, seed=t), backend="xla", chunk_size=chunk_size)
    assert o.shape == (B, t, H, V) and s.shape == (B, H, K, V) and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < F32_TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < F32_TOL, rel_err(s, s_ref)
    for name, a, b in zip(["q", "k", "v", "beta", "initial_state"], g, g_ref):
        assert np.all(np.isfinite(a)), name
        assert rel_err(a, b) < F32_TOL, (name, rel_err(a, b))


_xla = jax.jit(functools.partial(delta_rule_xla, output_final_state=True))
_ref = jax.jit(functools.partial(delta_rule_reference, output_final_state=True))


@pytest.mark.parametrize("t,with_init", [(1, False), (63, False), (64, False), (64, True),
                                         (200, False)])
def test_xla_matches_reference_forward(t, with_init):
    # initial_state=None is the zero state; values only (gradients are checked above).
    q, k, v, beta, s0, _, _ = make_inputs(t, seed=t + 500)
    s0 = s0 if with_init else None
    (o, s), (o_ref, s_ref) = _xla(q, k, v, beta, initial_state=s0), _ref(q, k, v, beta,
                                                                        initial_state=s0)
    assert rel_err(o, o_ref) < F32_TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < F32_TOL, rel_err(s, s_ref)


def test_long_sequence_is_finite_and_correct():
    # T = 8192 with beta near 1 (each write almost overwrites the slot): values, state and
    # gradients stay finite, and the chunked form still tracks the reference.
    q, k, v, beta, s0, ct_o, ct_s = make_inputs(8192, seed=7, b=1, h=1, dk=16, dv=16,
                                                beta_bias=6.0)
    assert float(beta.min()) > 0.9
    o, s, grads = values_and_grads(q, k, v, beta, s0, ct_o, ct_s, backend="xla")
    for x in (o, s, *grads):
        assert np.all(np.isfinite(x))
    o_ref, s_ref = _ref(q, k, v, beta, initial_state=s0)
    assert rel_err(o, o_ref) < F32_TOL and rel_err(s, s_ref) < F32_TOL


def test_chunked_continuation():
    # All T at once == the first P steps (keeping the state) then the rest from that state;
    # P = 100 is not a chunk multiple, so the first call's padded tail must leave S untouched.
    t, p = 200, 100                      # both halves one shape: one compile
    q, k, v, beta, s0, _, _ = make_inputs(t, seed=3)
    o_all, s_all = _xla(q, k, v, beta, initial_state=s0)
    o1, s1 = _xla(q[:, :p], k[:, :p], v[:, :p], beta[:, :p], initial_state=s0)
    o2, s2 = _xla(q[:, p:], k[:, p:], v[:, p:], beta[:, p:], initial_state=s1)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o_all) < F32_TOL
    assert rel_err(s2, s_all) < F32_TOL


def test_bf16_inputs():
    # bf16 inputs are computed in float32 inside, so (1) against the float32 reference on the
    # same bf16-rounded values, o is that reference rounded once to bf16 (relative error at
    # most the bf16 unit roundoff 2^-8) and the float32 state matches tightly; (2) against the
    # reference on the unrounded inputs, the 8-bit input rounding adds a few 1e-3 (measured
    # max ~5e-3 for o and the state), checked at BF16_TOL.
    q, k, v, beta, s0, _, _ = make_inputs(63, seed=11)
    inputs = [x.astype(jnp.bfloat16) for x in (q, k, v, beta)]
    o, s = _xla(*inputs, initial_state=s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_rounded, s_rounded = _ref(*[x.astype(jnp.float32) for x in inputs], initial_state=s0)
    o32, o_rounded = np.asarray(o, np.float32), np.asarray(o_rounded)
    assert np.all(np.abs(o32 - o_rounded) <= 2.0 ** -8 * np.abs(o_rounded) + 1e-6)
    assert rel_err(s, s_rounded) < F32_TOL, rel_err(s, s_rounded)
    o_ref, s_ref = _ref(q, k, v, beta, initial_state=s0)
    assert rel_err(o, o_ref) < BF16_TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < BF16_TOL, rel_err(s, s_ref)


def test_public_api_defaults_and_errors():
    q, k, v, beta, _, _, _ = make_inputs(5, seed=5)
    op = jax.jit(delta_rule, static_argnames=("backend",))
    o_auto, s_none = op(q, k, v, beta)
    assert s_none is None and o_auto.dtype == q.dtype
    o_ref, _ = op(q, k, v, beta, scale=K ** -0.5, backend="reference")
    assert rel_err(o_auto, o_ref) < F32_TOL
    with interpret_kernels(False), pytest.raises(
            ValueError, match="delta_rule: backend 'pallas_gpu' is a GPU kernel and this is cpu"):
        delta_rule(q, k, v, beta, backend="pallas")
    with pytest.raises(ValueError, match="choose one of .auto., .reference., .xla."):
        delta_rule(q, k, v, beta, backend="triton")
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[..., :1])
