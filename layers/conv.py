"""Short causal depthwise convolution (as in H3 / Mamba / Based / Gated DeltaNet), with a cache.

Shape legend: B batch, T tokens, C channels, W kernel width.

y_t[c] = sum_{i < W} w[i, c] * x_{t - W + 1 + i}[c]  (+ bias[c]), with x_{<0} = 0.
The decode cache holds the last W - 1 inputs, so prefill, chunked prefill and single-token
steps all see the same window; its size does not depend on the sequence length.

Packed documents (segment_ids, see pallas_kernels/segments.py): tap i reads the token W - 1 - i
steps back, and it is dropped when that token lies before the document's start (its lag
exceeds the in-document position), so no document reads the previous one's tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes, refuse_segments_with_cache
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.context_parallel.halo import sharded_short_conv, short_conv_taps
from pallas_kernels.segments import document_positions


@struct.dataclass
class ConvCache(CacheBytes):
    """tail: [B, W - 1, C], the last W - 1 inputs (zeros before the sequence starts)."""

    tail: jax.Array


class ShortConv(nnx.Module):
    def __init__(self, channels: int, width: int, *, dtype, use_bias: bool = False,
                 rngs: nnx.Rngs):
        if width < 1:
            raise ValueError(f"conv width must be >= 1, got {width}")
        self.width = width
        self.channels = channels
        self.dtype = jnp.dtype(dtype)
        # Fan-in of a depthwise filter is its width: uniform(+-1/sqrt(W)) as in PyTorch's Conv1d.
        bound = width ** -0.5
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels),
                                                   jnp.float32, -bound, bound))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32)) if use_bias else None

    def init_cache(self, batch_size: int, dtype=None) -> ConvCache:
        dtype = self.dtype if dtype is None else dtype
        return ConvCache(tail=jnp.zeros((batch_size, self.width - 1, self.channels), dtype))

    def __call__(self, x: jax.Array, cache: ConvCache | None = None, *, segment_ids=None,
                 document_tail: jax.Array | None = None) -> tuple[jax.Array, ConvCache | None]:
        """x [B, T, C] -> y [B, T, C] (compute dtype) and the updated cache.

        segment_ids: optional [B, T] int packed-document ids (no cache): taps that would
        reach into an earlier document read zero, or, with document_tail [B, W - 1, C] (a
        ConvCache.tail: the inputs every document follows, e.g. Titans' persistent tokens),
        that tail, as each document would after it alone."""
        b, t, c = x.shape
        w = self.width
        x = x.astype(self.dtype)
        shards = sequence_shards()
        if shards is not None and cache is None:
            # Time sharded over the mesh's sequence axis: a halo from the previous shard.
            bias = None if self.bias is None else self.bias[...].astype(self.dtype)
            return sharded_short_conv(x, self.kernel[...].astype(self.dtype), bias,
                                      segment_ids, shards, document_tail), None
        if cache is None:
            past = jnp.zeros((b, w - 1, c), self.dtype)
        else:
            past = cache.tail.astype(self.dtype)
        full = jnp.concatenate([past, x], axis=1)             # [B, W - 1 + T, C]
        kernel = self.kernel[...].astype(self.dtype)
        # W shifted multiply-adds: W is 4 or so, and this form is the same on every backend.
        positions = None
        if segment_ids is not None:
            refuse_segments_with_cache("ShortConv", segment_ids, cache)
            positions = document_positions(segment_ids)                  # [B, T]
        y = short_conv_taps(full, kernel, positions, document_tail)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if cache is not None:
            cache = cache.replace(tail=full[:, t:].astype(cache.tail.dtype))
        return y, cache
