"""Packed documents in the ops: one row holds several documents, told apart by segment ids.

Shapes: B batch, T time, N chunks (or blocks), C chunk size, S buffer slots.

segment_ids [B, T] int32: 0 marks padding, documents are numbered from 1 within a row (splash
attention's SegmentIds convention). The state restarts from zero at every document start (a
token whose id differs from the previous token's and is not padding); the first document of a
row continues from initial_state. Padding is made inert: its q, k, v, gates and betas are
replaced by zeros with jnp.where (so NaN or Inf there never reaches a real token, in values
or gradients), and a padding token is never a start, so trailing padding leaves the last
document's state as the final state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.chunking import pad_to_multiple


def check_segment_ids(op: str, segment_ids, q) -> None:
    """Raises ValueError unless segment_ids is an integer [B, T] array matching q [B, T, ...]."""
    if segment_ids is None:
        return
    if segment_ids.shape != q.shape[:2] or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"{op}: segment_ids must be an integer [B, T] = {q.shape[:2]} array "
                         f"(0 = padding, documents numbered from 1); got {segment_ids.dtype} "
                         f"{segment_ids.shape}")


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, T] bool: token t opens a new document (the state is reset before it)."""
    prev = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
    return (segment_ids != prev) & (segment_ids != 0)


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32 position of each token inside its document (0 at each document start;
    a run of padding counts from 0 too). RoPE and attention masks of packed rows use these."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    prev = jnp.concatenate([segment_ids[:, :1] - 1, segment_ids[:, :-1]], axis=1)
    first = jnp.where(segment_ids != prev, idx, 0)
    return idx - jax.lax.cummax(first, axis=1)


def zero_padding(segment_ids: jax.Array, *arrays):
    """Each [B, T, ...] array with its padding positions (segment id 0) replaced by zeros."""
    real = segment_ids != 0
    return tuple(None if a is None else
                 jnp.where(real.reshape(real.shape + (1,) * (a.ndim - 2)), a, jnp.zeros_like(a))
                 for a in arrays)


def reset_at_starts(state: jax.Array, start_t: jax.Array) -> jax.Array:
    """state [B, ...] with the rows where start_t [B] is True set to zero (a scan step)."""
    return jnp.where(start_t.reshape(start_t.shape + (1,) * (state.ndim - 1)), 0.0, state)


class ChunkMasks:
    """What packed documents change in the chunked form, per chunk (C tokens), from the
    inclusive count of document starts within the chunk, n_i:

        same [B, 1, N, C, C]   n_i == n_j: tokens i and j are in one document (with the
                               causal mask: j <= i and no start in (j, i])
        reads [B, 1, N, C, 1]  n_i == 0: token i's document began before the chunk, so it
                               reads the chunk-start state
        writes [B, 1, N, C, 1] n_j == n_C: token j is in the chunk's last document, the one
                               the end-of-chunk state belongs to
        keeps [B, 1, N, 1]     n_C == 0: no start in the chunk, the state carries over

    Masks multiply (0 / 1) or select; no gate is pushed to -inf, so decay differences stay
    finite. The sweep itself (state_passing, every backend) needs nothing else.
    """

    def __init__(self, segment_ids: jax.Array, chunk_size: int):
        starts = pad_to_multiple(document_starts(segment_ids), chunk_size, axis=1)
        b, tp = starts.shape
        n_c = jnp.cumsum(starts.reshape(b, 1, tp // chunk_size, chunk_size).astype(jnp.int32),
                         axis=-1)                                   # [B, 1, N, C]
        self.count = n_c
        self.same = n_c[..., :, None] == n_c[..., None, :]
        self.reads = (n_c == 0)[..., None]
        self.writes = (n_c == n_c[..., -1:])[..., None]
        self.keeps = (n_c[..., -1] == 0)[..., None]


class DocumentLayout(NamedTuple):
    """Where document_layout puts each token of a packed row (all int32 unless said).

    slot [B, T]: the token's slot in the [B, S] buffer (S for padding: dropped by scatters).
    segment_ids [B, S]: the buffer's document ids (0 at empty slots, the prefix slots too).
    opens [B, N] bool: block n begins a document (the state resets before it).
    fits [] bool: every row's documents fit in the S = N * block slots.
    """

    slot: jax.Array
    segment_ids: jax.Array
    opens: jax.Array
    fits: jax.Array


def document_layout(segment_ids: jax.Array, block: int, n_blocks: int,
                    prefix: int = 0) -> DocumentLayout:
    """Lays packed documents out so that each starts on a block boundary: document d takes
    ceil((prefix + len_d) / block) whole blocks, its tokens after `prefix` empty slots (its
    first token sits where a starting chunk offset puts it), then padding.

    For rules whose block grid counts from the document start (Titans' gradient chunks, MAC's
    segments), which a row's shared chunk grid cannot follow. n_blocks is static: rows whose
    documents need more blocks have fits = False, and the caller must take another path.
    """
    real = segment_ids != 0
    pos = document_positions(segment_ids) + prefix
    opens = real & (pos == prefix)
    # Blocks that begin at this token: its document's prefix blocks and its own at an opening,
    # else one at every block boundary of the document.
    begins = jnp.where(opens, prefix // block + 1, (real & (pos % block == 0)).astype(jnp.int32))
    used = jnp.cumsum(begins.astype(jnp.int32), axis=1)
    s = n_blocks * block
    slot = jnp.where(real, (used - 1) * block + pos % block, s).astype(jnp.int32)
    b = segment_ids.shape[0]
    bi = jnp.arange(b)[:, None]
    first = jnp.where(opens, slot - prefix, s)                 # first slot of each document
    buf_seg = jnp.zeros((b, s), jnp.int32).at[bi, slot].set(segment_ids.astype(jnp.int32),
                                                             mode="drop")
    block_opens = jnp.zeros((b, n_blocks), bool).at[bi, first // block].set(opens, mode="drop")
    return DocumentLayout(slot, buf_seg, block_opens, jnp.all(used[:, -1] <= n_blocks))
