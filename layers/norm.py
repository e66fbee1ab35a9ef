"""RMSNorm (Zhang & Sennrich 2019): x / rms(x) * scale, computed in float32.

Shapes: x [..., D] -> [..., D] in the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        # The mean of squares is taken in float32: in bf16 it loses ~3 digits for wide D.
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv * self.scale[...]).astype(x.dtype)
