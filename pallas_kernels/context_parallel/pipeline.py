"""Sequence-parallel recurrences by pipeline: for a layer whose state is neither affine in what
came before (so no summary to fold, linear.py) nor split by heads (ulysses.py), the state
itself travels, piece to piece in the row's original order.

Shape legend: B batch, L tokens of one piece (Tl contiguous, Tl / 2 zigzag), N shards of the
`sequence` axis, P pieces of the row (N contiguous, 2N zigzag).

Round j = 0 .. P - 1: the shard holding piece j runs it from the state it holds, the others
skip (lax.cond: each device takes its own branch), and the state moves on to the shard holding
piece j + 1: one shard up while j < N - 1 (contiguous: always), then, zigzag, nowhere (pieces
N - 1 and N are one shard's) and one shard down. So the P pieces run one after another: the
wall time of one device, but each device keeps the activations of its own pieces only, and
the state (the carry) is what crosses the interconnect, once per round. The rounds are a
lax.scan (the piece is compiled once, not P times), the shard's pieces are the scan's
loop-invariant operand (each round indexes its own, so no round keeps a copy), and the piece
is rematerialised (jax.checkpoint): a round keeps its carry, not its activations, which would
otherwise be kept for every round on every shard (lax.cond keeps both branches' residuals).
The backward pass runs the rounds in reverse, the carry's cotangent travelling back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.context_parallel import SEQUENCE, SequenceShards


def pipeline(piece: Callable, inputs: Sequence[jax.Array], carry, shards: SequenceShards,
             params=()):
    """Inside a shard: piece(params, carry, *one_piece) -> (out, carry) over every piece of the
    row in its original order, each starting from the carry the previous one returned.

    inputs: the shard's pieces as rows, [slots * B, ...] (split_pieces' slot-major layout);
    carry: the state before the row's first piece (any pytree of arrays); params: a pytree
    the piece reads (passed explicitly so that the rematerialised piece holds no closure over
    traced values). Returns the outputs [slots * B, ...] in the same layout."""
    slots, n = shards.slots, shards.n
    r = lax.axis_index(SEQUENCE)
    by_slot = tuple(x.reshape(slots, -1, *x.shape[1:]) for x in inputs)

    @jax.checkpoint
    def step(params, carry, by_slot, slot):
        return piece(params, carry, *(lax.dynamic_index_in_dim(x, slot, 0, keepdims=False)
                                      for x in by_slot))

    shapes = jax.eval_shape(step, params, carry, by_slot, 0)[0]
    outs = jax.tree.map(lambda s: jnp.zeros((slots, *s.shape), s.dtype), shapes)
    up = [(i, i + 1) for i in range(n - 1)]
    down = [(i, i - 1) for i in range(1, n)]

    def round_(state, j):
        carry, outs = state
        # Piece j's shard and slot (shards.where_piece, traced).
        shard = jnp.where(j < n, j, 2 * n - 1 - j)
        slot = jnp.where(j < n, 0, 1)
        mine = r == shard

        def run(carry, outs):
            out, carry = step(params, carry, by_slot, slot)
            return carry, jax.tree.map(
                lambda o, new: lax.dynamic_update_index_in_dim(o, new, slot, 0), outs, out)

        carry, outs = lax.cond(mine, run, lambda carry, outs: (carry, outs), carry, outs)
        # On to piece j + 1's shard: up while j < N - 1; zigzag then stays (j = N - 1) and
        # goes down.
        moved = jax.tree.map(lambda c: lax.ppermute(c, SEQUENCE, up), carry)
        if slots == 2:
            below = jax.tree.map(lambda c: lax.ppermute(c, SEQUENCE, down), carry)
            moved = jax.tree.map(lambda a, s, b: jnp.where(j < n - 1, a, jnp.where(
                j == n - 1, s, b)), moved, carry, below)
        return (moved, outs), None

    (_, outs), _ = lax.scan(round_, (carry, outs), jnp.arange(shards.n_pieces))
    return jax.tree.map(lambda o: o.reshape(-1, *o.shape[2:]), outs)
