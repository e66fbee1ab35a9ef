"""Dense masked softmax attention in jax.numpy: the XLA path of the attention dispatcher and of
every attention layer (attention, MLA, CCA, Titans MAC / MAG), with any mask (KV caches,
rings, windows, sinks).

Shape legend: B batch, T queries, S keys, H query heads, Hkv key/value heads (H a multiple of
Hkv), Dh query/key head dim, Dv value head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.precision import bf16_einsum, resolve_precision


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum accumulated in float32. Where the precision policy says bf16 (bf16 operands on a
    GPU / TPU: pallas_kernels/precision.py), the backward multiplies bf16 operands too
    (bf16_einsum), so a bf16 model's attention stays on the tensor cores / MXU; elsewhere plain
    autodiff, whose backward upcasts to float32."""
    if a.dtype == b.dtype == jnp.bfloat16 and resolve_precision("auto", a.dtype) == "bf16":
        return bf16_einsum(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      scale: float) -> jax.Array:
    """q [B, T, H, Dh], k [B, S, Hkv, Dh], v [B, S, Hkv, Dv], mask [B, T, S] -> [B, T, H, Dv].

    Dv may differ from Dh (MLA's value heads are narrower than its query-key heads)."""
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, dh)
    # Scores and softmax in float32: bf16 logits lose the small differences softmax amplifies.
    scores = _dot("btkgd,bskd->bkgts", qg, k) * scale
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = _dot("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)
