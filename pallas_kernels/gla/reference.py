"""Gated linear attention, token by token: the readable definition.

Shapes: B batch, T time, H heads, K key dim, V value dim.
q, k [B, T, H, K]; v [B, T, H, V]; gk [B, T, H, K] or g [B, T, H] log-space decays (<= 0);
state S [B, H, K, V].

GLA (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training",
Sec. 4, the recurrent form of GLA with a diagonal gate), with alpha_t = exp(gk_t):

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T,      o_t = (scale q_t)^T S_t

simple_gla is the scalar-gate special case (one decay per head and step):
S_t = exp(g_t) S_{t-1} + k_t v_t^T.

Everything runs in float32: S is a decayed sum over all past tokens, and bf16 would lose small
new contributions against a large running state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import default_scale
from pallas_kernels.precision import HIGHEST
from pallas_kernels.segments import document_starts, reset_at_starts, zero_padding


def _decayed_recurrence(q, k, v, log_decay, scale, initial_state, output_final_state,
                        segment_ids=None):
    """S_t = exp(log_decay_t)[:, None] * S_{t-1} + k_t v_t^T; log_decay [B, T, H, K or 1].
    With segment_ids the state restarts from zero at each document start and padding is
    inert (pallas_kernels/segments.py)."""
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    scale = default_scale(k, scale)
    s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    segs = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    q, k, v, log_decay = zero_padding(segs, q, k, v, log_decay)
    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, log_decay))
    xs += (document_starts(segs).T,)

    def step(s, x):
        qt, kt, vt, gt, start_t = x                          # [B, H, K], ..., [B, H, K or 1]
        s = reset_at_starts(s, start_t)
        s = jnp.exp(gt)[..., None] * s + kt[..., :, None] * vt[..., None, :]
        o = jnp.einsum("bhk,bhkv->bhv", qt * scale, s, precision=HIGHEST)
        return s, o

    s, o = jax.lax.scan(step, s0, xs)
    return jnp.moveaxis(o, 0, 1).astype(q.dtype), (s if output_final_state else None)


def gla_reference(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False,
                  segment_ids=None):
    """Token-by-token GLA with a per-key-channel decay, in float32.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        gk: [B, T, H, K] log-space decays (<= 0); the state's row d is scaled by exp(gk_t[d]).
        scale: query scale; defaults to K ** -0.5.
        initial_state: S [B, H, K, V] before the first token, or None for zeros.
        output_final_state: also return the float32 state after the last token.
        segment_ids: optional [B, T] int packed-document ids (pallas_kernels/segments.py).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32 or None).
    """
    return _decayed_recurrence(q, k, v, gk, scale, initial_state, output_final_state,
                               segment_ids)


def simple_gla_reference(q, k, v, g, *, scale=None, initial_state=None,
                         output_final_state=False, segment_ids=None):
    """Token-by-token GLA with one scalar decay per head and step, in float32.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decays (<= 0); the whole state is scaled by exp(g_t).
        scale: query scale; defaults to K ** -0.5.
        initial_state: S [B, H, K, V] before the first token, or None for zeros.
        output_final_state: also return the float32 state after the last token.
        segment_ids: optional [B, T] int packed-document ids (pallas_kernels/segments.py).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32 or None).
    """
    return _decayed_recurrence(q, k, v, g[..., None], scale, initial_state, output_final_state,
                               segment_ids)
