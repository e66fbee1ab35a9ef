"""Rotary position embedding (Su et al. 2021, RoFormer eq. 34), rotate-half layout.

Shapes: x [B, T, H, Dh], positions [B, T] (int) -> [B, T, H, Dh] in x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """theta^(-2i/Dh) for i < Dh/2, float32."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    half = x.shape[-1] // 2
    # Angles in float32: positions up to ~1e5 times frequencies near 1 need > bf16's 8 bits.
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(x.shape[-1], theta)
    cos = jnp.cos(angles)[:, :, None, :]   # [B, T, 1, Dh/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
