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
               shards: SequenceShards, weights: Sequence = (), fills: Sequence | None = None):
    """fn over every piece of the row with its halos, sharded over the sequence axis.

    xs: arrays [B, T, ...] laid out as the row; rows[i]: how many rows before each piece xs[i]
    needs (0: none); fills[i]: their value before the row (default 0). fn(pieces, halos,
    *weights) gets the pieces [P B, L, ...] (P = pieces per shard, slot-major) and their halos
    [P B, R_i, ...] (None where R_i = 0) and returns [P B, L, ...] arrays (one or a tuple),
    merged back into [B, T, ...] rows. weights: replicated arrays fn reads."""
    shards.check_length("halo", xs[0].shape[1])
    slots = shards.slots
    batch = shards.batch_spec(xs[0].shape[0])
    fills = fills or [0] * len(xs)

    def local(*args):
        pieces = [split_pieces(x, slots) for x in args[:len(xs)]]     # [slots * B, L, ...]
        halos = [previous_rows(x, r, shards, f) if r else None
                 for x, r, f in zip(pieces, rows, fills)]
        out = fn(pieces, halos, *args[len(xs):])
        return jax.tree.map(lambda y: merge_pieces(y, slots), out)

    specs = tuple(P(batch, SEQUENCE) for _ in xs) + tuple(P() for _ in weights)
    return run_sharded(shards, local, (*xs, *weights), specs, P(batch, SEQUENCE))


def sharded_short_conv(x, kernel, bias, segment_ids, shards: SequenceShards):
    """x [B, T, C] (compute dtype), kernel [W, C], bias [C] or None, segment_ids [B, T] or None
    -> y [B, T, C]: layers/conv.ShortConv's output without a cache."""
    w = kernel.shape[0]

    def conv(pieces, halos, kernel, *bias):
        x, halo = pieces[0], halos[0]
        length = x.shape[1]
        full = x if halo is None else jnp.concatenate([halo, x], axis=1)  # [.., W - 1 + L, C]
        if len(pieces) == 1:
            y = sum(full[:, i:i + length] * kernel[i] for i in range(w))
        else:
            p = pieces[1][..., None]                    # in-document positions of the row
            y = sum(jnp.where(p >= w - 1 - i, full[:, i:i + length], 0) * kernel[i]
                    for i in range(w))
        return y + bias[0] if bias else y

    xs = [x] if segment_ids is None else [x, shards.document_positions(segment_ids)]
    weights = (kernel,) if bias is None else (kernel, bias)
    return with_halos(conv, xs, [w - 1, 0][:len(xs)], shards, weights)
