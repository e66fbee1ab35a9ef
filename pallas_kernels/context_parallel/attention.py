"""Sequence-parallel softmax attention: each shard's queries attend over the all-gathered keys
and values (the all-gather form of MaxText and Llama 3's context parallelism).

Shape legend: B batch, T tokens of the row, Tl = T / N of one shard, H query heads, Hkv
key/value heads, Dh head dim.

Only K and V (and the segment ids) are gathered, [B, T, Hkv, Dh] each: with GQA a fraction of
the [B, T, D] residual stream, and no query, score or output leaves its shard. The mask is
pallas_kernels/masks' definition with the shard's queries' original indices (r Tl .. (r + 1) Tl
- 1 contiguous; pieces r and 2N - 1 - r zigzag) against all T keys (packed documents: same
document, in-document causal order, windows and sinks by in-document position, so sinks are
exact wherever a document's first tokens live). Scores [B, H, Tl, T] are dense here (the "xla"
attention form on a slice of the queries); a ring exchange with an online softmax, which keeps
only one key block per step, is ring.py (mesh.sequence_attention=ring)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels.context_parallel import SEQUENCE, SequenceShards, run_sharded


def sharded_attention(q, k, v, *, window, n_sinks, scale, segment_ids, shards: SequenceShards):
    """attention()'s result for q, k, v [B, T, H|Hkv, Dh] sharded over the sequence axis."""
    from pallas_kernels.attention.xla import softmax_attention

    tl = shards.check_length("attention", q.shape[1])
    order = shards.order(q.shape[1])            # the laid-out row's original indices
    heads = shards.head_spec(k.shape[2]) and shards.head_spec(q.shape[2])
    spec = P(shards.batch_spec(q.shape[0]), SEQUENCE, heads)
    if shards.attention == "ring":
        return _ring(q, k, v, window=window, n_sinks=n_sinks, scale=scale,
                     segment_ids=segment_ids, shards=shards, spec=spec, tl=tl)

    def local(q, k, v, *seg):
        gather = lambda x: lax.all_gather(x, SEQUENCE, axis=1, tiled=True)  # noqa: E731
        k_all, v_all = gather(k), gather(v)     # laid out as the row: key i is token order[i]
        qi = shards.local_tokens(tl)            # the shard's queries' original indices
        if seg:
            seg_all = gather(seg[0])
            pos_all = shards.document_positions(seg_all)
            first = lax.axis_index(SEQUENCE) * tl
            pos_q = lax.dynamic_slice_in_dim(pos_all, first, tl, axis=1)
            pi, pj = pos_q[:, :, None], pos_all[:, None, :]
            mask = (seg[0][:, :, None] == seg_all[:, None, :]) & (pj <= pi)
        else:
            pi, pj = qi[None, :, None], jnp.asarray(order)[None, None, :]
            mask = jnp.broadcast_to(pj <= pi, (q.shape[0], tl, len(order)))
        if window is not None:
            mask &= (pi - pj < window) | (pj < n_sinks)
        return softmax_attention(q, k_all, v_all, mask, scale)

    # Heads over `tensor` only when it divides both H and Hkv: a shard keeps whole GQA groups.
    args = (q, k, v) + ((segment_ids,) if segment_ids is not None else ())
    specs = (spec,) * 3
    if segment_ids is not None:
        specs += (shards.spec(segment_ids, heads=False),)
    return run_sharded(shards, local, args, specs, spec)


def _ring(q, k, v, *, window, n_sinks, scale, segment_ids, shards, spec, tl):
    """The ring form (ring.py); packed documents bring their in-document positions, computed
    on the whole row before the shards take their slices."""
    from pallas_kernels.context_parallel.ring import ring_local

    def local(q, k, v, *doc):
        return ring_local(q, k, v, doc if doc else None, scale=scale, window=window,
                          n_sinks=n_sinks, shards=shards, tl=tl)

    if segment_ids is None:
        return run_sharded(shards, local, (q, k, v), (spec,) * 3, spec)
    pos = shards.document_positions(segment_ids)
    row = shards.spec(segment_ids, heads=False)
    return run_sharded(shards, local, (q, k, v, segment_ids, pos), (spec,) * 3 + (row, row),
                       spec)
