"""NSA's compressed tokens and block selection: the part every form shares.

Shape legend: B batch, Tq queries, Tk keys, H key/value heads, G query heads per key/value
head (HQ = H * G), K key dim, V value dim, C compressed tokens (slots), NB selection blocks
of a row, n selected blocks per query, l compression block, d compression stride, l'
selection block.

Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention", arXiv:2502.11089, Sec. 3.3):

* Compression (eq. 7): compressed token i of a document summarises its keys [i d, i d + l)
  (document-relative positions). Query t sees it once its last key is in the past
  (i d + l - 1 <= t) and it lies in t's document. Slots here are those compressed tokens laid
  out along a row: document after document, each document's in order, so the row holds at
  most (Tk - l) // d + 1 of them however its documents are cut (l >= d).
* Selection scores (eq. 9): selection block j covers positions [j l', (j + 1) l'). Its score
  is the compressed-attention probability of every visible compressed token weighted by how
  many stride units (d tokens) of the block the token covers: eq. 9's double sum
  sum_m sum_n p_cmp[l'/d j - m - n] counts exactly these overlaps, here aligned so that a
  compressed token only scores the blocks it covers. With l = d = l' (flash-linear-attention's
  setting) a block's score is its compressed token's probability.
* GQA (eq. 10): the scores are summed over the G query heads of a key/value head, which then
  share one selection.
* Top-n (eq. 11) among the blocks that start at or before t in t's document, with the first
  block and the two local ones (t's own and the one before it) always kept (Sec. 4.1: "1
  initial block and 2 local blocks").

Ties: one function (select_blocks) decides the blocks for every form (reference, XLA,
kernels), from float32 scores summed in a fixed order, and lax.top_k keeps the lower block
index of equal scores; so every form reads the same blocks, and the forms differ only in how
they attend over them. Selection has no gradient (the paper's top-n is not differentiable;
the compressed branch trains the compressed keys).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.segments import document_positions

NEG = -jnp.inf


class Geometry(NamedTuple):
    """NSA's block settings (all static ints)."""

    cmp_block: int = 32         # l: keys per compressed token
    cmp_stride: int = 16        # d: stride between compressed tokens
    block_size: int = 64        # l': keys per selection block
    block_count: int = 16       # n: blocks each query reads (the forced three included)
    window: int = 512           # w: sliding-window branch (the query's own key included)


def geometry_errors(prefix: str, g: Geometry) -> list[str]:
    """Problems with NSA's block settings, one line each (empty when fine)."""
    errs = [f"{prefix}.{name} must be >= 1, got {getattr(g, name)}"
            for name in ("cmp_block", "cmp_stride", "block_size", "window")
            if getattr(g, name) < 1]
    if errs:
        return errs
    if g.cmp_block % g.cmp_stride:
        errs.append(f"{prefix}.cmp_stride={g.cmp_stride} must divide cmp_block={g.cmp_block} "
                    "(compressed tokens overlap by whole strides)")
    if g.block_size % g.cmp_stride:
        errs.append(f"{prefix}.cmp_stride={g.cmp_stride} must divide block_size="
                    f"{g.block_size} (a selection block is scored by whole strides, eq. 9)")
    if g.block_count < 3:
        errs.append(f"{prefix}.block_count={g.block_count} must be >= 3: the first block and "
                    "the two local blocks are always selected")
    return errs


def n_slots(tk: int, g: Geometry) -> int:
    """Compressed tokens a row of Tk keys can hold: (Tk - l) // d + 1 (0 when Tk < l)."""
    return max(0, (tk - g.cmp_block) // g.cmp_stride + 1)


class Slots(NamedTuple):
    """Where a row's compressed tokens are (int32).

    end [B, C]: key index of each compressed token's last key (Tk: an empty slot, never seen).
    doc [B, C]: its document id (segment id; 1 everywhere in an unpacked row).
    first [B, Tk]: for each key index, the slot of its document's first compressed token.
    doc_start [B, Tk]: for each key index, the key index where its document starts.
    """

    end: jax.Array
    doc: jax.Array
    first: jax.Array
    doc_start: jax.Array


def compression_slots(segment_ids: jax.Array | None, batch: int, tk: int,
                      g: Geometry) -> Slots:
    """The compressed tokens of rows of Tk keys; packed documents (segment_ids [B, Tk], 0 =
    padding) each get their own, counted from their own first token."""
    c, width, d = n_slots(tk, g), g.cmp_block, g.cmp_stride
    key = jnp.arange(tk, dtype=jnp.int32)
    if segment_ids is None:
        end = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32) * d + width - 1, (batch, c))
        zeros = jnp.zeros((batch, tk), jnp.int32)
        return Slots(end, jnp.ones((batch, c), jnp.int32), zeros, zeros)
    seg = segment_ids.astype(jnp.int32)
    pos = document_positions(seg)
    closes = (seg != 0) & (pos + 1 >= width) & ((pos + 1 - width) % d == 0)   # a token ends a slot
    count = jnp.cumsum(closes.astype(jnp.int32), axis=1)
    slot = jnp.where(closes, count - 1, c)                              # c: dropped
    bi = jnp.arange(batch)[:, None]
    end = jnp.full((batch, c), tk, jnp.int32).at[bi, slot].set(
        jnp.broadcast_to(key, (batch, tk)), mode="drop")
    doc = jnp.zeros((batch, c), jnp.int32).at[bi, slot].set(seg, mode="drop")
    doc_start = key - pos
    first = jnp.take_along_axis(count - closes, doc_start, axis=1)     # slots before the doc
    return Slots(end, doc, first, doc_start)


def slot_windows(x: jax.Array, end: jax.Array, cmp_block: int) -> jax.Array:
    """x [B, Tk, H, D] -> [B, C, l, H, D]: the l keys (or values) each slot compresses (an empty
    slot reads clipped indices: its compressed token is never visible)."""
    tk = x.shape[1]
    idx = jnp.clip(end[:, :, None] - cmp_block + 1 + jnp.arange(cmp_block), 0, tk - 1)
    b, c, width = idx.shape
    flat = jnp.take_along_axis(x, idx.reshape(b, c * width, 1, 1), axis=1)
    return flat.reshape(b, c, width, *x.shape[2:])


def slot_visibility(slots: Slots, t: jax.Array, seg_q: jax.Array | None) -> jax.Array:
    """[B, Tq, C] bool: query at key index t [B, Tq] (document seg_q [B, Tq], or None for an
    unpacked row) sees the compressed token: it ended at or before t, in t's document."""
    vis = slots.end[:, None, :] <= t[:, :, None]
    if seg_q is not None:
        vis &= slots.doc[:, None, :] == seg_q[:, :, None]
    return vis


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """softmax over the last axis restricted to `visible`, float32; a row that sees nothing is
    all zeros (not NaN), and so are its gradients."""
    scores = jnp.where(visible, scores, 0.0)
    top = jnp.max(jnp.where(visible, scores, NEG), axis=-1, keepdims=True)
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    e = jnp.where(visible, jnp.exp(scores - top), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def compressed_attention(q: jax.Array, k_cmp: jax.Array, v_cmp: jax.Array,
                         visible: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """The compressed branch (eq. 5 over eq. 7's tokens): q [B, Tq, HQ, K], k_cmp [B, C, H, K],
    v_cmp [B, C, H, V], visible [B, Tq, C] -> (o [B, Tq, HQ, V] float32, probabilities
    [B, Tq, H, G, C] float32, which selection reuses as eq. 8 does). Scores in float32."""
    b, tq, hq, kd = q.shape
    h = k_cmp.shape[2]
    qg = q.reshape(b, tq, h, hq // h, kd)
    s = jnp.einsum("bqhgk,bchk->bqhgc", qg, k_cmp, preferred_element_type=jnp.float32) * scale
    p = masked_softmax(s, visible[:, :, None, None, :])
    o = jnp.einsum("bqhgc,bchv->bqhgv", p, v_cmp.astype(jnp.float32))
    return o.reshape(b, tq, hq, -1), p


def block_scores(probs: jax.Array, first: jax.Array, tk: int, g: Geometry) -> jax.Array:
    """Eqs. 9-10: probs [B, Tq, H, G, C] -> [B, Tq, H, NB] float32 score of each selection
    block of the query's document (NB = ceil(Tk / l'), document-relative blocks), from its
    compressed tokens' probabilities summed over the group and weighted by stride overlap."""
    p = jnp.sum(probs, axis=3)                                           # eq. 10
    c = p.shape[-1]
    # The query's document's compressed tokens, from its first: document-relative slot i.
    idx = first[:, :, None, None] + jnp.arange(c)
    p = jnp.take_along_axis(p, jnp.broadcast_to(idx, p.shape), axis=-1, mode="fill",
                            fill_value=0.0)
    # Stride unit m (positions [m d, (m + 1) d)) collects the tokens i <= m < i + l / d.
    r, per_block = g.cmp_block // g.cmp_stride, g.block_size // g.cmp_stride
    nb = -(-tk // g.block_size)
    padded = jnp.pad(p, [(0, 0)] * 3 + [(r - 1, nb * per_block)])
    units = sum(padded[..., r - 1 - s: r - 1 - s + nb * per_block] for s in range(r))
    return units.reshape(*p.shape[:3], nb, per_block).sum(-1)


def select_blocks(probs: jax.Array, t: jax.Array, slots: Slots, tk: int,
                  g: Geometry) -> jax.Array:
    """Eq. 11: the blocks each query reads. probs [B, Tq, H, G, C] (compressed_attention's),
    t [B, Tq] the queries' key indices -> [B, Tq, H, min(n, NB)] int32 document-relative
    block numbers, -1 for an unused place (a document with fewer than n blocks so far). The
    first block and the local ones come first, then the rest by score (ties: the lower
    block)."""
    first = jnp.take_along_axis(slots.first, t, axis=1)
    start = jnp.take_along_axis(slots.doc_start, t, axis=1)
    scores = block_scores(jax.lax.stop_gradient(probs), first, tk, g)
    nb = scores.shape[-1]
    j = jnp.arange(nb)
    current = ((t - start) // g.block_size)[:, :, None, None]
    candidate = j <= current
    forced = (j == 0) | (j == current) | (j == current - 1)
    ranked = jnp.where(forced, jnp.inf, jnp.where(candidate, scores, NEG))
    n = min(g.block_count, nb)          # a row shorter than n blocks has fewer places
    top, blocks = jax.lax.top_k(ranked, n)
    return jnp.where(top > NEG, blocks, -1).astype(jnp.int32)


def mix_branches(gates: jax.Array, o_cmp: jax.Array, o_slc: jax.Array,
                 o_swa: jax.Array) -> jax.Array:
    """Eq. 5's gated sum: gates [B, Tq, HQ, 3] (compressed, selected, window) and the three
    branch outputs [B, Tq, HQ, V] -> [B, Tq, HQ, V] float32."""
    g = gates.astype(jnp.float32)[..., None]
    return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_swa
