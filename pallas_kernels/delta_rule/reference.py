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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.common import (
    PRECISION,
    document_starts,
    initial_state_f32,
    reset_at_starts,
    zero_padding,
)


def delta_rule_reference(q, k, v, beta, *, scale=None, initial_state=None,
                         output_final_state=False, segment_ids=None):
    """Runs the delta-rule recurrence one step at a time (lax.scan over T), in float32.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths.
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        segment_ids: optional [B, T] int packed-document ids: the state restarts from zero at
            each document start; padding (0) is inert (pallas_kernels/common.py).

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    segs = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    q, k, v, beta = zero_padding(segs, q, k, v, beta)
    f32 = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)   # time-major for the scan
    xs = (f32(q) * scale, f32(k), f32(v), f32(beta), document_starts(segs).T)

    def step(s, x):
        q_t, k_t, v_t, b_t, start_t = x                             # [B, H, K|V], b_t [B, H]
        s = reset_at_starts(s, start_t)
        pred = jnp.einsum("bhk,bhkv->bhv", k_t, s, precision=PRECISION)
        s = s + jnp.einsum("bhk,bhv->bhkv", b_t[..., None] * k_t, v_t - pred,
                           precision=PRECISION)
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=PRECISION)

    s, o = jax.lax.scan(step, initial_state_f32(initial_state, q, v), xs)
    return jnp.swapaxes(o, 0, 1).astype(q.dtype), (s if output_final_state else None)
