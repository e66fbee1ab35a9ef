"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer").

Shapes: x [B, T, D] -> [B, T, D]; hidden F = d_ff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from layers.projections import dense


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, dtype, init_std: float, out_std: float,
                 rngs: nnx.Rngs):
        self.gate_up = dense(d_model, 2 * d_ff, std=init_std, dtype=dtype, rngs=rngs)
        self.down = dense(d_ff, d_model, std=out_std, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
        return self.down(jax.nn.silu(gate) * up)
