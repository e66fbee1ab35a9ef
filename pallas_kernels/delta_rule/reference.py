"""The delta rule, token by token: the readable definition every faster path is checked against.

Shape legend: B batch, T time, H heads, K key dim, V value dim.
    q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state S [B, H, K, V]; o [B, T, H, V].

DeltaNet (Schlag, Irie & Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight
Programmers", arXiv:2102.11174; Yang et al. 2024, "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length", arXiv:2406.06484): the state is a fast-weight memory that
first reads its current prediction for key k_t and then moves it a fraction beta_t of the way
towards v_t:

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T  =  (I - beta_t k_t k_t^T) S_{t-1}
                                                         + beta_t k_t v_t^T
    o_t = (scale q_t)^T S_t

k is usually L2-normalised by the caller (then beta_t in (0, 1) keeps S bounded), but nothing
here assumes it. The papers write the state as V x K (S_t = S_{t-1} + beta_t (v_t - S_{t-1} k_t)
k_t^T); here it is stored transposed, [K, V], so o_t = S_t^T (scale q_t).

It is the gated delta rule (gated_delta_rule/reference.py) with every decay exp(g_t) = 1, and is
computed by that scan with g = None.
"""

from __future__ import annotations

from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference


def delta_rule_reference(q, k, v, beta, *, scale=None, initial_state=None,
                         output_final_state=False, segment_ids=None):
    """The delta-rule recurrence one step at a time (lax.scan over T), in float32: arguments
    and returns as gated_delta_rule_reference without g."""
    return gated_delta_rule_reference(q, k, v, None, beta, scale=scale,
                                      initial_state=initial_state,
                                      output_final_state=output_final_state,
                                      segment_ids=segment_ids)
