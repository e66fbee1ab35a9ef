"""The gated delta rule, token by token: the readable definition the faster paths are checked
against.

Shape legend: B batch, T time, H heads, K key dim, V value dim.
    q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state S [B, H, K, V]; o [B, T, H, V].

Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", arXiv:2412.06464): a Mamba2-style scalar decay alpha_t = exp(g_t) (g_t <= 0, log space)
first shrinks the whole memory, then the delta rule writes into the decayed state:

    S'_t = exp(g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T
         = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t  = (scale q_t)^T S_t
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import initial_state_f32
from pallas_kernels.precision import HIGHEST
from pallas_kernels.segments import document_starts, reset_at_starts, zero_padding


def gated_delta_rule_reference(q, k, v, g, beta, *, scale=None, initial_state=None,
                               output_final_state=False, segment_ids=None):
    """Runs the gated delta-rule recurrence one step at a time (lax.scan over T), in float32.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decays (<= 0), [B, T, H, K] one per key channel (Kimi Delta
            Attention, pallas_kernels/kda), or None for the ungated delta rule.
        beta: [B, T, H] write strengths.
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        segment_ids: optional [B, T] int packed-document ids: the state restarts from zero at
            each document start; padding (0) is inert (pallas_kernels/segments.py).

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    segs = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    if g is None:
        g = jnp.zeros(q.shape[:3], jnp.float32)                     # exp(0) = 1: no decay
    q, k, v, g, beta = zero_padding(segs, q, k, v, g, beta)
    f32 = lambda x: jnp.swapaxes(x.astype(jnp.float32), 0, 1)   # time-major for the scan
    xs = (f32(q) * scale, f32(k), f32(v), f32(g), f32(beta), document_starts(segs).T)

    def step(s, x):
        q_t, k_t, v_t, g_t, b_t, start_t = x          # [B, H, K|V], b [B, H], g [B, H(, K)]
        decay = jnp.exp(g_t)[..., None] if g_t.ndim == 3 else jnp.exp(g_t)[..., None, None]
        s = decay * reset_at_starts(s, start_t)
        pred = jnp.einsum("bhk,bhkv->bhv", k_t, s, precision=HIGHEST)
        s = s + jnp.einsum("bhk,bhv->bhkv", b_t[..., None] * k_t, v_t - pred,
                           precision=HIGHEST)
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s, precision=HIGHEST)

    s, o = jax.lax.scan(step, initial_state_f32(initial_state, q, v), xs)
    return jnp.swapaxes(o, 0, 1).astype(q.dtype), (s if output_final_state else None)
