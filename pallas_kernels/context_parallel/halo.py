"""Sequence-parallel causal windows: each piece of a shard's slice gets the last rows of the
piece(s) before it in the original order (its halo) and computes what one call over the whole
row would.

Shape legend: B batch, T tokens of the row, Tl = T / N of one shard, L tokens of one piece
(Tl contiguous, Tl / 2 zigzag), C channels, W width, R halo rows.

A short convolution y_t = sum_{i < W} w_i x_{t - W + 1 + i} (layers/conv.py) needs the W - 1
inputs before t; CCA's two stacked convolutions need 2 (W - 1) and its value shift one
(layers/cca.py); a sliding window of w keys needs w - 1 (window.py). For the first rows of a
piece (a shard's slice, or each of its two zigzag pieces) these live at the end of the piece
before it in the original order (the row's first piece: `fill`, zeros as before the row).
When R <= L that is one hop: the previous piece's last R rows come by one ppermute per slot
(contiguous: shard r - 1 to r; zigzag: slot 0 from shard r - 1, slot 1 from shard r + 1, and
shard N - 1's slot 1 from its own slot 0), R rows a piece whatever N is. A piece shorter than
R needs several pieces back: then the pieces themselves are all-gathered (the row is then at
most R x 2N tokens, so this is no long-sequence cost) and each takes its last R rows before
it. Packed documents drop the taps that reach before a document's start by the in-document
positions of the whole row, computed before the slices are taken (and passed through the
halo like any input), so a document that began on an earlier shard keeps its taps and one
that starts on this shard's first token drops them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.context_parallel import (
    SEQUENCE,
    SequenceShards,
    merge_pieces,
    previous_rows,
    run_sharded,
    split_pieces,
)


def with_halos(fn: Callable, xs: Sequence[jax.Array], rows: Sequence[int],
               shards: SequenceShards, weights: Sequence = (), fills: Sequence | None = None,
               per_row: Sequence = ()):
    """fn over every piece of the row with its halos, sharded over the sequence axis.

    xs: arrays [B, T, ...] laid out as the row; rows[i]: how many rows before each piece xs[i]
    needs (0: none); fills[i]: their value before the row (default 0). fn(pieces, halos,
    *weights, *per_row) gets the pieces [P B, L, ...] (P = pieces per shard, slot-major) and
    their halos [P B, R_i, ...] (None where R_i = 0) and returns [P B, L, ...] arrays (one or a
    tuple), merged back into [B, T, ...] rows. weights: replicated arrays fn reads; per_row:
    arrays [B, ...] of one value per row (no time axis), which fn gets as [P B, ...], each
    row's value beside each of its pieces."""
    shards.check_length("halo", xs[0].shape[1])
    slots = shards.slots
    batch = shards.batch_spec(xs[0].shape[0])
    fills = fills or [0] * len(xs)
    n_x, n_w = len(xs), len(weights)

    def local(*args):
        pieces = [split_pieces(x, slots) for x in args[:n_x]]         # [slots * B, L, ...]
        halos = [previous_rows(x, r, shards, f) if r else None
                 for x, r, f in zip(pieces, rows, fills)]
        rows_of = [jnp.concatenate([x] * slots, axis=0) for x in args[n_x + n_w:]]
        out = fn(pieces, halos, *args[n_x:n_x + n_w], *rows_of)
        return jax.tree.map(lambda y: merge_pieces(y, slots), out)

    specs = (tuple(P(batch, SEQUENCE) for _ in xs) + tuple(P() for _ in weights)
             + tuple(P(batch) for _ in per_row))
    return run_sharded(shards, local, (*xs, *weights, *per_row), specs, P(batch, SEQUENCE))


def short_conv_taps(full, kernel, positions=None, document_tail=None):
    """The causal depthwise convolution of layers/conv.py on one block: full [B, W - 1 + L, C]
    (the W - 1 inputs before the block, then the block), kernel [W, C] -> y [B, L, C].

    positions: [B, L] in-document positions of the block's tokens (packed documents): tap i
    reads the token W - 1 - i steps back, dropped when that lies before the document's start;
    with document_tail [B, W - 1, C] (the inputs every document follows, e.g. Titans'
    persistent tokens) it reads that tail's slot pos + i instead, as the document would after
    it alone."""
    w = kernel.shape[0]
    length = full.shape[1] - (w - 1)
    if positions is None:
        return sum(full[:, i:i + length] * kernel[i] for i in range(w))
    pos = positions[..., None]                                              # [B, L, 1]
    y = sum(jnp.where(pos >= w - 1 - i, full[:, i:i + length], 0) * kernel[i] for i in range(w))
    if document_tail is not None and w > 1:
        # Tap i of a token at in-document position pos < W - 1 - i reads the input
        # W - 1 - i - pos steps before the document: tail slot pos + i.
        tail = document_tail.astype(full.dtype)
        for i in range(w - 1):
            at = jnp.minimum(positions + i, w - 2)
            before = jnp.take_along_axis(tail, at[..., None], axis=1)       # [B, L, C]
            y = y + jnp.where(pos < w - 1 - i, before, 0) * kernel[i]
    return y


def sharded_short_conv(x, kernel, bias, segment_ids, shards: SequenceShards,
                       document_tail=None):
    """x [B, T, C] (compute dtype), kernel [W, C], bias [C] or None, segment_ids [B, T] or None,
    document_tail [B, W - 1, C] or None (with segment_ids) -> y [B, T, C]: layers/conv.
    ShortConv's output without a cache."""
    w = kernel.shape[0]
    packed = segment_ids is not None
    tail = document_tail if packed and document_tail is not None and w > 1 else None

    def conv(pieces, halos, kernel, *rest):
        x, halo = pieces[0], halos[0]
        full = x if halo is None else jnp.concatenate([halo, x], axis=1)  # [.., W - 1 + L, C]
        bias = rest[0] if bias_given else None
        tail_rows = rest[-1] if tail is not None else None
        y = short_conv_taps(full, kernel, pieces[1] if packed else None, tail_rows)
        return y if bias is None else y + bias

    bias_given = bias is not None
    xs = [x] if not packed else [x, shards.document_positions(segment_ids)]
    weights = (kernel,) if bias is None else (kernel, bias)
    per_row = () if tail is None else (tail,)
    return with_halos(conv, xs, [w - 1, 0][:len(xs)], shards, weights, per_row=per_row)
