"""The precision policy of the ops' matmuls: one setting, "highest" or "bf16", and "auto".

    "highest"  float32 operands at Precision.HIGHEST: the definition every test compares
               against. On a GPU (TF32) or TPU (one bf16 pass) a default float32 matmul keeps
               ~10 or ~8 mantissa bits; HIGHEST keeps float32's.
    "bf16"     bf16 operands with float32 accumulation: each product of two bf16 numbers is
               exact in float32 and only the sum rounds, so a score q.k costs no more than the
               bf16 inputs already lost. What stays float32 whatever the setting: gates and
               their cumulative sums (exponents), the triangular solve of the delta rules
               (each row depends on the rows before it, so its rounding compounds), and the
               recurrent state (a sum over the whole sequence); a state enters a matmul as a
               bf16 copy and the result is added to the float32 state, so one read's rounding
               never feeds the next chunk's state.
    "auto"     "bf16" when the op's inputs are bf16 and it runs on a GPU or TPU (or through a
               Pallas kernel: they feed the tensor cores / MXU), else "highest". CPU has no
               fast bf16 matmul, and the CPU tests compare against the float32 references.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

from pallas_kernels.backends import KERNEL_PLATFORM, target_platform

Precision = Literal["auto", "highest", "bf16"]
HIGHEST = jax.lax.Precision.HIGHEST


def resolve_precision(precision: str, dtype, backend: str = "xla") -> str:
    """"highest" or "bf16" for an op whose inputs have `dtype` and run on `backend` (resolved).

    Raises:
        ValueError: a precision other than "auto", "highest" or "bf16".
    """
    if precision not in get_args(Precision):
        raise ValueError(f"unknown precision {precision!r}; choose one of "
                         f"{', '.join(map(repr, get_args(Precision)))}")
    if precision != "auto":
        return precision
    accelerated = target_platform() in ("gpu", "tpu") or backend in KERNEL_PLATFORM
    return "bf16" if jnp.dtype(dtype) == jnp.bfloat16 and accelerated else "highest"


def operand_dtype(precision: str):
    """The matmul operand dtype of a resolved precision."""
    return jnp.bfloat16 if precision == "bf16" else jnp.float32


def matmul(spec: str, a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
    """einsum(spec, a, b) -> float32 with both operands cast to `dtype`: float32 at HIGHEST, or
    bf16 with float32 accumulation."""
    precision = HIGHEST if dtype == jnp.float32 else None
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=precision,
                      preferred_element_type=jnp.float32)
