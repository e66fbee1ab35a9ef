"""Linear projections of the mixers: the model's compute dtype, float32 parameters, normal init.

Input projections start at normal(model.init_std). A projection back onto the residual stream
(a mixer's or the MLP's last one) starts at normal(init_std / sqrt(2 n_layers)) (GPT-2): each
of the 2 n_layers residual branches adds its output to the stream, so their sum keeps the
scale of one branch at init.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx


def output_std(cfg) -> float:
    """Init std of a projection onto the residual stream: init_std / sqrt(2 n_layers)."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


def dense(d_in: int, d_out: int, *, std: float, dtype, rngs: nnx.Rngs,
          use_bias: bool = False) -> nnx.Linear:
    """nnx.Linear [d_in -> d_out] computing in `dtype`, float32 params, kernel normal(std),
    bias (if any) zero."""
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


def projection(cfg, d_in: int, d_out: int, *, rngs: nnx.Rngs, use_bias: bool = False,
               dtype=None) -> nnx.Linear:
    """An input-side projection: kernel normal(model.init_std); dtype None: model.dtype."""
    return dense(d_in, d_out, std=cfg.init_std, rngs=rngs, use_bias=use_bias,
                 dtype=jnp.dtype(cfg.dtype) if dtype is None else dtype)


def output_projection(cfg, d_in: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """The projection back onto the residual stream [d_in -> model.d_model], no bias, kernel
    normal(output_std(cfg))."""
    return dense(d_in, cfg.d_model, std=output_std(cfg), dtype=jnp.dtype(cfg.dtype), rngs=rngs)
