"""Sequence-parallel causal windows: each piece of a shard's slice gets the last rows of the
piece before it in the original order (its halo) and computes what one call over the whole
row would.

Shape legend: B batch, T tokens of the row, Tl = T / N of one shard, L tokens of one piece
(Tl contiguous, Tl / 2 zigzag), C channels, W width, R halo rows.

A short convolution y_t = sum_{i < W} w_i x_{t - W + 1 + i} (layers/conv.py) needs the W - 1
inputs before t; CCA's two stacked convolutions need 2 (W - 1) and its value shift one
(layers/cca.py). For the first rows of a piece (a shard's slice, or each of its two zigzag
pieces) these live at the end of the piece before it in the original order (the row's first
piece: zeros, as before the row): one all-gather of every piece's last R rows, R tokens per
piece rather than the row. Packed documents drop the taps that reach before a document's
start by the in-document positions of the whole row, computed before the slices are taken (and
passed through the halo like any input), so a document that began on an earlier shard keeps
its taps and one that starts on this shard's first token drops them. A piece shorter than R
would need several pieces back: refused."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.context_parallel import (
    SEQUENCE,
    SequenceShards,
    merge_pieces,
    previous_pieces,
    run_sharded,
    split_pieces,
)


def with_halos(fn: Callable, xs: Sequence[jax.Array], rows: Sequence[int],
               shards: SequenceShards, weights: Sequence = (), what: str = "halo"):
    """fn over every piece of the row with its halos, sharded over the sequence axis.

    xs: arrays [B, T, ...] laid out as the row; rows[i]: how many of the previous piece's last
    rows xs[i] needs (0: none). fn(pieces, halos, *weights) gets the pieces [P B, L, ...]
    (P = pieces per shard, slot-major) and their halos [P B, R_i, ...] (zeros before the row;
    None where R_i = 0) and returns [P B, L, ...] arrays (one or a tuple), merged back into
    [B, T, ...] rows. weights: replicated arrays fn reads."""
    shards.check_length(what, xs[0].shape[1], at_least=max(rows))
    slots = shards.slots
    batch = shards.batch_spec(xs[0].shape[0])

    def local(*args):
        pieces = [split_pieces(x, slots) for x in args[:len(xs)]]     # [slots * B, L, ...]
        halos = []
        for x, r in zip(pieces, rows):
            if not r:
                halos.append(None)
                continue
            tails = x[:, x.shape[1] - r:]
            tails = tails.reshape(slots, -1, *tails.shape[1:])
            halos.append(previous_pieces(tails, shards).reshape(-1, r, *x.shape[2:]))
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
    return with_halos(conv, xs, [w - 1, 0][:len(xs)], shards, weights, what="short conv")
