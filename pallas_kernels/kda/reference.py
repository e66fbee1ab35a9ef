"""Kimi Delta Attention, token by token: the readable definition the faster paths are checked
against.

Shape legend: B batch, T time, H heads, K key dim, V value dim.
    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, K]; beta [B, T, H]; state S [B, H, K, V];
    o [B, T, H, V].

KDA (Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture",
arXiv:2510.26692, Eq. 1-2): the gated delta rule with a decay per key channel (a diagonal
alpha_t = exp(g_t), g_t <= 0 in log space, instead of Gated DeltaNet's scalar):

    S'_t = diag(exp(g_t)) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T
         = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T
    o_t  = (scale q_t)^T S_t
"""

from __future__ import annotations

from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference


def kda_reference(q, k, v, g, beta, *, scale=None, initial_state=None,
                  output_final_state=False, segment_ids=None):
    """Runs the KDA recurrence one step at a time (lax.scan over T), in float32: the gated
    delta rule's token scan, whose decay step takes a per-channel g.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H, K] log-space decays per key channel (<= 0).
        beta: [B, T, H] write strengths.
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        segment_ids: optional [B, T] int packed-document ids: the state restarts from zero at
            each document start; padding (0) is inert (pallas_kernels/segments.py).

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    """
    return gated_delta_rule_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state,
                                      segment_ids=segment_ids)
