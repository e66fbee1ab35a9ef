"""The delta rule in chunkwise-parallel form (WY / UT representation), in plain jax.numpy.

Shape legend: B batch, T time, H heads, K key dim, V value dim, C chunk size, N = ceil(T / C).
    q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state S [B, H, K, V]; o [B, T, H, V].

Derivation (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", arXiv:2406.06484, sec. 3: the WY representation of the product of
Householder-like factors and its UT-transform form). Inside a chunk starting from state S, write the
update of step t as beta_t k_t u_t^T with u_t = v_t - S_{t-1}^T k_t; then
S_t = S + sum_{j<=t} k_j x_j^T with x_j = beta_j u_j, and unrolling S_{t-1} gives

    x_t = beta_t v_t - beta_t S^T k_t - sum_{j<t} beta_t (k_t . k_j) x_j.

Stacking the rows (X [C, V], Kc [C, K], Vc [C, V]), with A = tril(diag(beta) Kc Kc^T, -1):

    (I + A) X = diag(beta) Vc - diag(beta) Kc S
    X = U - W S,   U = T diag(beta) Vc,   W = T diag(beta) Kc,   T = (I + A)^-1   (UT transform)
    O = Q S + tril(Q Kc^T) X          (inclusive diagonal: o_t reads S_t, after its own write)
    S_next = S + Kc^T X

W and U depend only on the chunk's own inputs, so they are computed for all chunks at once; only
the cheap S-dependent part (X, O, S_next) runs sequentially in a lax.scan over the N chunks.

(I + A) is unit lower triangular; rather than forming T we solve (I + A) [W U] = diag(beta)
[Kc Vc] by forward substitution (pallas_kernels.common.solve_unit_lower): one pass for both
right-hand sides, no explicit inverse (a solve is better conditioned than inverting then
multiplying), with a custom VJP that solves the transposed system. It replaced
jax.scipy.linalg.solve_triangular, whose CPU path calls scipy's OpenBLAS and deadlocked against
XLA's threads in long runs (jaxlib 0.10.2).

Any T works: inputs are zero-padded to a multiple of C. A padded step has beta = 0 and k = 0,
so it writes nothing and reads nothing; the state after the last real step is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import solve_unit_lower
from pallas_kernels.delta_rule._utils import (
    PRECISION,
    from_chunks,
    initial_state_f32,
    pad_time,
    to_chunks,
)


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, precision=PRECISION)


def delta_rule_xla(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
                   chunk_size=64):
    """Chunkwise-parallel delta rule (same contract as delta_rule_reference), float32 inside.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths.
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        chunk_size: C, the number of steps handled in parallel per chunk (a Python int).

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    """
    t = q.shape[1]
    c = int(chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    prep = lambda x: to_chunks(pad_time(x.astype(jnp.float32), c), c)
    qc, kc, vc = prep(q) * scale, prep(k), prep(v)                  # [N, B, H, C, K|V]
    bc = prep(beta)[..., None]                                       # [N, B, H, C, 1]

    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    a = jnp.where(strict, bc * _mm("...ik,...jk->...ij", kc, kc), 0.0)
    rhs = jnp.concatenate([bc * kc, bc * vc], axis=-1)
    wu = solve_unit_lower(a, rhs)
    w, u = wu[..., :kc.shape[-1]], wu[..., kc.shape[-1]:]
    qk = jnp.where(jnp.tril(jnp.ones((c, c), bool)), _mm("...ik,...jk->...ij", qc, kc), 0.0)

    def chunk_step(s, xs):
        q_c, k_c, w_c, u_c, qk_c = xs
        x = u_c - _mm("bhck,bhkv->bhcv", w_c, s)
        o = _mm("bhck,bhkv->bhcv", q_c, s) + _mm("bhij,bhjv->bhiv", qk_c, x)
        return s + _mm("bhck,bhcv->bhkv", k_c, x), o

    s, o = jax.lax.scan(chunk_step, initial_state_f32(initial_state, q, v), (qc, kc, w, u, qk))
    o = from_chunks(o)[:, :t].astype(q.dtype)
    return o, (s if output_final_state else None)
