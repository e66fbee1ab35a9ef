"""NSA in XLA with gathers: each query reads its n selected blocks and its window, so the
selected and window branches cost Tq x (n l' + w) rather than Tq x Tk.

Shape legend: B batch, Tq queries, Tk keys, H key/value heads, HQ query heads (G = HQ / H),
K key dim, V value dim, C compressed tokens, n selected blocks, l' block size, w window,
Qc queries per step, S gathered keys per query.

Queries run Qc at a time (lax.map over query chunks, each rematerialised in the backward), so
the live gathers are Qc x H x (n l' + w) keys, not Tq x ...: the memory of a 64k-token row
stays that of one chunk. Scores and softmax in float32; the value products take the values'
dtype (bf16 operands on an accelerator, as the attention layers' XLA path). The compressed
branch attends over all C = (Tk - l) / d + 1 compressed tokens, as the paper's (Tq x C: the
T^2 / d part of NSA's cost).
"""

from __future__ import annotations

import functools

import jax
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


def gather_keys(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, Tk, H, D], idx [B, Qc, H, S] key indices (in range) -> [B, Qc, H, S, D]."""
    b, qc, h, s = idx.shape
    xt = jnp.swapaxes(x, 1, 2)                                         # [B, H, Tk, D]
    flat = jnp.swapaxes(idx, 1, 2).reshape(b, h, qc * s, 1)
    out = jnp.take_along_axis(xt, flat, axis=2).reshape(b, h, qc, s, x.shape[-1])
    return jnp.swapaxes(out, 1, 2)


def gathered_branch(q, k, v, idx, valid, scale):
    """q [B, Qc, HQ, K] over the keys idx [B, Qc, H, S] (valid [B, Qc, H, S]) -> float32
    [B, Qc, HQ, V]; GQA: the G query heads of a key/value head read the same keys."""
    b, qc, hq, kd = q.shape
    h = k.shape[2]
    tk = k.shape[1]
    idx = jnp.clip(idx, 0, tk - 1)
    kg, vg = gather_keys(k, idx), gather_keys(v, idx)
    qg = q.reshape(b, qc, h, hq // h, kd)
    s = jnp.einsum("bqhgk,bqhsk->bqhgs", qg, kg, preferred_element_type=jnp.float32) * scale
    p = masked_softmax(s, valid[:, :, :, None, :])
    o = jnp.einsum("bqhgs,bqhsv->bqhgv", p.astype(v.dtype), vg,
                   preferred_element_type=jnp.float32)
    return o.reshape(b, qc, hq, -1)


def compressed_and_selection(q, t, seg_q, k_cmp, v_cmp, slots: Slots, g: Geometry, scale,
                             tk: int):
    """The compressed branch and the block choice of queries q [B, Qc, HQ, K] at key indices
    t [B, Qc]: (o_cmp [B, Qc, HQ, V] float32, blocks [B, Qc, H, n])."""
    o_cmp, probs = compressed_attention(q, k_cmp, v_cmp, slot_visibility(slots, t, seg_q),
                                        scale)
    return o_cmp, select_blocks(probs, t, slots, tk, g)


def _chunk(q, gates, t, seg_q, k, v, k_cmp, v_cmp, slots: Slots, g: Geometry, scale):
    """One chunk of Qc queries: (o [B, Qc, HQ, V] float32, blocks [B, Qc, H, n])."""
    tk, h = k.shape[1], k.shape[2]
    o_cmp, blocks = compressed_and_selection(q, t, seg_q, k_cmp, v_cmp, slots, g, scale, tk)
    start = jnp.take_along_axis(slots.doc_start, t, axis=1)[:, :, None, None]
    tq = t[:, :, None, None]
    # Selected branch: the n blocks' keys, document-relative block j at start + j l'.
    idx = start[..., None] + blocks[..., None] * g.block_size + jnp.arange(g.block_size)
    valid = (blocks[..., None] >= 0) & (idx <= tq[..., None])
    b, qc = t.shape
    shape = (b, qc, h, blocks.shape[-1] * g.block_size)
    o_slc = gathered_branch(q, k, v, idx.reshape(shape), valid.reshape(shape), scale)
    # Window branch: keys t - w + 1 .. t of t's document (no more than the row's keys).
    w = min(g.window, tk)
    idx = tq - w + 1 + jnp.arange(w)
    valid = jnp.broadcast_to(idx >= start, (b, qc, h, w))
    o_swa = gathered_branch(q, k, v, jnp.broadcast_to(idx, valid.shape), valid, scale)
    return mix_branches(gates, o_cmp, o_slc, o_swa), blocks


def map_query_chunks(step, xs, query_chunk: int):
    """step(*chunks) over query chunks of xs (arrays [B, Tq, ...] or None), each chunk
    rematerialised in the backward (lax.map + checkpoint): outputs [B, Tq, ...]. One call
    when Tq <= query_chunk."""
    b, tq = xs[0].shape[:2]
    qc = min(query_chunk, tq)
    if tq <= qc:
        return step(*xs)
    n = -(-tq // qc)
    pad = n * qc - tq

    def split(x):   # [B, Tq, ...] -> [N, B, Qc, ...]; padded queries repeat the last index
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode="edge")
        return jnp.moveaxis(x.reshape(b, n, qc, *x.shape[2:]), 1, 0)

    out = jax.lax.map(lambda c: jax.checkpoint(step)(*c),
                      tuple(None if x is None else split(x) for x in xs))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * qc, *x.shape[3:])[:, :tq]  # noqa
    return jax.tree.map(merge, out)


def nsa_xla(q, k, v, k_cmp, v_cmp, gates, *, t, seg_q, slots: Slots, geometry: Geometry,
            scale: float, query_chunk: int = 128):
    """nsa_reference's signature and results (plus query_chunk: queries per lax.map step; Tq
    itself when Tq <= query_chunk)."""
    step = functools.partial(_chunk, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, slots=slots,
                             g=geometry, scale=scale)
    return map_query_chunks(step, (q, gates, t, seg_q), query_chunk)
