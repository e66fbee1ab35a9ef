"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer").

Shapes: x [B, T, D] -> [B, T, D]; hidden F = d_ff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, d_ff: int, *, dtype, init_std: float, out_std: float,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.gate_up = nnx.Linear(d_model, 2 * d_ff, use_bias=False, dtype=dtype,
                                  param_dtype=jnp.float32, kernel_init=init, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, use_bias=False, dtype=dtype,
                               param_dtype=jnp.float32,
                               kernel_init=nnx.initializers.normal(out_std), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
        return self.down(jax.nn.silu(gate) * up)
