"""The definition of causal softmax attention with window and sinks, written plainly.

Shapes: q [B, T, H, Dh], k/v [B, S, Hkv, Dh] with S = T (no cache), H a multiple of Hkv.
Query t sees key j iff j <= t and (window is None or t - j < window or j < n_sinks).
Key/value heads are repeated to H heads (GQA: query head h uses kv head h // (H / Hkv)).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.masks import packed_visibility


def visibility(t: int, window: int | None, n_sinks: int) -> np.ndarray:
    """[T, T] bool, built element by element from the definition above."""
    m = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(i + 1):
            m[i, j] = window is None or i - j < window or j < n_sinks
    return m


def attention_reference(q, k, v, *, window: int | None = None, n_sinks: int = 0,
                        scale: float | None = None, segment_ids=None):
    """float32 reference; differentiable (jnp), so gradients can be checked against it.
    segment_ids: optional [B, T] int packed-document ids (masks.packed_visibility)."""
    b, t, h, dh = q.shape
    group = h // k.shape[2]
    scale = dh ** -0.5 if scale is None else scale
    k = jnp.repeat(k, group, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, group, axis=2).astype(jnp.float32)
    q = q.astype(jnp.float32)
    mask = jnp.asarray(visibility(t, window, n_sinks))
    if segment_ids is not None:
        mask = packed_visibility(segment_ids, window, n_sinks)             # [B, T, T]
    out = []
    for head in range(h):
        s = (q[:, :, head] @ jnp.swapaxes(k[:, :, head], 1, 2)) * scale   # [B, T, T]
        s = jnp.where(mask, s, -1e30)
        p = jnp.exp(s - s.max(-1, keepdims=True)) * mask
        p = p / p.sum(-1, keepdims=True)
        out.append(p @ v[:, :, head])
    return jnp.stack(out, axis=2)
