"""Private helpers shared by the delta-rule ops (delta_rule/ and gated_delta_rule/).

Kept here, not in pallas_kernels/common.py, so the two ops stay self-contained until the shared
helpers settle. Shape legend: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# "auto" resolves to "xla" until the Pallas kernels land (later issue).
BACKENDS = ("auto", "reference", "xla")

# float32 matmuls at full precision: on GPU/TPU the default lets XLA use TF32/bf16 passes, and
# the chunk's triangular solve and the chunk-to-chunk state recurrence amplify such rounding.
PRECISION = jax.lax.Precision.HIGHEST


def resolve_backend(backend: str, op: str) -> str:
    """Maps a requested backend to the implementation to run ("reference" or "xla")."""
    if backend == "auto":
        return "xla"
    if backend in ("reference", "xla"):
        return backend
    hint = " (the Pallas kernels are not built yet)" if backend == "pallas" else ""
    raise ValueError(f"{op}: unknown backend {backend!r}{hint}; allowed: {', '.join(BACKENDS)}")


def check_inputs(op: str, q, k, v, beta, g=None, initial_state=None) -> None:
    """Raises ValueError on inconsistent shapes (q/k [B,T,H,K], v [B,T,H,V], beta/g [B,T,H])."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"{op}: q and k must both be [B, T, H, K]; got {q.shape}, {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must be [B, T, H, V] matching q; got {v.shape}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"{op}: beta must be [B, T, H] = {q.shape[:3]}; got {beta.shape}")
    if g is not None and g.shape != q.shape[:3]:
        raise ValueError(f"{op}: g must be [B, T, H] = {q.shape[:3]}; got {g.shape}")
    b, _, h, dk = q.shape
    want = (b, h, dk, v.shape[-1])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"{op}: initial_state must be [B, H, K, V] = {want}; "
                         f"got {initial_state.shape}")


def initial_state_f32(initial_state, q, v) -> jax.Array:
    """The [B, H, K, V] float32 starting state (zeros when none is given)."""
    if initial_state is None:
        b, _, h, dk = q.shape
        return jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
    return initial_state.astype(jnp.float32)


def pad_time(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads axis 1 (time) up to a multiple of `multiple`."""
    pad = -x.shape[1] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, H, ...] with T a multiple of `chunk` -> [N, B, H, C, ...] (N = T / C chunks).

    Chunk-major so lax.scan can walk the chunks along the leading axis.
    """
    b, t, h = x.shape[:3]
    x = x.reshape(b, t // chunk, chunk, h, *x.shape[3:])
    return jnp.moveaxis(x, (1, 2, 3), (0, 3, 2))


def from_chunks(x: jax.Array) -> jax.Array:
    """[N, B, H, C, D] -> [B, N*C, H, D] (the inverse of to_chunks)."""
    n, b, h, c, d = x.shape
    return jnp.moveaxis(x, (0, 2, 3), (1, 3, 2)).reshape(b, n * c, h, d)
