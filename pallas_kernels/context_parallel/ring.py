"""Sequence-parallel softmax attention as a ring: each shard keeps its queries and passes its
key / value block around the N shards (ppermute), attending to each block as it arrives with
an online softmax in float32 (Liu et al. 2023, "Ring Attention with Blockwise Transformers").

Shape legend: B batch, Tl tokens of one shard, N shards, H query heads, Hkv key/value heads
(G = H / Hkv), Dh head dim.

Against the all-gather form (attention.py) a shard holds one key / value block at a time
instead of all N, and the transfers can overlap the block's products. The mask is the same
definition on original token indices (or, for packed documents, document ids and in-document
positions that travel with the block), so both layouts work. The backward is jax's autodiff
of the unrolled ring (the reverse ring of ppermutes): it saves each step's block and
probabilities, so its activation memory is the all-gather form's [B, H, Tl, T]; a backward
that recomputes each step from the saved log-sum-exp (FlashAttention-2's) is not built.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.context_parallel import SEQUENCE, SequenceShards

F32 = jnp.float32
MASK = -0.7 * float(jnp.finfo(F32).max)     # finite "minus infinity": no inf - inf


def ring_local(q, k, v, doc, *, scale, window, n_sinks, shards: SequenceShards, tl: int):
    """Inside a shard: q [B, Tl, H, Dh], k / v [B, Tl, Hkv, Dh], doc None or (segment ids,
    in-document positions) [B, Tl] each -> [B, Tl, H, Dh] in q's dtype."""
    n = shards.n
    b, _, h, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, tl, hkv, h // hkv, dh)
    idx = shards.local_tokens(tl)
    if doc is None:
        q_pos, q_seg = idx[None], None
        block = (k, v, jnp.broadcast_to(idx, (b, tl)), None)
    else:
        q_seg, q_pos = doc
        block = (k, v, q_pos, q_seg)
    acc = jnp.zeros((b, hkv, h // hkv, tl, v.shape[-1]), F32)
    m = jnp.full((b, hkv, h // hkv, tl), MASK, F32)
    total = jnp.zeros_like(m)
    shift = [(i, (i + 1) % n) for i in range(n)]
    for step in range(n):
        kb, vb, k_pos, k_seg = block
        pi, pj = q_pos[:, :, None], k_pos[:, None, :]
        mask = pj <= pi
        if q_seg is not None:
            mask &= q_seg[:, :, None] == k_seg[:, None, :]
        if window is not None:
            mask &= (pi - pj < window) | (pj < n_sinks)
        mask = mask[:, None, None]                                   # [B, 1, 1, Tl, Tl]
        s = jnp.einsum("btkgd,bskd->bkgts", qg, kb, preferred_element_type=F32) * scale
        s = jnp.where(mask, s, MASK)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        total = alpha * total + p.sum(-1)
        acc = alpha[..., None] * acc + jnp.einsum("bkgts,bskd->bkgtd", p.astype(vb.dtype), vb,
                                                  preferred_element_type=F32)
        m = m_new
        if step < n - 1:
            block = tuple(None if x is None else lax.ppermute(x, SEQUENCE, shift)
                          for x in block)
    out = acc / jnp.where(total == 0.0, 1.0, total)[..., None]      # [B, Hkv, G, Tl, Dh]
    return jnp.moveaxis(out, 3, 1).reshape(b, tl, h, -1).astype(q.dtype)
