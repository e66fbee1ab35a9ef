"""Sequence-parallel linear-family ops (linear attention, GLA, simple GLA / Mamba-2, the delta
rules, KDA): each shard's slice summarised as an affine map of the incoming state, the
summaries folded in shard order, each slice run from the state it receives.

Shape legend: B batch, Tl tokens of one shard, N shards, H heads, K key dim, V value dim.

Every op here updates its state column by column: S_t = A_t S_{t-1} + k_t v_t^T-like terms,
with A_t a K x K matrix that does not depend on S or v (a diagonal decay for GLA-type gates,
diag(a) (I - beta k k^T) for the delta rules, 0 at a document start). So a slice maps the
state it receives to S_out = M S_in + b, where b is the slice's final state from zero and M
the product of its A_t. One run of the op itself gives both (the state sweep, no second
algorithm): values [v | 0_K] and initial state [0 | I_K] put b in the first V columns of the
final state and M = M I_K in the last K. Its cost is one run at width V + K instead of V, and
the exchange is K x (K + V) floats per head and shard, independent of T.

Then every shard gathers the summaries of all pieces (a shard holds one piece of the row, or
two in the zigzag layout: each is summarised and run as a row of its own), folds
S_in(p + 1) = M_p S_in(p) + b_p in the original piece order in float32 (S_in(p) = 0 when
piece p's first token starts a document, which the piece alone cannot see: its first token
continues "the row", as a row's first token does in every op), and runs its pieces from
their S_in. Exact up to float32 summation order. Normalised linear attention
carries the key sum z like one more value column (v = 1).
"""

from __future__ import annotations

import jax
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

F32 = jnp.float32


def _fold(m_all, b_all, starts_all):
    """m_all [P, B, H, K, K], b_all [P, B, H, K, V], starts_all [P, B] of the P pieces in the
    row's order -> each piece's incoming state [P, B, H, K, V] float32."""
    def step(s, xs):
        m, b, start = xs
        s = jnp.where(start[:, None, None, None], 0.0, s)
        return jnp.einsum("bhij,bhjv->bhiv", m, s, precision=lax.Precision.HIGHEST) + b, s

    zero = jnp.zeros(b_all.shape[1:], F32)
    _, incoming = lax.scan(step, zero, (m_all.astype(F32), b_all.astype(F32), starts_all))
    return incoming


def sharded_linear_op(op: str, run, args, kwargs, shards: SequenceShards):
    """run(*args, **kwargs) -> (o, final_state) of a linear op, with args (q, k, v, *gates),
    each [B, T, H, ...], sharded over the sequence axis (module docstring).

    Raises:
        ValueError: an initial state (a sequence-sharded call starts at the row's start), or a
            length the shards do not divide.
    """
    kwargs = dict(kwargs)
    seg = kwargs.pop("segment_ids", None)
    want_final = kwargs.pop("output_final_state", False)
    if kwargs.pop("initial_state", None) is not None:
        raise ValueError(f"{op}: a sequence-sharded call starts from the row's start; "
                         "initial_state is for cache calls, which run unsharded")
    normalize = kwargs.get("normalize", False)
    q, k, v = args[:3]
    shards.check_length(op, q.shape[1])
    slots = shards.slots

    present = [a is not None for a in args]      # delta_rule passes g = None

    def local(*arrays):
        *xs, sg = arrays if seg is not None else (*arrays, None)
        it = iter(xs)
        # The shard's pieces (1 contiguous, 2 zigzag) as rows of their own: [slots * B, L].
        split = lambda x: None if x is None else split_pieces(x, slots)  # noqa: E731
        q, k, v, *gates = [split(next(it)) if p else None for p in present]
        sg = split(sg)
        rows, _, h, kd = k.shape
        b = rows // slots
        vd = v.shape[-1]
        ones = [jnp.ones(v.shape[:3] + (1,), v.dtype)] if normalize else []
        wide = jnp.concatenate([v, *ones, jnp.zeros(v.shape[:3] + (kd,), v.dtype)], axis=-1)
        eye = jnp.broadcast_to(jnp.eye(kd, dtype=F32), (rows, h, kd, kd))
        s0 = jnp.concatenate([jnp.zeros((rows, h, kd, wide.shape[-1] - kd), F32), eye], axis=-1)
        summary_kw = dict(kwargs, normalize=False) if "normalize" in kwargs else kwargs
        _, fin = run(q, k, wide, *gates, initial_state=s0, output_final_state=True,
                     segment_ids=sg, **summary_kw)
        per_slot = lambda x: x.reshape(slots, b, *x.shape[1:])  # noqa: E731
        m, bias = per_slot(fin[..., -kd:]), per_slot(fin[..., :-kd])
        if sg is None:
            start = jnp.zeros((slots, b), bool)
        else:
            first = per_slot(sg[:, 0])
            before = per_slot(previous_rows(sg, 1, shards, fill=-1)[:, 0])
            start = (first != before) & (first != 0)
        ordered = lambda x: pieces_in_order(lax.all_gather(x, SEQUENCE), shards)  # noqa: E731
        incoming = _fold(ordered(m), ordered(bias), ordered(start))       # [pieces, B, ...]
        r = lax.axis_index(SEQUENCE)
        s_in = jnp.concatenate([incoming[shards.piece_at(r, i)] for i in range(slots)])
        if normalize:
            s_in = (s_in[..., :vd], s_in[..., vd])
        o, fin = run(q, k, v, *gates, initial_state=s_in, output_final_state=want_final,
                     segment_ids=sg, **kwargs)
        o = merge_pieces(o, slots)
        if not want_final:
            return o
        # The row's final state: the last piece's, wherever it lives.
        shard, slot = shards.where_piece(shards.n_pieces - 1)
        fin = jax.tree.map(lambda x: per_slot(x)[slot], fin)
        fin = jax.tree.map(lambda x: lax.psum(jnp.where(r == shard, x, 0.0), SEQUENCE), fin)
        return o, fin

    given = tuple(a for a in args if a is not None)
    arrays = given + ((seg,) if seg is not None else ())
    in_specs = tuple(shards.spec(x) for x in given) + (
        (shards.spec(seg, heads=False),) if seg is not None else ())
    o_spec = shards.spec(q)
    if not want_final:
        return run_sharded(shards, local, arrays, in_specs, o_spec), None
    state_spec = P(shards.batch_spec(q.shape[0]), shards.head_spec(q.shape[2]))
    final_spec = (state_spec, state_spec) if normalize else state_spec
    return run_sharded(shards, local, arrays, in_specs, (o_spec, final_spec))
