"""backend="pallas" of the chunked linear-attention ops (interpret mode on CPU) against each op's
token-by-token reference: outputs, final state and every input gradient, at odd lengths with an
initial state; bf16 inputs; head dim 64; the TPU driver; the CPU-without-interpret error.

Shape legend: B batch, T time, H heads, K key dim, V value dim.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backends import interpret_kernels
from pallas_kernels.delta_rule import delta_rule
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gla import gla, simple_gla
from pallas_kernels.kda import kda
from pallas_kernels.linear_attention import linear_attention
from tests.parity import relative_error

B, H = 2, 2
# max |pallas - reference| / max |reference|. float32: the chunked form sums in another order
# and (delta rules) solves a triangular system, as the xla backend does; measured <= 4e-7,
# and 1.4e-5 for normalized linear attention's gradients (the division by q.z). bf16 inputs
# against the float32 reference on the unrounded inputs: input rounding, bf16 matmul inputs on
# the kernel path (precision "auto" -> "bf16", pallas_kernels/precision.py) and the bf16
# output (measured <= 9.4e-3, simple_gla's gradients; 7.2e-3 gated_delta_rule). Normalized
# linear attention's gradients: 3.0e-2, the same on the float32 xla backend, so it is the
# rounding of the inputs, amplified by the division by q.z, not the kernel's matmuls.
BF16_TOL_NORMALIZED = 5e-2
F32_TOL = 1e-4
BF16_TOL = 1.5e-2



def make_inputs(op, t, dk, dv, seed=0):
    """Random inputs of `op` as (positional args, initial state), gates in log space."""
    ks = jax.random.split(jax.random.key(seed), 8)
    q = jax.random.normal(ks[0], (B, t, H, dk))
    k = jax.random.normal(ks[1], (B, t, H, dk))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, t, H, dv))
    g = -jax.nn.softplus(jax.random.normal(ks[3], (B, t, H)) - 3.0)
    beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, t, H)))
    s0 = jax.random.normal(ks[5], (B, H, dk, dv))
    if op == "gated_delta_rule":
        return (q, k, v, g, beta), s0
    if op == "delta_rule":
        return (q, k, v, beta), s0
    if op in ("gla", "kda"):
        gk = -jax.nn.softplus(jax.random.normal(ks[6], (B, t, H, dk)) - 3.0)
        return ((q, k, v, gk) if op == "gla" else (q, k, v, gk, beta)), s0
    if op == "simple_gla":
        return (q, k, v, g), s0
    # linear attention with the running-sum normalizer: positive features, (S, z) state.
    pos = lambda x: jax.nn.elu(x) + 1.0
    z0 = jnp.abs(jax.random.normal(ks[7], (B, H, dk))) + 1.0
    return (pos(q), pos(k), v), (jnp.abs(s0), z0)


OPS = {"gated_delta_rule": gated_delta_rule, "delta_rule": delta_rule, "gla": gla,
       "simple_gla": simple_gla, "kda": kda,
       "linear_attention": functools.partial(linear_attention, normalize=True)}


@functools.partial(jax.jit, static_argnames=("op", "backend"))
def values_and_grads(args, s0, ct_o, *, op, backend):
    def loss(args, s0):
        kw = {} if backend == "reference" else dict(chunk_size=16)
        o, s = OPS[op](*args, initial_state=s0, output_final_state=True, backend=backend, **kw)
        state_ct = jax.tree.map(lambda a: jnp.cos(a.astype(jnp.float32)), s)
        return jnp.sum(o.astype(jnp.float32) * ct_o) + sum(
            jnp.sum(a * c) for a, c in zip(jax.tree.leaves(s), jax.tree.leaves(state_ct))), (o, s)

    grads, out = jax.grad(loss, argnums=(0, 1), has_aux=True)(args, s0)
    return out, grads


def check(op, t, dk, dv, backend="pallas", dtype=jnp.float32, tol=F32_TOL):
    args, s0 = make_inputs(op, t, dk, dv)
    ct_o = jax.random.normal(jax.random.key(9), (B, t, H, dv))
    want_out, want_grads = values_and_grads(args, s0, ct_o, op=op, backend="reference")
    low = tuple(a.astype(dtype) for a in args)
    got_out, got_grads = values_and_grads(low, s0, ct_o, op=op, backend=backend)
    for got, want in zip(jax.tree.leaves(got_out), jax.tree.leaves(want_out), strict=True):
        assert got.shape == want.shape
        assert relative_error(got, want) < tol
    for i, (got, want) in enumerate(zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads),
                                        strict=True)):
        assert np.isfinite(np.asarray(got, np.float32)).all(), i
        assert relative_error(got, want) < tol, i


@pytest.mark.parametrize("op", sorted(OPS))
def test_pallas_matches_reference_odd_length(op):
    check(op, t=37, dk=16, dv=8)


@pytest.mark.slow
@pytest.mark.parametrize("op,dim", [("gated_delta_rule", 64), ("gla", 64),
                                    ("gated_delta_rule", 128), ("simple_gla", 128)])
def test_pallas_head_dims_64_and_128(op, dim):
    check(op, t=24, dk=dim, dv=dim)


@pytest.mark.parametrize("op", sorted(OPS))
def test_pallas_bf16_inputs(op):
    tol = BF16_TOL_NORMALIZED if op == "linear_attention" else BF16_TOL
    check(op, t=37, dk=16, dv=8, dtype=jnp.bfloat16, tol=tol)


def test_pallas_tpu_driver():
    check("simple_gla", t=37, dk=16, dv=8, backend="pallas_tpu")


def test_pallas_on_cpu_needs_interpret():
    args, s0 = make_inputs("gla", 8, 16, 8)
    with interpret_kernels(False), pytest.raises(
            ValueError, match="gla: backend 'pallas_gpu' is a GPU kernel and this is cpu"):
        gla(*args, backend="pallas")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        gated_delta_rule(*make_inputs("gated_delta_rule", 8, 16, 8)[0], backend="cuda")
