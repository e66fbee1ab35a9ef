"""gated_delta_rule op: the chunkwise gated WY form (xla) against the token-by-token reference —
values, gradients of every input (g included), long-sequence stability under strong gates,
chunked continuation and bf16 inputs.

Shape legend: B batch, T time, H heads, K key dim, V value dim. K != V so a transposed state
cannot pass by accident.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backends import interpret_kernels
from pallas_kernels.delta_rule import delta_rule_xla
from pallas_kernels.gated_delta_rule import (
    gated_delta_rule,
    gated_delta_rule_reference,
    gated_delta_rule_xla,
)

B, H, K, V = 2, 2, 16, 8
# max |xla - reference| / max |reference|, per tensor. float32 differs only by summation order
# and the triangular solve (measured <= 6e-7 for values and gradients).
F32_TOL = 1e-4
# bf16 inputs (8 mantissa bits) against the float32 reference on the unrounded inputs: input
# rounding propagates through the recurrence and the output is rounded to bf16 again
# (measured <= 6e-3).
BF16_TOL = 1.5e-2


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def make_inputs(t, seed, *, b=B, h=H, dk=K, dv=V, beta_bias=0.0):
    """Random q, k (L2-normalised), v, g = -softplus(randn - 3) (mean ~ -0.1, so the state
    carries over chunk boundaries), beta = sigmoid(randn + bias), initial state, cotangents."""
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (b, t, h, dk))
    k = jax.random.normal(ks[1], (b, t, h, dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[7], (b, t, h)) - 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)) + beta_bias)
    s0 = jax.random.normal(ks[4], (b, h, dk, dv))
    ct_o = jax.random.normal(ks[5], (b, t, h, dv))
    ct_s = jax.random.normal(ks[6], (b, h, dk, dv))
    return q, k, v, g, beta, s0, ct_o, ct_s


@functools.partial(jax.jit, static_argnames=("backend", "chunk_size"))
def values_and_grads(q, k, v, g, beta, s0, ct_o, ct_s, *, backend, chunk_size=64):
    """(o, final_state, grads wrt (q, k, v, g, beta, s0)) of sum(o ct_o) + sum(S ct_s)."""
    def loss(q, k, v, g, beta, s0):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                chunk_size=chunk_size, backend=backend)
        return jnp.sum(o * ct_o) + jnp.sum(s * ct_s), (o, s)

    (_, (o, s)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), has_aux=True)(
        q, k, v, g, beta, s0)
    return o, s, grads


@functools.cache
def reference_case(t):
    """The reference's values and gradients for one random case (shared across chunk sizes)."""
    return values_and_grads(*make_inputs(t, seed=t), backend="reference")


# Gradients on the edge cases that matter: one step, a padded tail, several chunks, a second
# chunk size. T = 64 (no padding) is covered by the forward tests below.
@pytest.mark.parametrize("t,chunk_size", [(1, 64), (63, 64), (200, 64), (200, 16)])
def test_xla_matches_reference_with_initial_state(t, chunk_size):
    # Values (o, final state) and the gradients of every input, g and initial state included.
    o_ref, s_ref, g_ref = reference_case(t)
    o, s, g = values_and_grads(*make_inputs(t, seed=t), backend="xla", chunk_size=chunk_size)
    assert o.shape == (B, t, H, V) and s.shape == (B, H, K, V) and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < F32_TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < F32_TOL, rel_err(s, s_ref)
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], g, g_ref):
        assert np.all(np.isfinite(a)), name
        assert rel_err(a, b) < F32_TOL, (name, rel_err(a, b))


_xla = jax.jit(functools.partial(gated_delta_rule_xla, output_final_state=True))
_ref = jax.jit(functools.partial(gated_delta_rule_reference, output_final_state=True))


@pytest.mark.parametrize("t,with_init", [(1, False), (63, False), (64, False), (64, True),
                                         (200, False)])
def test_xla_matches_reference_forward(t, with_init):
    # initial_state=None is the zero state; values only (gradients are checked above).
    q, k, v, g, beta, s0, _, _ = make_inputs(t, seed=t + 500)
    s0 = s0 if with_init else None
    o, s = _xla(q, k, v, g, beta, initial_state=s0)
    o_ref, s_ref = _ref(q, k, v, g, beta, initial_state=s0)
    assert rel_err(o, o_ref) < F32_TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < F32_TOL, rel_err(s, s_ref)


def test_zero_gates_give_the_delta_rule():
    q, k, v, g, beta, s0, _, _ = make_inputs(63, seed=563)
    o, s = _xla(q, k, v, jnp.zeros_like(g), beta, initial_state=s0)
    o_d, s_d = jax.jit(functools.partial(delta_rule_xla, output_final_state=True))(
        q, k, v, beta, initial_state=s0)
    assert rel_err(o, o_d) < F32_TOL and rel_err(s, s_d) < F32_TOL


def test_long_sequence_strong_gates_is_finite_and_correct():
    # T = 8192, beta near 1, and stretches of g = -5: within a chunk G_t - G_j then reaches
    # +315 above the diagonal, which overflows exp unless masked first. Values, state and
    # gradients must stay finite and still track the reference.
    t = 8192
    q, k, v, g, beta, s0, ct_o, ct_s = make_inputs(t, seed=7, b=1, h=1, dk=16, dv=16,
                                                   beta_bias=6.0)
    strong = (jnp.arange(t) // 300 % 2 == 0)[None, :, None]
    g = jnp.where(strong, -5.0, g)
    assert float(beta.min()) > 0.9
    o, s, grads = values_and_grads(q, k, v, g, beta, s0, ct_o, ct_s, backend="xla")
    for x in (o, s, *grads):
        assert np.all(np.isfinite(x))
    o_ref, s_ref = _ref(q, k, v, g, beta, initial_state=s0)
    assert rel_err(o, o_ref) < F32_TOL and rel_err(s, s_ref) < F32_TOL


def test_chunked_continuation():
    # All T at once == the first P steps (keeping the state) then the rest from that state;
    # P = 100 is not a chunk multiple, so the first call's padded tail must leave S untouched.
    t, p = 200, 100                      # both halves one shape: one compile
    q, k, v, g, beta, s0, _, _ = make_inputs(t, seed=3)
    o_all, s_all = _xla(q, k, v, g, beta, initial_state=s0)
    first = [x[:, :p] for x in (q, k, v, g, beta)]
    rest = [x[:, p:] for x in (q, k, v, g, beta)]
    o1, s1 = _xla(*first, initial_state=s0)
    o2, s2 = _xla(*rest, initial_state=s1)
    assert rel_err(jnp.concatenate([o1, o2], axis=1), o_all) < F32_TOL
    assert rel_err(s2, s_all) < F32_TOL


def test_bf16_inputs():
    # bf16 inputs are computed in float32 inside, so (1) against the float32 reference on the
    # same bf16-rounded values, o is that reference rounded once to bf16 (relative error at
    # most the bf16 unit roundoff 2^-8) and the float32 state matches tightly; (2) against the
    # reference on the unrounded inputs, the 8-bit input rounding adds a few 1e-3 (measured
    # max ~5e-3 for o and the state), checked at BF16_TOL.
    q, k, v, g, beta, s0, _, _ = make_inputs(63, seed=11)
    inputs = [x.astype(jnp.bfloat16) for x in (q, k, v, g, beta)]
    o, s = _xla(*inputs, initial_state=s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_rounded, s_rounded = _ref(*[x.astype(jnp.float32) for x in inputs], initial_state=s0)
    o32, o_rounded = np.asarray(o, np.float32), np.asarray(o_rounded)
    assert np.all(np.abs(o32 - o_rounded) <= 2.0 ** -8 * np.abs(o_rounded) + 1e-6)
    assert rel_err(s, s_rounded) < F32_TOL, rel_err(s, s_rounded)
    o_ref, s_ref = _ref(q, k, v, g, beta, initial_state=s0)
    assert rel_err(o, o_ref) < BF16_TOL, rel_err(o, o_ref)
    assert rel_err(s, s_ref) < BF16_TOL, rel_err(s, s_ref)


def test_public_api_defaults_and_errors():
    q, k, v, g, beta, _, _, _ = make_inputs(5, seed=5)
    op = jax.jit(gated_delta_rule, static_argnames=("backend",))
    o_auto, s_none = op(q, k, v, g, beta)
    assert s_none is None and o_auto.dtype == q.dtype
    o_ref, _ = op(q, k, v, g, beta, scale=K ** -0.5, backend="reference")
    assert rel_err(o_auto, o_ref) < F32_TOL
    with interpret_kernels(False), pytest.raises(
            ValueError, match="gated_delta_rule: backend 'pallas_gpu' is a GPU kernel and this"):
        gated_delta_rule(q, k, v, g, beta, backend="pallas")
    with pytest.raises(ValueError, match="choose one of .auto., .reference., .xla."):
        gated_delta_rule(q, k, v, g, beta, backend="triton")
    with pytest.raises(ValueError, match="g must be"):
        gated_delta_rule(q, k, v, g[..., :1], beta)


def test_short_sequences_take_a_shorter_chunk_not_padding():
    from pallas_kernels.chunking import fitted_chunk_size

    # T below one chunk: the next power of two >= 16 (a legal Pallas block); else the chunk.
    assert [fitted_chunk_size(t, 64) for t in (1, 16, 17, 32, 33, 63, 64, 200)] == \
        [16, 16, 32, 32, 64, 64, 64, 64]
    assert fitted_chunk_size(20, 128) == 32 and fitted_chunk_size(100, 128) == 128
    assert fitted_chunk_size(5, 8) == 8 and fitted_chunk_size(3, 16) == 16
    assert fitted_chunk_size(10, 0) == 0 and fitted_chunk_size(10, True) is True  # refused later
    # The op at T = 20 runs chunks of 32 instead of one padded 64 chunk: the [C, C] intra-chunk
    # masks in its jaxpr are 32 wide, and it matches the token-by-token reference.
    q, k, v, g, beta = make_inputs(20, seed=3)[:5]
    jaxpr = str(jax.make_jaxpr(lambda *a: gated_delta_rule(*a, backend="xla"))(q, k, v, g, beta))
    assert "32,32" in jaxpr.replace(" ", "") and "64,64" not in jaxpr.replace(" ", "")
    o, _ = gated_delta_rule(q, k, v, g, beta, backend="xla")
    ref, _ = gated_delta_rule(q, k, v, g, beta, backend="reference")
    assert rel_err(o, ref) < F32_TOL
