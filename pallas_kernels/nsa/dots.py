"""The matrix products NSA's Pallas kernels (triton.py, mosaic.py) are written with: float32
accumulation, full precision for float32 operands (not TF32 / bf16 passes) and the operands'
own precision otherwise; NT / TN forms so no kernel transposes a tile itself."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _precision(highest: bool):
    return lax.Precision.HIGHEST if highest else lax.Precision.DEFAULT


def dot(a, b, highest: bool):            # a [M, K] @ b [K, N]
    return jnp.dot(a, b, precision=_precision(highest), preferred_element_type=F32)


def dot_nt(a, b, highest: bool):         # a [M, K] @ b [N, K]^T
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(highest),
                           preferred_element_type=F32)


def dot_tn(a, b, highest: bool):         # a [M, P]^T @ b [M, Q]
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(highest),
                           preferred_element_type=F32)
