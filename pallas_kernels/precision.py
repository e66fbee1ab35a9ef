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

import functools
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
    bf16 with float32 accumulation, forward and backward (`bf16_einsum`)."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return bf16_einsum(spec, a.astype(dtype), b.astype(dtype))
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), precision=HIGHEST,
                      preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def bf16_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum of bf16 a and b accumulated in float32 (a float32 result), whose backward also
    multiplies bf16 operands: the cotangent is rounded to bf16 before the two transposed
    products. Plain autodiff would upcast the bf16 operand to meet the float32 cotangent and
    run the backward matmuls in float32, two thirds of a training step's matmul work off the
    tensor cores / MXU. The gradients of a and b are bf16, as a bf16 operand's are anyway."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _bf16_einsum_fwd(spec, a, b):
    return bf16_einsum(spec, a, b), (a, b)


def _bf16_einsum_bwd(spec, res, ct):
    a, b = res
    _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
    return vjp(ct.astype(a.dtype))


bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)
