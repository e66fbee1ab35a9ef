"""Titans MAC with the time axis sharded over the mesh's `sequence` axis: a pipeline of its
segment scan (pallas_kernels/context_parallel/pipeline.py).

Shape legend: B batch, T tokens of the row, L tokens of one piece, R = C - 1 halo rows, Lr =
R + L tokens of a piece's local row, C segment length, N segments of a local layout, D model
width, H memory heads, W conv width.

MAC's memory is written from every head's attention output, and a write is a gradient step
through an MLP: no affine summary of a piece exists (as for the linear family) and no head
split (as for Titans' own memory layer). So its state travels instead: the pieces of the row
run in their original order, each from the state the previous one ends with.

What a piece needs from before it (layers/titans_variants.py's MAC, each document alone):
  * the memory query path q^x = phi_q(x): its short conv takes a halo like any conv, so q^x is
    computed on the sharded row before the pipeline (layers/conv.py's exchange);
  * the segment its first token falls in: attention spans a segment, and h reads the memory
    at the segment's start. So a piece takes as a halo the R rows before it, keeps those of
    its first document's open segment (in-document positions from p0 - p0 % C, p0 its first
    token's), and runs them again; their outputs are dropped;
  * the state at the start of that segment: the memory (weights, momentum, chunk-start
    weights, chunk offset) and the y-stream conv tails. That is the carry: each piece hands on
    the state entering the segment that is open at its end (entering the next one when its
    last token closes a segment).
The local row [halo || piece] then runs as packed_forward runs a row (the segment-aligned
layout, or the token-by-token form when the documents do not fit it or C is not a multiple of
the memory's chunk size), its first document starting from the carry instead of afresh when
it began before the halo.

Cost: the pieces run one after another (the wall time of one device for this layer, and a
rerun of up to C - 1 tokens a piece), each device keeping only its own pieces' activations;
the carry (3 x the memory's weights + the conv tails, per row) makes one hop a round, two in
the zigzag layout (pipeline.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from pallas_kernels.context_parallel import (
    SEQUENCE,
    SequenceShards,
    merge_pieces,
    previous_rows,
    run_sharded,
    split_pieces,
)
from pallas_kernels.context_parallel.pipeline import pipeline
from pallas_kernels.segments import document_layout
from pallas_kernels.titans import TitansState


def sharded_mac_forward(mac, x: jax.Array, segment_ids: jax.Array | None,
                        shards: SequenceShards) -> jax.Array:
    """TitansMAC's cache-free call, x [B, T, D] sharded over the sequence axis (rows without
    documents run as one document each) -> out [B, T, D] (0 at padding)."""
    b, t, _ = x.shape
    c = mac.segment_length
    shards.check_length("titans_mac", t)
    seg = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
    # q^x on the whole row: its conv's halo exchange (each document from its own start).
    (qx, *_), _ = mac.memory.qkv(x, segment_ids=seg)
    pos = shards.document_positions(seg)
    graphdef, state = nnx.split(mac)
    leaves, treedef = jax.tree.flatten(state)
    slots = shards.slots

    def local(x, qx, seg, pos, *leaves):
        module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        rows = [split_pieces(a, slots) for a in (x, qx, seg, pos)]         # [slots B, L, ..]
        if c > 1:
            halos = [previous_rows(a, c - 1, shards) for a in rows]
            # Keep the halo rows of the first document's open segment; the others are padding.
            seg0, pos0 = rows[2][:, :1], rows[3][:, :1]
            keep = (halos[2] == seg0) & (seg0 != 0) & (halos[3] >= pos0 - pos0 % c)
            halos[2] = jnp.where(keep, halos[2], 0)
            rows = [jnp.concatenate([h, a], axis=1) for h, a in zip(halos, rows)]
        start = _carry_of(module, module.memory.initial_state(x.shape[0]),
                          module._init_conv(x.shape[0]))

        def piece(leaves, carry, *row):
            module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return _local_row(module, carry, *row)

        out = pipeline(piece, rows, start, shards, params=list(leaves))
        return merge_pieces(out[:, c - 1:], slots)

    batch = shards.batch_spec(b)
    row = P(batch, SEQUENCE)
    specs = (row,) * 4 + (P(),) * len(leaves)
    return run_sharded(shards, local, (x, qx.astype(x.dtype), seg, pos, *leaves), specs, row)


def _carry_of(mac, state: TitansState, conv: tuple):
    """The pipeline's carry: (memory, momentum, chunk-start weights, offset [B], conv tails)."""
    b = conv[0].tail.shape[0]
    offset = jnp.broadcast_to(jnp.asarray(state.offset, jnp.int32), (b,))
    return (state.memory, state.momentum, state.chunk_start, offset,
            tuple(c.tail.astype(jnp.float32) for c in conv))


def _local_row(mac, carry, x, qx, seg, pos):
    """One piece's local row [halo || piece], x [B, Lr, D], q^x [B, Lr, H, K], document ids
    and in-document positions [B, Lr] of the whole row -> (out [B, Lr, D], the carry entering
    the segment open at its end)."""
    b, lr, d = x.shape
    c = mac.segment_length
    real = seg != 0
    # The row's first real token begins a segment (the halo's kept rows start one); its
    # document continues from the carry when it began earlier.
    first = jnp.argmax(real, axis=1)
    continuing = jnp.take_along_axis(pos, first[:, None], axis=1)[:, 0] > 0
    continuing &= jnp.any(real, axis=1)
    # The segment entered after the last token: its own when that token does not close it.
    closes = (pos[:, -1] + 1) % c == 0

    n = 2 * -(-lr // c)                    # segments of the layout: as packed_forward's
    lay = document_layout(seg, c, n)

    def fast(_):
        bi = jnp.arange(b)[:, None]
        xb = jnp.zeros((b, n * c, d), x.dtype).at[bi, lay.slot].set(x, mode="drop")
        qb = jnp.zeros((b, n * c, *qx.shape[2:]), qx.dtype).at[bi, lay.slot].set(
            qx, mode="drop")
        opens = lay.opens.at[:, 0].set(lay.opens[:, 0] & ~continuing)
        memory, momentum, chunk_start, _, tails = carry
        state = TitansState(memory, momentum, chunk_start, jnp.zeros((), jnp.int32))
        conv = tuple(cc.replace(tail=tl) for cc, tl in zip(mac._init_conv(b), tails))
        capture = jnp.where(real[:, -1], lay.slot[:, -1] // c + closes, 0)
        out, ((mem, mom, cs), conv) = mac._segments(xb, qb, opens, (state, conv), capture)
        out = out[bi, jnp.minimum(lay.slot, n * c - 1)]
        new = (mem, mom, cs, jnp.zeros((b,), jnp.int32), tuple(cc.tail for cc in conv))
        return jnp.where(real[..., None], out, 0).astype(x.dtype), new

    def exact(_):
        fresh = mac.init_cache(1, 0, dtype=x.dtype)

        def one_row(x_r, qx_r, seg_r, pos_r, carry_r, continuing_r, closes_r):
            memory, momentum, chunk_start, offset, tails = carry_r
            state = TitansState(*(tuple(w[None] for w in f)
                                  for f in (memory, momentum, chunk_start)), offset)
            carried = fresh.replace(
                state=state, segment_memory=state.memory,
                y_conv=tuple(cc.replace(tail=tl[None].astype(cc.tail.dtype))
                             for cc, tl in zip(fresh.y_conv, tails)))
            cache = jax.tree.map(lambda a, f: jnp.where(continuing_r, a, f), carried, fresh)
            real_r = seg_r != 0
            opens_r = real_r & (pos_r == 0)

            def record(cache):
                st = cache.state
                return (st.memory, st.momentum, st.chunk_start, st.offset,
                        tuple(cc.tail for cc in cache.y_conv))

            def step(carry, inputs):
                cache, kept = carry
                x_t, qx_t, open_t, real_t, pos_t = inputs
                cache = jax.tree.map(lambda f, a: jnp.where(open_t, f, a), fresh, cache)
                kept = jax.tree.map(lambda now, k: jnp.where(real_t & (pos_t % c == 0), now, k),
                                    record(cache), kept)
                y, new = mac._decode(x_t[None, None], cache, qx=qx_t[None, None])
                new = jax.tree.map(lambda a, o: jnp.where(real_t, a, o), new, cache)
                return (new, kept), jnp.where(real_t, y[0, 0], 0).astype(x.dtype)

            (last, kept), out = jax.lax.scan(step, (cache, record(cache)),
                                             (x_r, qx_r, opens_r, real_r, pos_r))
            kept = jax.tree.map(lambda now, k: jnp.where(closes_r, now, k), record(last), kept)
            memory, momentum, chunk_start, offset, tails = kept
            squeeze = lambda f: tuple(w[0] for w in f)  # noqa: E731
            return out, (squeeze(memory), squeeze(momentum), squeeze(chunk_start), offset,
                         tuple(tl[0].astype(jnp.float32) for tl in tails))

        return jax.vmap(one_row)(x, qx, seg, pos, carry, continuing, closes)

    if c % mac.memory.chunk_size:
        return exact(None)
    return jax.lax.cond(lay.fits, fast, exact, None)
