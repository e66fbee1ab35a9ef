"""Unit lower-triangular systems of the delta-rule chunks: x with (I + a) x = rhs.

Shapes: a [..., C, C] strictly lower triangular, rhs / x [..., C, F], C the chunk size.

The chunked (gated) delta rule solves (I + A) [W U] = [diag(beta gamma) K, diag(beta) V] once
per chunk (gated_delta_rule/xla.py, the UT transform). A row-by-row forward substitution is C
dependent steps, each a tiny [..., C] x [..., C, F] product: on CPU that loop dominated the whole
op. Instead the inverse T = (I + a)^-1 is built by blocks, with batched matmuls only:

  1. the diagonal blocks of size b (BASE) are inverted by forward substitution on their rows
     (b steps instead of C, each over C / b times more blocks);
  2. blocks are merged pairwise, b -> 2b -> ... -> C, with the block-triangular inverse

         [L11   0 ]^-1   [ T11          0  ]
         [L21  L22]    = [-T22 L21 T11  T22 ],   T11 = L11^-1, T22 = L22^-1,

     which is exact (no series truncation) and is the recursive form of the same substitution,
     so its rounding behaves like forward substitution's, not like a power series' (a product
     (I - A)(I + A^2)(I + A^4)... forms large powers of A that cancel);
  3. x = T rhs, one matmul for both right-hand sides.

Everything here is float32 at HIGHEST precision (precision.matmul with float32), whatever the
op's precision setting: rows of the inverse depend on earlier rows, so a bf16 rounding would
compound through the chunk. The work runs under the named scope "triangular_solve", the one
exception benchmarks/precision.py allows in a bf16 step.

jax.lax.linalg.triangular_solve is not used: for float32 on CPU it lowers to LAPACK trsm, whose
BLAS thread pool runs beside XLA's own threads, and it was slower than this blocked inverse on
CPU; the inverse is batched matmuls on every platform.

The custom VJP keeps T and x: with x = T rhs, d rhs = T^T dx and d a = -tril(d rhs x^T, -1);
two matmuls, no per-row intermediates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.precision import matmul

__all__ = ["BASE", "invert_unit_lower", "solve_unit_lower"]

# Size of the diagonal blocks inverted by substitution before the matmul merges. Smaller means
# fewer dependent steps but more (and smaller) merge matmuls; benchmarks/ops.py measures it.
BASE = 16

F32 = jnp.float32
SCOPE = "triangular_solve"


def _diagonal_blocks(a: jax.Array, size: int, lower_left: bool = False) -> jax.Array:
    """[..., C, C] -> [..., m, size, size]: the diagonal blocks of side `size` (m = C / size),
    or with lower_left the lower-left quarter of each diagonal block of side 2 size
    (m = C / (2 size))."""
    c = a.shape[-1]
    if not lower_left:
        m = c // size
        r = a.reshape(*a.shape[:-2], m, size, m, size)
    else:
        m = c // (2 * size)
        r = a.reshape(*a.shape[:-2], m, 2, size, m, 2, size)[..., :, 1, :, :, 0, :]
    return jnp.moveaxis(jnp.diagonal(r, axis1=-4, axis2=-2), -1, -3)


def _invert_by_rows(a: jax.Array) -> jax.Array:
    """(I + a)^-1 for small blocks a [..., b, b] strictly lower: forward substitution on the
    rows of the identity (row i = e_i - a[i, :] @ rows, whose rows >= i are still zero), as a
    loop rather than unrolled, so the compiled program stays small."""
    b = a.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(b, dtype=F32), a.shape)

    def row(i, x):
        xi = eye[..., i, :] - matmul("...j,...jf->...f", a[..., i, :], x, F32)
        return x.at[..., i, :].set(xi)

    return jax.lax.fori_loop(0, b, row, jnp.zeros_like(eye))


def invert_unit_lower(a: jax.Array, base: int = BASE) -> jax.Array:
    """T = (I + a)^-1 for a [..., C, C] strictly lower triangular (float32), by diagonal blocks
    of `base` rows and pairwise merges (module docstring). Any C: a is zero-padded to base * 2^k
    rows (a zero block extends I + a by an identity block, whose inverse is the identity)."""
    a = a.astype(F32)
    c = a.shape[-1]
    base = max(1, min(base, c))
    total = base
    while total < c:
        total *= 2
    if total != c:
        widths = [(0, 0)] * (a.ndim - 2) + [(0, total - c), (0, total - c)]
        a = jnp.pad(a, widths)
    t = _invert_by_rows(_diagonal_blocks(a, base))                  # [..., total / base, b, b]
    size = base
    while size < total:
        t11, t22 = t[..., 0::2, :, :], t[..., 1::2, :, :]
        a21 = _diagonal_blocks(a, size, lower_left=True)             # [..., m, size, size]
        t21 = -matmul("...ij,...jk->...ik", matmul("...ij,...jk->...ik", t22, a21, F32), t11,
                      F32)
        zero = jnp.zeros_like(t11)
        t = jnp.concatenate([jnp.concatenate([t11, zero], axis=-1),
                             jnp.concatenate([t21, t22], axis=-1)], axis=-2)
        size *= 2
    t = t[..., 0, :, :]
    return t[..., :c, :c] if total != c else t


@jax.custom_vjp
def solve_unit_lower(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """x with (I + a) x = rhs, for a [..., C, C] strictly lower triangular, rhs [..., C, F];
    float32 (module docstring)."""
    return _solve_fwd(a, rhs)[0]


def _solve_fwd(a, rhs):
    with jax.named_scope(SCOPE):
        t = invert_unit_lower(a)
        x = matmul("...ij,...jf->...if", t, rhs, F32)
    return x, (t, x)


def _solve_bwd(res, g):
    t, x = res
    with jax.named_scope(SCOPE):
        g_rhs = matmul("...ji,...jf->...if", t, g, F32)             # (I + a)^-T g
        c = t.shape[-1]
        strict = jnp.tril(jnp.ones((c, c), bool), -1)
        g_a = -jnp.where(strict, matmul("...if,...jf->...ij", g_rhs, x, F32), 0.0)
    return g_a, g_rhs


solve_unit_lower.defvjp(_solve_fwd, _solve_bwd)
