"""Context parallelism: ops whose time axis is sharded over the mesh's `sequence` axis exchange
what their slices need from each other instead of gathering the sequence.

Shape legend: B batch, T tokens of the whole row, Tl = T / N tokens of one shard, N shards of
the `sequence` axis, H heads, K key dim, V value dim.

The model code does not change: inside `shard_sequence(mesh)` (entered by the LM when the
active mesh has sequence > 1 and no cache is in use) the ops that know how run their shard's
slice under jax.shard_map with an exchange of their own:

  * linear family and delta rules (pallas_kernels/dispatch.run_linear_op: linear_attention,
    gla, simple_gla / Mamba-2, delta_rule, gated_delta_rule, kda): each shard summarises its
    slice as an affine map of the incoming state, S_out = M S_in + b, folds the gathered
    summaries in shard order and runs its slice from the state it receives (linear.py);
  * softmax attention (pallas_kernels/attention, CCA / CCGQA's; and Based's quadratic form,
    its Taylor kernel in place of the softmax, all-gather only): key / value slices
    all-gathered, each shard's queries attend over them under the causal / document mask
    (attention.py), or passed around a ring with an online softmax and its own recomputing
    backward (ring.py, mesh.sequence_attention=ring); with a window, only the w - 1 keys
    before each piece as a halo and a small bank of sinks (window.py); MLA sends its latents
    instead and each shard up-projects them (layers/mla.py);
  * short convolutions (layers/conv.py) and CCA's two convolutions and value shift: the
    previous piece's last rows as a halo (halo.py);
  * NSA (layers/nsa.py): keys and values gathered into whole rows, the compressed tokens
    computed C / N per shard and gathered, blocks chosen for the shard's own queries;
  * Titans' memory (pallas_kernels/titans): not affine in its state, so a head split instead
    (DeepSpeed-Ulysses, ulysses.py), when the shards divide the heads (else, contiguous only,
    the partitioner's gather; zigzag is refused); its persistent tokens are not prepended to
    the sharded row: every row runs as documents that start from the state and conv tails they
    leave (convs: the tails beside each piece's halo), and MAG's window attention takes them
    as prefix keys beside every piece (window.py);

  * Titans MAC (layers/titans_mac_sharded.py): its segment scan carries a memory written from
    every head's attention output, neither affine nor split by heads, so the state itself
    travels: the pieces run in the row's original order, each from the state the previous
    one hands on, one ppermute a piece (pipeline.py).

Anything else is left to XLA's SPMD partitioner, which keeps the result exact by gathering
what an op needs (correct on any mesh in the contiguous layout, not memory-efficient).
tests/test_context_parallel.py checks both: equal logits and gradients for every mixer, and
no gathered [B, T, D] activation where a mixer has its exchange.

Layouts (mesh.sequence_layout): contiguous, shard r holds tokens r Tl .. (r + 1) Tl - 1; or
zigzag, the row cut into 2N pieces of L = T / 2N tokens and shard r holding pieces r and
2N - 1 - r (in that order), so every shard has as much causal-attention work as any other
(the first pieces see few keys, the last ones many). The batch is reordered on the host before
it reaches the devices (`zigzag_order`), with positions and document positions computed in the
original order first; the exchanges below read the layout from SequenceShards. A mixer without
an exchange would see the reordered row as if it were the row, so zigzag is refused for models
that have one (configs: ZIGZAG_MIXERS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.segments import document_positions

SEQUENCE = "sequence"
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
LAYOUTS = ("contiguous", "zigzag")
ATTENTION_EXCHANGES = ("all_gather", "ring")
# Mixers whose every op has an exchange that reads the layout (the others are left to XLA's
# partitioner, which keeps them exact only in the contiguous layout). Titans' head split
# needs the shards to divide its heads (models/config_check.zigzag_blockers; the op says so
# too).
ZIGZAG_MIXERS = ("attn", "swa", "gla", "mamba2", "deltanet", "gated_deltanet", "kda", "mla",
                 "cca", "ccgqa", "nsa", "conv", "based", "parallel", "mom", "titans",
                 "titans_mag", "titans_mac")


def zigzag_order(t: int, n: int) -> np.ndarray:
    """[T] int: the zigzag row's token i is the original row's token order[i] (shard r's
    Tl = T / N tokens are pieces r and 2N - 1 - r of L = T / 2N tokens)."""
    if t % (2 * n):
        raise ValueError(f"the zigzag layout cuts each row into 2 x mesh.sequence = {2 * n} "
                         f"pieces; the sequence length {t} is not a multiple of {2 * n}")
    piece = t // (2 * n)
    pieces = [p for r in range(n) for p in (r, 2 * n - 1 - r)]
    return np.concatenate([np.arange(p * piece, (p + 1) * piece) for p in pieces])


@dataclasses.dataclass(frozen=True)
class SequenceShards:
    """The mesh an op's time axis is sharded over, and how."""

    mesh: Mesh
    layout: str = "contiguous"
    attention: str = "all_gather"       # softmax attention's exchange: all_gather | ring

    @property
    def n(self) -> int:
        return self.mesh.shape[SEQUENCE]

    @property
    def slots(self) -> int:
        """Pieces per shard: 1 (contiguous) or 2 (zigzag)."""
        return 2 if self.layout == "zigzag" else 1

    @property
    def n_pieces(self) -> int:
        return self.n * self.slots

    def piece_at(self, shard, slot):
        """The original-order index of the piece in `slot` of `shard` (ints or traced)."""
        if self.slots == 1:
            return shard
        return shard if slot == 0 else 2 * self.n - 1 - shard

    def where_piece(self, piece: int) -> tuple[int, int]:
        """(shard, slot) holding original piece `piece`."""
        if self.slots == 1:
            return piece, 0
        return (piece, 0) if piece < self.n else (2 * self.n - 1 - piece, 1)

    def order(self, t: int) -> np.ndarray:
        """[T]: the row as laid out, by original token index."""
        return np.arange(t) if self.slots == 1 else zigzag_order(t, self.n)

    def local_tokens(self, tl: int):
        """Inside a shard: [Tl] int32 original indices of its tokens."""
        r = jax.lax.axis_index(SEQUENCE)
        length = tl // self.slots
        return jnp.concatenate([self.piece_at(r, s) * length + jnp.arange(length, dtype=jnp.int32)
                                for s in range(self.slots)])

    def document_positions(self, segment_ids: jax.Array) -> jax.Array:
        """[B, T] in-document positions of a laid-out row, counted in the original order (a
        global op: XLA gathers the [B, T] ids, not an activation)."""
        order = self.order(segment_ids.shape[1])
        inverse = np.argsort(order)
        return document_positions(segment_ids[:, inverse])[:, order]

    def batch_spec(self, batch: int):
        """The batch axes when they divide the batch (else replicated)."""
        axes = tuple(a for a in BATCH_AXES if a in self.mesh.shape)
        return axes if axes and batch % math.prod(self.mesh.shape[a] for a in axes) == 0 \
            else None

    def head_spec(self, heads: int):
        size = self.mesh.shape.get(HEAD_AXIS, 1)
        return HEAD_AXIS if size > 1 and heads % size == 0 else None

    def spec(self, x: jax.Array, heads: bool = True) -> P:
        """[B, T, H, ...] (heads=True) or [B, T, ...]: batch, time over `sequence`, heads over
        `tensor` where they divide; the rest replicated."""
        rest = [None] * (x.ndim - 2)
        if heads and x.ndim >= 3:
            rest[0] = self.head_spec(x.shape[2])
        return P(self.batch_spec(x.shape[0]), SEQUENCE, *rest)

    def check_length(self, op: str, t: int, at_least: int = 1) -> int:
        """Tl, after checking that the pieces divide T and each piece has >= at_least
        tokens."""
        pieces = self.n_pieces
        if t % pieces:
            raise ValueError(f"{op}: the sequence length {t} must be a multiple of {pieces} "
                             f"(mesh.sequence = {self.n}, {self.layout} layout)")
        if t // pieces < at_least:
            raise ValueError(f"{op}: each of the {pieces} sequence pieces holds {t // pieces} "
                             f"tokens, fewer than the {at_least} it needs from the previous "
                             "one; use fewer shards or longer sequences")
        return t // self.n


_STATE = threading.local()


def sequence_shards() -> SequenceShards | None:
    """The active SequenceShards, or None (no `shard_sequence` block, or inside a shard)."""
    return getattr(_STATE, "shards", None)


@contextlib.contextmanager
def _set(value) -> Iterator[None]:
    previous = getattr(_STATE, "shards", None)
    _STATE.shards = value
    try:
        yield
    finally:
        _STATE.shards = previous


def shard_sequence(mesh: Mesh, layout: str = "contiguous", attention: str = "all_gather"):
    """Inside this block ops run sequence-parallel over mesh's `sequence` axis in `layout`,
    softmax attention by `attention` ("all_gather" or "ring"), read when a function is traced.
    A no-op context when that axis has size 1. (Being trace-time state, it is not part of
    jax.jit's cache key: a jitted function already traced for the same input shapes and
    shardings outside the block, or in another layout, is not traced again inside it. Jit a
    fresh function per layout; train.py fixes one per run.)"""
    if layout not in LAYOUTS:
        raise ValueError(f"sequence layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if attention not in ATTENTION_EXCHANGES:
        raise ValueError(f"sequence attention must be one of {', '.join(ATTENTION_EXCHANGES)};"
                         f" got {attention!r}")
    if mesh.shape.get(SEQUENCE, 1) <= 1:
        return contextlib.nullcontext()
    return _set(SequenceShards(mesh, layout, attention))


def inside_shard():
    """For the body of a shard_map: ops called there see their local slice only."""
    return _set(None)


def run_sharded(shards: SequenceShards, local, args, in_specs, out_specs):
    """jax.shard_map(local) over every mesh axis, with `inside_shard()` while tracing it."""
    def body(*a):
        with inside_shard():
            return local(*a)

    return jax.shard_map(body, mesh=shards.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


def split_pieces(x: jax.Array, slots: int) -> jax.Array:
    """Inside a shard: [B, Tl, ...] -> [slots * B, Tl / slots, ...], slot-major (the pieces as
    rows of their own)."""
    b, tl = x.shape[:2]
    x = x.reshape(b, slots, tl // slots, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(slots * b, tl // slots, *x.shape[3:])


def merge_pieces(x: jax.Array, slots: int) -> jax.Array:
    """split_pieces' inverse."""
    sb, length = x.shape[:2]
    x = x.reshape(slots, sb // slots, length, *x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(sb // slots, slots * length, *x.shape[3:])


def pieces_in_order(gathered: jax.Array, shards: SequenceShards) -> jax.Array:
    """all_gather'd per-slot values [N, slots, ...] -> [pieces, ...] in original order."""
    at = [shards.where_piece(p) for p in range(shards.n_pieces)]
    return gathered[np.array([s for s, _ in at]), np.array([k for _, k in at])]


def previous_rows(pieces: jax.Array, rows: int, shards: SequenceShards, fill=0) -> jax.Array:
    """Inside a shard: pieces [P B, L, ...] (split_pieces' slot-major layout) -> [P B, R, ...],
    for each local piece the R rows before it in the original order (`fill` before the row):
    one ppermute per slot when R <= L, else every piece all-gathered (halo.py says why)."""
    slots, n = shards.slots, shards.n
    length = pieces.shape[1]
    rest = pieces.shape[2:]
    by_slot = pieces.reshape(slots, -1, length, *rest)                  # [slots, B, L, ...]
    r = jax.lax.axis_index(SEQUENCE)
    if rows <= length:
        tails = by_slot[:, :, length - rows:]
        forward = [(i, i + 1) for i in range(n - 1)]        # piece r - 1 lives on shard r - 1
        got = [jax.lax.ppermute(tails[0], SEQUENCE, forward)]
        if slots == 2:
            # Slot 1 holds piece 2N - 1 - r, whose predecessor 2N - 2 - r is shard r + 1's
            # slot 1, or for r = N - 1 piece N - 1: this shard's own slot 0.
            back = jax.lax.ppermute(tails[1], SEQUENCE, [(i, i - 1) for i in range(1, n)])
            got.append(jnp.where(r == n - 1, tails[0], back))
        got[0] = jnp.where(r == 0, jnp.full_like(got[0], fill), got[0])
        return jnp.concatenate(got, axis=0)
    back = -(-rows // length)                               # pieces the halo reaches back
    ordered = pieces_in_order(jax.lax.all_gather(by_slot, SEQUENCE), shards)  # [pieces, B, L]
    ordered = jnp.concatenate([jnp.full((back,) + ordered.shape[1:], fill, ordered.dtype),
                               ordered])
    out = []
    for slot in range(slots):
        before = jax.lax.dynamic_slice_in_dim(ordered, shards.piece_at(r, slot), back, axis=0)
        before = jnp.moveaxis(before, 0, 1).reshape(-1, back * length, *rest)
        out.append(before[:, back * length - rows:])
    return jnp.concatenate(out, axis=0)


def whole_rows(shards: SequenceShards, xs, heads=None):
    """Arrays [B, T, ...] sharded over the sequence axis -> the same rows whole on every shard
    of it and in the original token order (one all-gather each, the layout's order undone by
    a static permutation). heads: the spec of axis 2 (kept sharded, e.g. over `tensor`).
    For ops that read every key of a row (NSA's selection and compression); the gradient
    flows back as a reduce-scatter."""
    inverse = np.argsort(shards.order(xs[0].shape[1]))
    batch = shards.batch_spec(xs[0].shape[0])

    def local(*xs):
        return tuple(jax.lax.all_gather(x, SEQUENCE, axis=1, tiled=True)[:, inverse]
                     for x in xs)

    in_specs = tuple(P(batch, SEQUENCE, *([heads] if x.ndim > 2 else [])) for x in xs)
    out_specs = tuple(P(batch, None, *([heads] if x.ndim > 2 else [])) for x in xs)
    return run_sharded(shards, local, tuple(xs), in_specs, out_specs)
