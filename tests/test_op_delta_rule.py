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

from pallas_kernels.delta_rule import delta_rule, delta_rule_reference, delta_rule_xla

B, H, K, V = 2, 2, 16, 8
# max |xla - reference| / max |reference|, per tensor. float32 differs only by summation order
# and the triangular solve; measured <= ~1e-6 for values, ~1e-6 for gradients.
F32_TOL = 1e-4
# bf16 inputs (rounded to 8 mantissa bits) against the float32 reference on the unrounded
# inputs: input rounding (~2^-9 relative) propagates through the recurrence and the output is
# rounded to bf16 again; measured ~1e-2.
BF16_TOL = 3e-2


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
def run_case(t, with_init, chunk_size):
    """Both backends on one random case; cached so the value and gradient tests share it."""
    q, k, v, beta, s0, ct_o, ct_s = make_inputs(t, seed=t + 1000 * with_init)
    s0 = s0 if with_init else None
    ref = values_and_grads(q, k, v, beta, s0, ct_o, ct_s, backend="reference")
    xla = values_and_grads(q, k, v, beta, s0, ct_o, ct_s, backend="xla", chunk_size=chunk_size)
    return ref, xla


CASES = [(t, init, 64) for t in (1, 63, 64, 200) for init in (False, True)] + [(200, True, 16)]
NAMES = ["q", "k", "v", "beta", "initial_state"]


@pytest.mark.parametrize("t,with_init,chunk_size", CASES)
def test_xla_matches_reference(t, with_init, chunk_size):
    (o_ref, s_ref, _), (o, s, _) = run_case(t, with_init, chunk_size)
    assert o.shape == (B, t, H, V) and s.shape == (B, H, K, V) and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < F32_TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < F32_TOL, rel_err(s, s_ref)


@pytest.mark.parametrize("t,with_init,chunk_size", CASES)
def test_xla_gradients_match_reference(t, with_init, chunk_size):
    (_, _, g_ref), (_, _, g) = run_case(t, with_init, chunk_size)
    for name, a, b in zip(NAMES, g, g_ref):
        if b is None:                        # no initial state given: nothing to differentiate
            assert not with_init and name == "initial_state"
            continue
        assert np.all(np.isfinite(a)), name
        assert rel_err(a, b) < F32_TOL, (name, rel_err(a, b))


def test_long_sequence_is_finite_and_correct():
    # T = 8192 with beta near 1 (each write almost overwrites the slot): values, state and
    # gradients stay finite, and the chunked form still tracks the reference.
    q, k, v, beta, s0, ct_o, ct_s = make_inputs(8192, seed=7, b=1, h=1, dk=16, dv=16,
                                                beta_bias=6.0)
    assert float(beta.min()) > 0.9
    o, s, grads = values_and_grads(q, k, v, beta, s0, ct_o, ct_s, backend="xla")
    for x in (o, s, *grads):
        assert np.all(np.isfinite(x))
    o_ref, s_ref = jax.jit(functools.partial(delta_rule_reference, output_final_state=True))(
        q, k, v, beta, initial_state=s0)
    assert rel_err(o, o_ref) < F32_TOL and rel_err(s, s_ref) < F32_TOL


_xla = jax.jit(functools.partial(delta_rule_xla, output_final_state=True))


def test_chunked_continuation():
    # All T at once == the first P steps (keeping the state) then the rest from that state;
    # P is not a chunk multiple, so the padded tail of the first call must leave S untouched.
    t, p = 200, 70
    q, k, v, beta, s0, _, _ = make_inputs(t, seed=3)
    o_all, s_all = _xla(q, k, v, beta, initial_state=s0)
    o1, s1 = _xla(q[:, :p], k[:, :p], v[:, :p], beta[:, :p], initial_state=s0)
    o2, s2 = _xla(q[:, p:], k[:, p:], v[:, p:], beta[:, p:], initial_state=s1)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o_all) < F32_TOL
    assert rel_err(s2, s_all) < F32_TOL


def test_bf16_inputs():
    q, k, v, beta, s0, _, _ = make_inputs(63, seed=11)
    o_ref, s_ref = delta_rule_reference(q, k, v, beta, initial_state=s0, output_final_state=True)
    bf = lambda x: x.astype(jnp.bfloat16)
    o, s = _xla(bf(q), bf(k), bf(v), bf(beta), initial_state=s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < BF16_TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < BF16_TOL, rel_err(s, s_ref)


def test_public_api_defaults_and_errors():
    q, k, v, beta, _, _, _ = make_inputs(5, seed=5)
    o_auto, s_none = delta_rule(q, k, v, beta)
    assert s_none is None and o_auto.dtype == q.dtype
    o_ref, _ = delta_rule(q, k, v, beta, scale=K ** -0.5, backend="reference")
    assert rel_err(o_auto, o_ref) < F32_TOL
    o_half, _ = delta_rule(q, k, v, beta, scale=0.5 * K ** -0.5)   # o is linear in the scale
    assert rel_err(2 * o_half, o_auto) < F32_TOL
    with pytest.raises(ValueError, match="pallas.*not built"):
        delta_rule(q, k, v, beta, backend="pallas")
    with pytest.raises(ValueError, match="allowed: auto, reference, xla"):
        delta_rule(q, k, v, beta, backend="triton")
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[..., :1])
