"""The decode-parity check every mixer must pass (and assert_backends_agree, two op backends of
one mixer on the same parameters). The decode cache holds exactly what the
tokens so far determine, so however the sequence is fed in, the outputs are the same:

full forward over T tokens == prefill of P tokens then T - P single-token steps
                           == prefill in chunks of size C (the last chunk may be shorter).

Equal up to each dtype's summation-order / rounding tolerance (PARITY_TOL).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Per-dtype tolerances on max |difference| / max |reference|. float32 differs only by
# summation order; bf16 rounds q/k/v and the mixer output to 8 bits of mantissa, and the
# three paths round at different points, so a few bf16 ulps (2^-8 ~ 0.4%) are expected.
PARITY_TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def _run(module, x, cache, pieces):
    # Jitted over (params, x, positions, cache) so each chunk size compiles once; slicing in
    # numpy keeps the slice offsets out of the compiled function.
    graphdef, state = nnx.split(module)
    call = jax.jit(lambda st, xs, pos, c: nnx.merge(graphdef, st)(xs, positions=pos, cache=c))
    dtype, x = x.dtype, np.asarray(x, np.float32)   # bf16 -> f32 -> bf16 is exact
    outs, start = [], 0
    for size in pieces:
        pos = np.broadcast_to(np.arange(start, start + size, dtype=np.int32), (x.shape[0], size))
        xs = jnp.asarray(x[:, start:start + size], dtype=dtype)
        y, cache = call(state, xs, pos, cache)
        outs.append(np.asarray(y, np.float32))
        start += size
    return np.concatenate(outs, axis=1), cache


def decode_paths(module, x, *, prefill: int, chunk: int, max_len: int, cache_dtype):
    """-> (full, prefill+steps, chunked) outputs of a mixer (x [B, T, D])."""
    b, t, _ = x.shape
    full, _ = _run(module, x, None, [t])
    cache = module.init_cache(b, max_len, cache_dtype)
    stepped, _ = _run(module, x, cache, [prefill] + [1] * (t - prefill))
    cache = module.init_cache(b, max_len, cache_dtype)
    sizes = [chunk] * (t // chunk) + ([t % chunk] if t % chunk else [])
    chunked, _ = _run(module, x, cache, sizes)
    return full, stepped, chunked


def packed_segment_ids(doc_lengths, t: int) -> np.ndarray:
    """[len(doc_lengths), T] int32 segment ids: row r holds documents of doc_lengths[r] tokens
    (numbered from 1) in order, then padding (0)."""
    seg = np.zeros((len(doc_lengths), t), np.int32)
    for r, lens in enumerate(doc_lengths):
        at = 0
        for d, n in enumerate(lens):
            seg[r, at:at + n] = d + 1
            at += n
    return seg


def relative_error(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def assert_decode_parity(module, x, *, prefill: int, chunk: int, max_len: int, dtype):
    full, stepped, chunked = decode_paths(module, x, prefill=prefill, chunk=chunk,
                                          max_len=max_len, cache_dtype=dtype)
    tol = PARITY_TOL[dtype]
    assert relative_error(stepped, full) < tol, ("prefill+steps", relative_error(stepped, full))
    assert relative_error(chunked, full) < tol, ("chunked", relative_error(chunked, full))


def assert_backends_agree(reference, other, x) -> dict:
    """Two copies of one mixer with the same parameters, on two op backends (e.g. "reference"
    and "xla"): the loss sum(y * ct), its input gradient and every parameter gradient agree to
    float32 summation-order tolerances. Returns `other`'s parameter gradients."""
    g_ref, p_ref = nnx.split(reference)
    g_other, p_other = nnx.split(other)
    jax.tree.map(np.testing.assert_array_equal, p_ref, p_other)   # same parameters
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    ct = jax.random.normal(jax.random.key(7), x.shape)

    def loss(graphdef):
        return jax.jit(jax.value_and_grad(
            lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, positions=pos)[0] * ct),
            argnums=(0, 1)))

    l_ref, (gp_ref, gx_ref) = loss(g_ref)(p_ref, x)
    l_other, (gp_other, gx_other) = loss(g_other)(p_other, x)
    np.testing.assert_allclose(l_other, l_ref, rtol=1e-5)
    np.testing.assert_allclose(gx_other, gx_ref, rtol=1e-4, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 gp_other, gp_ref)
    return gp_other
