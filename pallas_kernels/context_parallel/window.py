"""Sequence-parallel sliding-window attention by halo: a piece's queries see at most the
w - 1 keys before it, so each piece takes those from the piece(s) before it (halo.py) instead
of the whole row, and attention sinks come from a small bank of each document's first tokens.

Shape legend: B batch, T tokens of the row, Tl = T / N of one shard, L tokens of one piece
(Tl contiguous, Tl / 2 zigzag; P B pieces of a shard as rows, slot-major), H query heads, Hkv
key/value heads, Dh head dim, R = w - 1 halo rows, S = n_sinks.

Query i sees key j iff both are in one document, p_j <= p_i and (p_i - p_j < w or p_j < S),
p the in-document positions (pallas_kernels/masks; without documents the row is one and p the
token index). Keys within the window of a piece's queries are the piece itself and the R rows
before it: that is the halo, R rows per piece whatever T is (one ppermute a slot when R <= L).
A sink can lie anywhere before: the one document a piece can continue (the one open at its
first token) may have started many shards back. So every piece also reports, for each sink
slot j < S, its latest token at in-document position j (key, value, document id, original
index); the reports are all-gathered (P x S tokens, a few per piece), and piece p takes, for
each j, the latest report from a piece before it. Such a sink counts only for queries of its
own document and only when it lies before the halo (inside the halo or the piece the mask
above already shows it), so no key is counted twice. Keys and values may be something
narrower that `expand` turns into them after the exchange (MLA's latents).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels.context_parallel import (
    SEQUENCE,
    SequenceShards,
    merge_pieces,
    pieces_in_order,
    previous_rows,
    run_sharded,
    split_pieces,
)


def windowed_attention(q, k, v, *, window, n_sinks, scale, segment_ids, shards: SequenceShards,
                       spec, kv_spec, expand, weights, weights_spec, prefix=None):
    """sharded_attention's result when a window is set (see attention.py for the arguments;
    spec / kv_spec / weights_spec: the shard_map specs it chose). prefix: (keys, values)
    [B, P, Hkv, Dh|Dv] that every query sees (Titans MAG's persistent tokens), replicated over
    the sequence axis and placed beside each piece's keys."""
    from pallas_kernels.attention.xla import softmax_attention

    tl = shards.check_length("attention", q.shape[1])
    slots, rows = shards.slots, window - 1
    doc = segment_ids is not None

    def local(q, k, v, *rest):
        w = rest[0] if weights is not None else None
        rest = rest[1:] if weights is not None else rest
        idx = jnp.broadcast_to(shards.local_tokens(tl), q.shape[:2])  # original indices
        if doc:
            seg, pos = rest[:2]
        else:           # one document, positions = token indices
            seg, pos = jnp.ones_like(idx), idx
        q, k, v, seg, pos, idx = (split_pieces(x, slots) for x in (q, k, v, seg, pos, idx))
        keys = [k, v, seg, pos, idx]
        if rows:
            # Before the row: document -1 (matches no query) at index -1.
            halo = [previous_rows(x, rows, shards, fill)
                    for x, fill in zip(keys, (0, 0, -1, 0, -1))]
            keys = [jnp.concatenate([h, x], axis=1) for h, x in zip(halo, keys)]
        k_all, v_all, k_seg, k_pos, _ = keys
        same = seg[:, :, None] == k_seg[:, None, :]
        pi, pj = pos[:, :, None], k_pos[:, None, :]
        mask = same & (pj <= pi) & ((pi - pj < window) | (pj < n_sinks))
        if n_sinks:
            bank = _sink_bank(k, v, seg, pos, idx, n_sinks, shards)
            b_k, b_v, b_seg, b_idx = bank
            before_halo = (b_idx >= 0) & (b_idx < idx[:, :1] - rows)        # [P B, S]
            mask = jnp.concatenate(
                [(seg[:, :, None] == b_seg[:, None, :]) & before_halo[:, None, :], mask], 2)
            k_all = jnp.concatenate([b_k, k_all], axis=1)
            v_all = jnp.concatenate([b_v, v_all], axis=1)
        if expand is not None:
            k_all, v_all = expand(k_all, v_all, w)
        if prefix is not None:
            # The same P keys beside every piece of the row: [P B, P, ...], always visible.
            p_k, p_v = (jnp.concatenate([x] * slots, axis=0) for x in rest[-2:])
            mask = jnp.concatenate([jnp.ones(mask.shape[:2] + p_k.shape[1:2], bool), mask], 2)
            k_all = jnp.concatenate([p_k, k_all.astype(p_k.dtype)], axis=1)
            v_all = jnp.concatenate([p_v, v_all.astype(p_v.dtype)], axis=1)
        return merge_pieces(softmax_attention(q, k_all, v_all, mask, scale), slots)

    args, specs = [q, k, v], [spec, kv_spec, kv_spec]
    if weights is not None:
        args.append(weights)
        specs.append(weights_spec)
    if doc:
        row = shards.spec(segment_ids, heads=False)
        args += [segment_ids, shards.document_positions(segment_ids)]
        specs += [row, row]
    if prefix is not None:
        args += list(prefix)
        specs += [P(kv_spec[0], None, *kv_spec[2:])] * 2
    return run_sharded(shards, local, tuple(args), tuple(specs), spec)


def _sink_bank(k, v, seg, pos, idx, n_sinks, shards: SequenceShards):
    """Inside a shard, pieces as rows ([P B, L, ...]) -> for each piece and sink slot j < S
    the latest token before the piece at in-document position j: keys / values [P B, S, ...],
    document ids and original indices [P B, S] (index -1 and document -1: none)."""
    slots = shards.slots
    # This piece's report: its latest token at each position j (-1: none).
    at = pos[:, :, None] == jnp.arange(n_sinks)                              # [P B, L, S]
    latest = jnp.max(jnp.where(at, idx[:, :, None], -1), axis=1)            # [P B, S]
    where = jnp.argmax(jnp.where(at, idx[:, :, None], -1), axis=1)          # [P B, S]
    take = lambda x: jnp.take_along_axis(  # noqa: E731
        x, where.reshape(where.shape + (1,) * (x.ndim - 2)), axis=1)
    report = (take(k), take(v), jnp.take_along_axis(seg, where, axis=1), latest)
    # All reports in the original piece order: [pieces, B, S, ...].
    ordered = [pieces_in_order(lax.all_gather(x.reshape(slots, -1, *x.shape[1:]), SEQUENCE),
                               shards) for x in report]
    r_k, r_v, r_seg, r_idx = ordered
    # The latest report from a piece before p: an exclusive running max of the indices
    # (indices grow with the piece order), and the piece it came from (index // L).
    best = lax.cummax(r_idx, axis=0)
    best = jnp.concatenate([jnp.full_like(best[:1], -1), best[:-1]])       # [pieces, B, S]
    length = pos.shape[1]
    source = jnp.maximum(best, 0) // length
    r = lax.axis_index(SEQUENCE)
    out = []
    for slot in range(slots):
        p = shards.piece_at(r, slot)
        b_idx = lax.dynamic_index_in_dim(best, p, 0, keepdims=False)        # [B, S]
        src = lax.dynamic_index_in_dim(source, p, 0, keepdims=False)
        pick = lambda x, src=src: jnp.moveaxis(x, 0, 1)[  # noqa: E731
            jnp.arange(src.shape[0])[:, None], src, jnp.arange(src.shape[1])]
        seg_b = jnp.where(b_idx >= 0, pick(r_seg), -1)
        out.append((pick(r_k), pick(r_v), seg_b, b_idx))
    return tuple(jnp.concatenate(parts, axis=0) for parts in zip(*out))
