"""Dense masked softmax attention in jax.numpy: the XLA path of the attention dispatcher and of
every attention layer (attention, MLA, CCA, Titans MAC / MAG), with any mask (KV caches,
rings, windows, sinks).

Shape legend: B batch, T queries, S keys, H query heads, Hkv key/value heads (H a multiple of
Hkv), Dh query/key head dim, Dv value head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      scale: float) -> jax.Array:
    """q [B, T, H, Dh], k [B, S, Hkv, Dh], v [B, S, Hkv, Dv], mask [B, T, S] -> [B, T, H, Dv].

    Dv may differ from Dh (MLA's value heads are narrower than its query-key heads)."""
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, dh)
    # Scores and softmax in float32: bf16 logits lose the small differences softmax amplifies.
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)
