"""Sequence-parallel softmax attention: each shard's queries attend over the all-gathered keys
and values (the all-gather form of MaxText and Llama 3's context parallelism).

Shape legend: B batch, T tokens of the row, Tl = T / N of one shard, H query heads, Hkv
key/value heads, Dh head dim, Dv value head dim.

Only K and V (and the segment ids) are gathered, [B, T, Hkv, Dh] each: with GQA a fraction of
the [B, T, D] residual stream, and no query, score or output leaves its shard. A layer whose
keys and values are an up-projection of something narrower passes that instead, with an
`expand` that rebuilds them inside each shard: MLA sends its latents c_kv and k_rope, R + P
numbers a token (DeepSeek-V2 Sec. 2.1), against H (N + P + V) for its per-head keys and
values. The mask is pallas_kernels/masks' definition with the shard's queries' original
indices (r Tl .. (r + 1) Tl - 1 contiguous; pieces r and 2N - 1 - r zigzag) against all T keys
(packed documents: same document, in-document causal order). Scores [B, H, Tl, T] are dense
here (the "xla" attention form on a slice of the queries); a ring exchange with an online
softmax, which keeps one key block per step, is ring.py (mesh.sequence_attention=ring). A
window (with or without sinks) takes neither: its halo form is window.py."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels.context_parallel import SEQUENCE, SequenceShards, run_sharded


def sharded_attention(q, k, v, *, window, n_sinks, scale, segment_ids, shards: SequenceShards,
                      expand: Callable | None = None, weights=None, weights_head_axis: int = 1,
                      core: Callable | None = None, prefix: tuple | None = None):
    """attention()'s result for q [B, T, H, Dh] sharded over the sequence axis.

    k, v: the keys and values [B, T, Hkv, Dh|Dv]; or, with `expand`, any two per-token arrays
    [B, T, ...] that travel instead and expand(k, v, weights) -> (keys [B, S, Hkv, Dh], values
    [B, S, Hkv, Dv]) inside a shard, for S = T (all-gather) or Tl (one ring block). weights:
    the array expand reads (replicated over the sequence axis; its `weights_head_axis` sharded
    like q's heads, so a shard expands its own heads only). core: instead of the softmax,
    core(q, keys, values, mask [B, Tl, T]) -> [B, Tl, H, Dv] over the all-gathered keys (Based's
    Taylor kernel); it takes the all-gather form whatever mesh.sequence_attention says (the
    ring's online form is the softmax's). prefix: (keys, values) [B, P, Hkv, Dh|Dv] that
    every query sees whatever its document or window (Titans MAG's persistent tokens), with a
    window only."""
    from pallas_kernels.attention.xla import softmax_attention

    tl = shards.check_length("attention", q.shape[1])
    order = shards.order(q.shape[1])            # the laid-out row's original indices
    batch = shards.batch_spec(q.shape[0])
    if expand is None:
        # Heads over `tensor` only when it divides both H and Hkv: a shard keeps whole groups.
        heads = shards.head_spec(k.shape[2]) and shards.head_spec(q.shape[2])
        kv_spec = P(batch, SEQUENCE, heads)
    else:
        heads = shards.head_spec(q.shape[2])
        kv_spec = P(batch, SEQUENCE)
    spec = P(batch, SEQUENCE, heads)
    with_weights = expand is not None and weights is not None
    w_spec = None
    if with_weights:
        w_spec = [None] * weights.ndim
        w_spec[weights_head_axis] = heads
        w_spec = P(*w_spec)
    if prefix is not None and (window is None or expand is not None):
        raise ValueError("sharded_attention: prefix keys go with a window and without expand")
    if window is not None:
        # A window needs only the w - 1 keys before each piece: a halo, whichever exchange
        # full attention takes (window.py).
        from pallas_kernels.context_parallel.window import windowed_attention

        return windowed_attention(q, k, v, window=window, n_sinks=n_sinks, scale=scale,
                                  segment_ids=segment_ids, shards=shards, spec=spec,
                                  kv_spec=kv_spec, expand=expand,
                                  weights=weights if with_weights else None,
                                  weights_spec=w_spec, prefix=prefix)

    def split_weights(rest):
        """(this shard's expand weights or None, the row inputs that follow them)."""
        return (rest[0], rest[1:]) if with_weights else (None, rest)

    def local(q, k, v, *rest):
        w, seg = split_weights(rest)
        gather = lambda x: lax.all_gather(x, SEQUENCE, axis=1, tiled=True)  # noqa: E731
        keys, values = gather(k), gather(v)         # laid out as the row: key i is token order[i]
        if expand is not None:
            keys, values = expand(keys, values, w)
        qi = shards.local_tokens(tl)                # the shard's queries' original indices
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
        if core is not None:
            return core(q, keys, values, mask)
        return softmax_attention(q, keys, values, mask, scale)

    def ring(q, k, v, *rest):
        from pallas_kernels.context_parallel.ring import ring_local

        w, doc = split_weights(rest)
        return ring_local(q, k, v, doc if doc else None, scale=scale, shards=shards, tl=tl,
                          expand=expand, weights=w)

    args, specs = [q, k, v], [spec, kv_spec, kv_spec]
    if with_weights:
        args.append(weights)
        specs.append(w_spec)
    row = shards.spec(segment_ids, heads=False) if segment_ids is not None else None
    if shards.attention == "ring" and core is None:
        # Packed documents bring their in-document positions, computed on the whole row
        # before the shards take their slices; they travel with each block.
        if segment_ids is not None:
            args += [segment_ids, shards.document_positions(segment_ids)]
            specs += [row, row]
        return run_sharded(shards, ring, tuple(args), tuple(specs), spec)
    if segment_ids is not None:
        args.append(segment_ids)
        specs.append(row)
    return run_sharded(shards, local, tuple(args), tuple(specs), spec)
