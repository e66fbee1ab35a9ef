"""Sequence-parallel short convolution: each shard prepends the previous shard's last W - 1
inputs (its halo) and convolves its slice as one call would.

Shape legend: B batch, T tokens of the row, Tl = T / N of one shard, C channels, W width.

y_t = sum_{i < W} w_i x_{t - W + 1 + i} (layers/conv.py): a token needs the W - 1 inputs before
it, which for the first W - 1 tokens of a piece (a shard's slice, or each of its two zigzag
pieces) live at the end of the piece before it in the original order (the first piece: zeros,
as before the row): one all-gather of every piece's last W - 1 inputs. Packed documents drop
the taps that reach before a document's start by the in-document positions of the whole row,
computed before the slices are taken, so a document that began on an earlier shard keeps its
taps and one that starts on this shard's first token drops them. A piece shorter than W - 1
would need several pieces back: refused. """

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.context_parallel import (
    SequenceShards,
    merge_pieces,
    previous_pieces,
    run_sharded,
    split_pieces,
)


def sharded_short_conv(x, kernel, bias, segment_ids, shards: SequenceShards):
    """x [B, T, C] (compute dtype), kernel [W, C], bias [C] or None, segment_ids [B, T] or None
    -> y [B, T, C]: layers/conv.ShortConv's output without a cache."""
    w = kernel.shape[0]
    shards.check_length("short conv", x.shape[1], at_least=w - 1)
    slots = shards.slots
    pos = None if segment_ids is None else shards.document_positions(segment_ids)

    def local(x, kernel, *rest):
        bias = rest[0] if bias_given else None
        pos = split_pieces(rest[-1], slots) if pos_given else None
        x = split_pieces(x, slots)                              # [slots * B, L, C]
        length = x.shape[1]
        if w > 1:
            tails = x[:, length - (w - 1):]
            tails = tails.reshape(slots, -1, *tails.shape[1:])
            halo = previous_pieces(tails, shards).reshape(-1, w - 1, x.shape[-1])
        else:
            halo = x[:, :0]
        full = jnp.concatenate([halo, x], axis=1)               # [slots * B, W - 1 + L, C]
        if pos is None:
            y = sum(full[:, i:i + length] * kernel[i] for i in range(w))
        else:
            p = pos[..., None]
            y = sum(jnp.where(p >= w - 1 - i, full[:, i:i + length], 0) * kernel[i]
                    for i in range(w))
        y = merge_pieces(y, slots)
        return y if bias is None else y + bias

    bias_given, pos_given = bias is not None, pos is not None
    spec = P(shards.batch_spec(x.shape[0]), "sequence")
    args = (x, kernel) + ((bias,) if bias_given else ()) + ((pos,) if pos_given else ())
    specs = (spec, P()) + ((P(),) if bias_given else ()) + ((spec,) if pos_given else ())
    return run_sharded(shards, local, args, specs, spec)
