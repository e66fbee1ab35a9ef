"""Sequence-parallel ops by a head split (DeepSpeed-Ulysses, Jacobs et al. 2023): around an op
whose heads are independent but whose state update is not affine (Titans' memory: a gradient
step through an MLP), trade the time split for a head split.

Shape legend: B batch, T tokens of the row, Tl = T / N of one shard, H heads (Hl = H / N of
one shard after the exchange), D any per-head width.

Inside each shard: one all-to-all turns [B, Tl, H, D] into [B, T, Hl, D] (every token of the
row, a slice of the heads), the op runs on whole rows of its heads exactly as on one device,
and a second all-to-all turns the output back into the time split. Per-head state arrays
([B, H, ...]: Titans' initial memory weights) are sliced to the shard's heads. It needs the
shards to divide the heads (H % N == 0; a model whose heads they do not divide leaves the op
to XLA's partitioner, which gathers instead); activations cross the interconnect twice per
layer (4 x [B, T / N, H, D] per device, independent of the state size). The layout's order
is undone on the full rows (a static permutation) and redone on the output.
"""

from __future__ import annotations

import jax
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels.context_parallel import SEQUENCE, SequenceShards, run_sharded


def heads_divide(shards: SequenceShards, heads: int) -> bool:
    return heads % shards.n == 0


def sharded_by_heads(op, seq_arrays, head_states, segment_ids, shards: SequenceShards):
    """op(*seq_arrays, head_states, segment_ids) -> [B, T, H, V], with seq_arrays [B, T, H, ...]
    sharded over the sequence axis and head_states a pytree of [B, H, ...] arrays (replicated
    over it): the op runs on whole rows of H / N heads per shard."""
    n = shards.n
    t = seq_arrays[0].shape[1]
    order = shards.order(t)
    inverse = np.argsort(order)
    leaves, treedef = jax.tree.flatten(head_states)
    n_seq, n_leaves = len(seq_arrays), len(leaves)

    def local(*args):
        seq, states = args[:n_seq], args[n_seq:n_seq + n_leaves]
        seg = args[-1] if segment_ids is not None else None
        r = lax.axis_index(SEQUENCE)
        # [B, Tl, H, ...] -> [B, T, Hl, ...] (time in layout order), then the original order.
        whole = [lax.all_to_all(x, SEQUENCE, 2, 1, tiled=True)[:, inverse] for x in seq]
        hl = seq[0].shape[2] // n
        states = [lax.dynamic_slice_in_dim(s, r * hl, hl, axis=1) for s in states]
        if seg is not None:
            seg = lax.all_gather(seg, SEQUENCE, axis=1, tiled=True)[:, inverse]
        o = op(*whole, jax.tree.unflatten(treedef, states), seg)
        return lax.all_to_all(o[:, order], SEQUENCE, 1, 2, tiled=True)

    batch = shards.batch_spec(seq_arrays[0].shape[0])
    spec = P(batch, SEQUENCE)
    args = (*seq_arrays, *leaves) + ((segment_ids,) if segment_ids is not None else ())
    specs = ((spec,) * n_seq + (P(batch),) * n_leaves
             + ((spec,) if segment_ids is not None else ()))
    return run_sharded(shards, local, args, specs, spec)

