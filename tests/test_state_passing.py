"""The Pallas state-sweep kernels (pallas_kernels/state_passing) in interpret mode on CPU against
the lax.scan definition: every output and every input gradient, both drivers (GPU loop, TPU
grid), with and without w, V split into tiles and not.

Shape legend: B batch, H heads, N chunks, C chunk size, K key dim, V value dim (K != V so a
transposed state cannot pass by accident).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.state_passing import chunk_outputs, state_passing, state_passing_xla
from tests.parity import relative_error

B, H, N, C, K, V = 2, 2, 3, 8, 16, 32
# float32 both ways; only the order of the [C, K] x [K, V] sums differs (measured <= 3e-7
# relative), so 1e-5 leaves room without hiding a wrong term (those are O(1) relative).
F32_TOL = 1e-5



def make_inputs(seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    w = 0.2 * jax.random.normal(ks[0], (B, H, N, C, K))
    u = jax.random.normal(ks[1], (B, H, N, C, V))
    kd = 0.3 * jax.random.normal(ks[2], (B, H, N, C, K))
    decay = jax.random.uniform(ks[3], (B, H, N, K), minval=0.3, maxval=1.0)
    s0 = jax.random.normal(ks[4], (B, H, K, V))
    cts = (jax.random.normal(ks[5], (B, H, N, K, V)), jax.random.normal(ks[6], (B, H, N, C, V)),
           jax.random.normal(ks[7], (B, H, K, V)))
    return w, u, kd, decay, s0, cts


@functools.partial(jax.jit, static_argnames=("backend", "with_w", "block_v"))
def values_and_grads(w, u, kd, decay, s0, cts, *, backend, with_w, block_v=None):
    def loss(w, u, kd, decay, s0):
        out = state_passing(w if with_w else None, u, kd, decay, s0, backend=backend,
                            block_v=block_v)
        return sum(jnp.sum(o * ct) for o, ct in zip(out, cts, strict=True)), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(w, u, kd, decay, s0)
    return out, grads


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("with_w,block_v", [(True, 16), (False, None)])
def test_kernel_matches_scan(backend, with_w, block_v):
    args = make_inputs()
    want_out, want_grads = values_and_grads(*args, backend="xla", with_w=with_w)
    got_out, got_grads = values_and_grads(*args, backend=backend, with_w=with_w,
                                          block_v=block_v)
    for name, got, want in zip(("states", "x", "s_final"), got_out, want_out, strict=True):
        assert relative_error(got, want) < F32_TOL, name
    names = ("w", "u", "kd", "decay", "s0")
    for name, got, want in zip(names, got_grads, want_grads, strict=True):
        if name == "w" and not with_w:
            continue
        assert np.isfinite(np.asarray(got)).all(), name
        assert relative_error(got, want) < F32_TOL, name


def test_scan_is_the_recurrence():
    """The XLA definition itself, checked step by step in numpy (float64)."""
    w, u, kd, decay, s0, _ = (np.asarray(a, np.float64) if not isinstance(a, tuple) else a
                              for a in make_inputs(1))
    states, x, s_final = state_passing_xla(*(jnp.asarray(a, jnp.float32)
                                             for a in (w, u, kd, decay, s0)))
    s = s0.copy()
    for n in range(N):
        np.testing.assert_allclose(states[:, :, n], s, rtol=1e-5, atol=1e-5)
        xn = u[:, :, n] - np.einsum("bhck,bhkv->bhcv", w[:, :, n], s)
        np.testing.assert_allclose(x[:, :, n], xn, rtol=1e-5, atol=1e-5)
        s = decay[:, :, n, :, None] * s + np.einsum("bhck,bhcv->bhkv", kd[:, :, n], xn)
    np.testing.assert_allclose(s_final, s, rtol=1e-5, atol=1e-5)


def test_every_output_element_is_written():
    """Poison check: the TPU interpreter fills unwritten output memory with NaN; run both
    kernels' outputs (forward and backward) through it and require finite results."""
    w, u, kd, decay, s0, cts = make_inputs(2)
    out, grads = values_and_grads(w, u, kd, decay, s0, cts, backend="pallas_tpu", with_w=True,
                                  block_v=16)
    for a in (*out, *grads):
        assert np.isfinite(np.asarray(a)).all()


def test_bad_backend_and_block():
    w, u, kd, decay, s0, _ = make_inputs()
    with pytest.raises(ValueError, match="unknown backend 'triton'"):
        state_passing(w, u, kd, decay, s0, backend="triton")
    with pytest.raises(ValueError, match="block_v=5 must divide V=32"):
        state_passing(w, u, kd, decay, s0, backend="pallas_gpu", block_v=5)


# ------------------------------------------------------------ sweep fused with the outputs

# bf16 matrix inputs against the float32 definition on the same (rounded) inputs: the kernel
# rounds S and x to bf16 where they enter a matmul (accumulating in float32); measured <= 3.5e-3
# relative on these shapes, so 1e-2 (a wrong term is O(1)).
BF16_FUSED_TOL = 1e-2


def make_output_inputs(seed, dtype):
    w, u, kd, decay, s0, _ = make_inputs(seed)
    ks = jax.random.split(jax.random.key(seed + 100), 4)
    gq = 0.3 * jax.random.normal(ks[0], (B, H, N, C, K))
    qk = jnp.tril(0.3 * jax.random.normal(ks[1], (B, H, N, C, C)))
    cts = (jax.random.normal(ks[2], (B, H, N, C, V)), jax.random.normal(ks[3], (B, H, K, V)))
    low = lambda a: a.astype(dtype)
    return (low(gq), low(qk), low(w), low(u), low(kd), decay, s0), cts


@functools.partial(jax.jit, static_argnames=("backend", "with_w", "with_qk", "block_v"))
def output_values_and_grads(args, cts, *, backend, with_w, with_qk, block_v=None):
    gq, qk, w, u, kd, decay, s0 = args

    def loss(gq, qk, w, u, kd, decay, s0):
        out = chunk_outputs(gq, qk if with_qk else None, w if with_w else None, u, kd, decay,
                            s0, backend=backend, block_v=block_v)
        return sum(jnp.sum(o * ct) for o, ct in zip(out, cts, strict=True)), out

    grads, out = jax.grad(loss, argnums=tuple(range(7)), has_aux=True)(gq, qk, w, u, kd, decay,
                                                                       s0)
    return out, grads


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("with_w,with_qk,block_v,dtype", [
    (True, True, 16, jnp.float32), (False, False, None, jnp.float32),
    (True, True, None, jnp.bfloat16)], ids=["delta-f32", "gla-f32", "delta-bf16"])
def test_fused_outputs_match_the_unfused_definition(backend, with_w, with_qk, block_v, dtype):
    """o = gq S + qk x computed inside the sweep (no states stored) against the lax.scan
    sweep plus batched matmuls on the same inputs: values, final state, every gradient."""
    args, cts = make_output_inputs(3, dtype)
    f32_args = tuple(a.astype(jnp.float32) for a in args)
    want_out, want_grads = output_values_and_grads(f32_args, cts, backend="xla", with_w=with_w,
                                                   with_qk=with_qk)
    got_out, got_grads = output_values_and_grads(args, cts, backend=backend, with_w=with_w,
                                                 with_qk=with_qk, block_v=block_v)
    tol = F32_TOL if dtype == jnp.float32 else BF16_FUSED_TOL
    for name, got, want in zip(("o", "s_final"), got_out, want_out, strict=True):
        assert got.dtype == jnp.float32
        assert relative_error(got, want) < tol, name
    names = ("gq", "qk", "w", "u", "kd", "decay", "s0")
    for name, got, want, arg in zip(names, got_grads, want_grads, args, strict=True):
        if (name == "w" and not with_w) or (name == "qk" and not with_qk):
            continue
        assert got.dtype == arg.dtype, name
        assert np.isfinite(np.asarray(got, np.float32)).all(), name
        assert relative_error(got, want) < tol, name


def test_fused_outputs_pad_to_triton_tiles():
    """C, K, V that are not powers of two (or below 16) are zero-padded for the GPU driver and
    sliced back: same values as the definition."""
    ks = jax.random.split(jax.random.key(7), 6)
    b, h, n, c, k, v = 1, 2, 3, 12, 10, 5
    gq, w, kd = (0.3 * jax.random.normal(kk, (b, h, n, c, k)) for kk in ks[:3])
    u = jax.random.normal(ks[3], (b, h, n, c, v))
    qk = jnp.tril(0.3 * jax.random.normal(ks[4], (b, h, n, c, c)))
    decay = jax.random.uniform(ks[5], (b, h, n, k), minval=0.3, maxval=1.0)
    s0 = jnp.ones((b, h, k, v))
    want = chunk_outputs(gq, qk, w, u, kd, decay, s0, backend="xla")
    got = chunk_outputs(gq, qk, w, u, kd, decay, s0, backend="pallas_gpu")
    for g, wnt in zip(got, want, strict=True):
        assert g.shape == wnt.shape
        assert relative_error(g, wnt) < F32_TOL
