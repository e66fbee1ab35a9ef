"""The chunk layout of the chunked ops: public tensors are [B, T, H, D]; the chunked XLA paths
work on [B, H, N, C, D] (N chunks of C steps), T zero-padded up to N * C.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp


def pad_to_multiple(x: jax.Array, multiple: int, axis: int) -> jax.Array:
    """Zero-pads `axis` of `x` at the end up to a multiple of `multiple` (no-op if already)."""
    pad = (-x.shape[axis]) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def fitted_chunk_size(t: int, chunk_size, smallest: int = 16):
    """The chunk length a chunked op uses for T steps: chunk_size, or the smallest power of two
    >= max(T, 16) when that is shorter. A sequence shorter than one chunk is otherwise
    zero-padded to a whole chunk: at T = 32 with the default C = 64 half of every intra-chunk
    matmul and of the triangular solve is padding (the MQAR recall setting). The result is the
    same recurrence, so only float summation order changes. A power of two >= 16 keeps the chunk a
    legal block for the Pallas state sweep (Triton tiles are powers of two, tl.dot wants >= 16
    rows; TPU tiles are multiples of 8) and a multiple of GLA's sub-chunk. A chunk_size that is
    not a positive int is returned as is for to_chunks to refuse."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        return chunk_size
    fitted = smallest
    while fitted < t:
        fitted *= 2
    return min(chunk_size, fitted)


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, T, H, ...] -> float32 [B, H, N, C, ...], zero-padding T up to N * C.

    Callers must make sure that zeros are inert for their tensor (k = v = 0 adds nothing to the
    state; a log-gate of 0 is a decay of 1, i.e. the state passes through padded steps as is).

    Raises:
        ValueError: if chunk_size is not a positive integer (TypeError if not an integer).
    """
    if isinstance(chunk_size, bool) or operator.index(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    x = pad_to_multiple(x.astype(jnp.float32), chunk_size, axis=1)
    b, tp, h = x.shape[:3]
    x = jnp.moveaxis(x, 2, 1)                                    # [B, H, Tp, ...]
    return x.reshape(b, h, tp // chunk_size, chunk_size, *x.shape[3:])


def from_chunks(x: jax.Array, t: int, dtype) -> jax.Array:
    """[B, H, N, C, D] -> [B, t, H, D] in `dtype`, dropping the padded tail."""
    b, h, n, c = x.shape[:4]
    x = x.reshape(b, h, n * c, *x.shape[4:])[:, :, :t]
    return jnp.moveaxis(x, 1, 2).astype(dtype)
