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

(I + A) is unit lower triangular; rather than forming T, the system (I + A) [W U] =
diag(beta) [Kc Vc] is solved for both right-hand sides at once (pallas_kernels/triangular.py).

Any T works: inputs are zero-padded to a multiple of C. A padded step has beta = 0 and k = 0,
so it writes nothing and reads nothing; the state after the last real step is unchanged.
"""

from __future__ import annotations

from pallas_kernels.gated_delta_rule.xla import gated_delta_rule_xla


def delta_rule_xla(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
                   chunk_size=64, state_impl="xla", segment_ids=None, precision="highest"):
    """Chunkwise-parallel delta rule (same contract as delta_rule_reference), float32 inside.

    The derivation above is the gated one (gated_delta_rule/xla.py) with every decay equal to
    1, and that is how it runs: the gated path with g=None, which skips the decay factors.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths.
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        chunk_size: C, the number of steps handled in parallel per chunk (a Python int).
        state_impl: backend of the state sweep ("xla", "pallas_gpu" or "pallas_tpu").
        precision: "highest" or "bf16" matmul operands (pallas_kernels/precision.py).
        segment_ids: optional [B, T] int packed-document ids (gated_delta_rule_xla).

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    """
    return gated_delta_rule_xla(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, chunk_size=chunk_size,
                                state_impl=state_impl, precision=precision,
                                segment_ids=segment_ids)
