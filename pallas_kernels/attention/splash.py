"""TPU attention through jax's bundled splash attention (Pallas / Mosaic), with window and sinks.

Shape legend:
  B batch, T tokens (Tp: T padded to the block size), H query heads, Hkv key/value heads,
  G = H / Hkv, Dh head dim. In/out [B, T, H, Dh] like the rest of the package; splash itself
  takes one batch row, heads first: q [H, Tp, Dh], k/v [Hkv, Tp, Dh] (MHA/GQA) or [Tp, Dh] (MQA).

Query t sees key j iff j <= t and (window is None or t - j < window or j < n_sinks), as in
reference.py. Splash builds the block-sparse structure from the mask on the host when the
kernel is made, and skips fully masked (query block, key block) pairs in the forward and both
backward kernels: window + sinks costs O(T * (window + n_sinks)), not O(T^2). The kernel is the
FlashAttention-2 online softmax (Dao 2023) with float32 accumulators.

Masks (jax.experimental.pallas.ops.tpu.splash_attention, this jax version):
  * no window: CausalMask.
  * window W: LocalMask(window_size=(W - 1, 0)), i.e. t - (W - 1) <= j <= t (causal included).
  * sinks: `LocalMask | SinkMask`; `|` of two masks builds a LogicalOr, evaluated lazily block
    by block like the built-in masks. SinkMask (below) is j < n_sinks and j <= t, computed per
    block, so no dense [Tp, Tp] array is ever built (a NumpyMask would be one).
The splash `sinks=` argument of this version is a different thing (a learned per-head logit
added to the softmax denominator, gpt-oss style), not StreamingLLM's first-token sinks.

GQA: make_splash_mha takes k/v with fewer heads and maps query head h to kv head h // G in
its index maps; make_splash_mqa (k/v without a head axis) serves Hkv = 1.

Splash does not scale the scores: q is multiplied by `scale` here (in float32, then cast back
to q's dtype). Padding: Tp = T rounded up to the block size; padded keys sit after every real
query, so the causal mask already hides them, and padded query rows are sliced off.
Splash has an `interpret` flag: with interpret=True the kernels run on CPU (the tests use it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa


class SinkMask(sa.Mask):
    """[Tq, Tk] lazy mask: key j is visible from query t iff j < n_sinks and j <= t."""

    def __init__(self, shape: tuple[int, int], n_sinks: int):
        self._shape = tuple(shape)
        self.n_sinks = n_sinks

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def __getitem__(self, idx) -> np.ndarray:
        if not (isinstance(idx, tuple) and len(idx) == 2):
            raise IndexError(f"SinkMask takes [rows, cols] indices, got {idx!r}")
        # numpy indexing of the position ranges: slices, ints or index arrays alike.
        t = np.arange(self._shape[0])[idx[0]]
        j = np.arange(self._shape[1])[idx[1]]
        if np.ndim(t) and np.ndim(j):
            t, j = t[:, None], j[None, :]
        return (j < self.n_sinks) & (j <= t)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SinkMask) and self._shape == other._shape
                and self.n_sinks == other.n_sinks)

    def __hash__(self) -> int:
        return hash((SinkMask, self._shape, self.n_sinks))


def make_mask(seq_len: int, window: int | None, n_sinks: int) -> sa.Mask:
    """The [seq_len, seq_len] splash mask of (causal, window, n_sinks)."""
    shape = (seq_len, seq_len)
    if window is None:
        return sa.CausalMask(shape)
    mask = sa.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    if n_sinks:
        mask = mask | SinkMask(shape, n_sinks)
    return mask


@functools.lru_cache(maxsize=64)
def _kernel(seq_len: int, n_heads: int, mqa: bool, window: int | None, n_sinks: int,
            block: int, interpret: bool):
    # Processing the mask into splash's block tables is host-side numpy work, once per setting.
    mask = sa.MultiHeadMask([make_mask(seq_len, window, n_sinks)] * n_heads)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    make = sa.make_splash_mqa if mqa else sa.make_splash_mha
    # The kernel holds its block tables as jax arrays and is cached across traces: make them
    # concrete even when the first call happens under jit, or a later trace would see a leaked
    # tracer.
    with jax.ensure_compile_time_eval():
        return make(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                    interpret=interpret)


def splash_attention(q, k, v, *, window: int | None = None, n_sinks: int = 0,
                     scale: float | None = None, block_size: int = 128,
                     interpret: bool = False, segment_ids=None):
    """Causal softmax attention with optional window and sinks, splash kernel (TPU).

    Args:
        q: [B, T, H, Dh]; k, v: [B, T, Hkv, Dh], H a multiple of Hkv (checked by the
            dispatcher).
        window, n_sinks: visibility as in reference.py.
        scale: score scale, default Dh ** -0.5.
        block_size: query and key tile (a multiple of 128, splash's lane width).
        interpret: run splash's kernels in the Pallas interpreter (CPU tests).
        segment_ids: optional [B, T] int packed-document ids, splash's own SegmentIds: keys
            of other documents are masked; within a document the causal / local masks count
            the same distances as in-document positions. Not with sinks (the dispatcher
            refuses that: SinkMask is row-absolute).

    Returns:
        [B, T, H, Dh] in q's dtype; differentiable (splash's own custom_vjp).
    """
    b, t, h, dh = q.shape
    hkv = k.shape[2]
    scale = dh ** -0.5 if scale is None else float(scale)
    tp = -(-t // block_size) * block_size
    kernel = _kernel(tp, h, hkv == 1, window, int(n_sinks), block_size, bool(interpret))

    def heads_first(x):   # [B, T, Hx, Dh] -> [B, Hx, Tp, Dh]
        x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)

    qs = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype))
    ks, vs = heads_first(k.astype(q.dtype)), heads_first(v.astype(q.dtype))
    if hkv == 1:
        ks, vs = ks[:, 0], vs[:, 0]
    if segment_ids is None:
        o = jax.vmap(kernel)(qs, ks, vs)          # [B, H, Tp, Dh]
    else:
        # Padded tail: segment id -1, a document of its own that no real query sees.
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
        o = jax.vmap(lambda q_, k_, v_, s_: kernel(q_, k_, v_, segment_ids=sa.SegmentIds(
            q=s_, kv=s_)))(qs, ks, vs, seg)
    return jnp.swapaxes(o, 1, 2)[:, :t].astype(q.dtype)
