"""NSA written as masked dense attention: the readable definition the other forms are checked
against. O(Tq x Tk) memory; float32 throughout.

Shape legend: B batch, Tq queries, Tk keys, H key/value heads, HQ query heads (G = HQ / H per
key/value head), K key dim, V value dim, C compressed tokens, n selected blocks.

o_t = g_cmp attn(q_t, compressed tokens) + g_slc attn(q_t, keys of the selected blocks)
      + g_swa attn(q_t, keys t - w + 1 .. t)          (arXiv:2502.11089, eq. 5)

each branch restricted to keys at or before t in t's document. The compressed branch and the
block choice are selection.py's (shared by every form: the same blocks everywhere).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.nsa.selection import (
    Geometry,
    Slots,
    compressed_attention,
    masked_softmax,
    mix_branches,
    select_blocks,
    slot_visibility,
)


def dense_branch(q, k, v, mask, scale):
    """Softmax attention of q [B, Tq, HQ, K] over k/v [B, Tk, H, *] under mask
    [B, Tq, H, Tk] (per key/value head), float32 -> [B, Tq, HQ, V]."""
    b, tq, hq, kd = q.shape
    h = k.shape[2]
    qg = q.astype(jnp.float32).reshape(b, tq, h, hq // h, kd)
    s = jnp.einsum("bqhgk,bshk->bqhgs", qg, k.astype(jnp.float32)) * scale
    p = masked_softmax(s, mask[:, :, :, None, :])
    return jnp.einsum("bqhgs,bshv->bqhgv", p, v.astype(jnp.float32)).reshape(b, tq, hq, -1)


def nsa_reference(q, k, v, k_cmp, v_cmp, gates, *, t, seg_q, slots: Slots, geometry: Geometry,
                  scale: float):
    """q [B, Tq, HQ, K] at key indices t [B, Tq] (documents seg_q [B, Tq] or None), k / v
    [B, Tk, H, *], k_cmp / v_cmp [B, C, H, *] on `slots`, gates [B, Tq, HQ, 3] (compressed,
    selected, window) -> (o [B, Tq, HQ, V] float32, blocks [B, Tq, H, n])."""
    g = geometry
    tk = k.shape[1]
    o_cmp, probs = compressed_attention(q.astype(jnp.float32), k_cmp.astype(jnp.float32),
                                        v_cmp, slot_visibility(slots, t, seg_q), scale)
    blocks = select_blocks(probs, t, slots, tk, g)
    start = jnp.take_along_axis(slots.doc_start, t, axis=1)              # [B, Tq]
    key = jnp.arange(tk)
    causal = (key <= t[:, :, None]) & (key >= start[:, :, None])        # [B, Tq, Tk]
    # Key s is in selected block j when j l' <= s - start < (j + 1) l'.
    block_of_key = (key - start[:, :, None]) // g.block_size             # [B, Tq, Tk]
    chosen = jnp.any((blocks[..., None] == block_of_key[:, :, None, None, :])
                     & (blocks[..., None] >= 0), axis=3)                 # [B, Tq, H, Tk]
    o_slc = dense_branch(q, k, v, chosen & causal[:, :, None], scale)
    in_window = causal & (key > t[:, :, None] - g.window)
    o_swa = dense_branch(q, k, v, jnp.broadcast_to(in_window[:, :, None], chosen.shape), scale)
    return mix_branches(gates, o_cmp, o_slc, o_swa), blocks
