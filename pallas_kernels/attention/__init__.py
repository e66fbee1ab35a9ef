"""Causal softmax attention op with optional sliding window, attention sinks and GQA.

Shape legend: B batch, T tokens, H query heads, Hkv key/value heads (H a multiple of Hkv,
G = H / Hkv), Dh head dim. q [B, T, H, Dh], k/v [B, T, Hkv, Dh] -> o [B, T, H, Dh].

Query t sees key j iff j <= t and (window is None or t - j < window or j < n_sinks)
(StreamingLLM sinks, Xiao et al. 2023); query head h uses kv head h // G.

Backends (one signature, `attention(..., backend=)`):
  * "reference": reference.py, the readable float32 definition (per-head loop, dense mask).
  * "xla": xla.py's dense masked softmax (scores and softmax in float32), the attention
    layers' own path. Portable; O(T^2) memory.
  * "flash": flash.py, a Pallas kernel for the GPU (Triton lowering) that skips key blocks
    outside the window, forward and backward (FlashAttention-2, Dao 2023).
  * "splash": splash.py, jax's bundled splash attention for TPU with window / sink masks.
  * "cudnn", "tokamax": NVIDIA's cuDNN flash attention through jax, and tokamax's kernels
    (pallas_kernels/libraries/attention.py: what each takes, how masks map).
  * "auto": per platform from pallas_kernels/backends.py's AUTO table.
Pallas backends run off their platform only inside backends.interpret_kernels() (CPU tests).
"""

from __future__ import annotations

from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.attention.xla import softmax_attention
from pallas_kernels.backends import auto_fallback, kernel_interpret, resolve_backend
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.masks import packed_visibility, visibility_mask
from pallas_kernels.segments import check_segment_ids, zero_padding

__all__ = ["attention", "attention_reference", "softmax_attention"]


def _check(q, k, v, window, n_sinks) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("attention: q, k, v must be [B, T, H, Dh] / [B, T, Hkv, Dh]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v shapes differ: {k.shape} vs {v.shape}")
    b, t, h, dh = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, t, dh):
        raise ValueError(f"attention: k/v {k.shape} must be [B, T, Hkv, Dh] matching q {q.shape} "
                         "in B, T and Dh (no KV cache here)")
    if k.shape[2] <= 0 or h % k.shape[2]:
        raise ValueError(f"attention: query heads H={h} must be a multiple of key/value heads "
                         f"Hkv={k.shape[2]}")
    if window is not None and window <= 0:
        raise ValueError(f"attention: window must be > 0 or None, got {window}")
    if n_sinks < 0:
        raise ValueError(f"attention: n_sinks must be >= 0, got {n_sinks}")
    if n_sinks and window is None:
        raise ValueError(f"attention: n_sinks={n_sinks} needs a window (full causal attention "
                         "already sees the first tokens)")


def attention(q, k, v, *, window: int | None = None, n_sinks: int = 0,
              scale: float | None = None, backend: str = "auto", segment_ids=None):
    """Causal softmax attention, optional sliding window and sinks, GQA.

    Args:
        q: [B, T, H, Dh].
        k, v: [B, T, Hkv, Dh], H a multiple of Hkv.
        window: keys with t - j >= window are hidden (None: full causal).
        n_sinks: the first n_sinks keys stay visible through the window (needs a window).
        scale: score scale, default Dh ** -0.5.
        backend: "auto", "xla", "flash", "splash", "cudnn", "tokamax" or "reference"
            (module docstring).
        segment_ids: optional [B, T] int ids of packed documents (0 = padding): a query sees
            only keys of its own document, windows and sinks count in-document positions
            (pallas_kernels/masks.packed_visibility). Every backend but "cudnn"; "flash" and
            "splash" not together with sinks (their sink blocks are the row's first).

    Returns:
        [B, T, H, Dh] in q's dtype.

    Raises:
        ValueError: unknown backend, inconsistent shapes or window / sink settings, or a Pallas
            backend off its platform outside backends.interpret_kernels().
    """
    _check(q, k, v, window, n_sinks)
    shards = sequence_shards()
    if shards is not None:
        # Time sharded over the mesh's sequence axis: all-gathered keys and values
        # (context_parallel/attention.py).
        from pallas_kernels.context_parallel.attention import sharded_attention
        if segment_ids is not None:
            check_segment_ids("attention", segment_ids, q)
            q, k, v = zero_padding(segment_ids, q, k, v)
        return sharded_attention(q, k, v, window=window, n_sinks=n_sinks,
                                 scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                 segment_ids=segment_ids, shards=shards)
    impl = resolve_backend("attention", backend)
    if impl in ("cudnn", "tokamax"):
        from pallas_kernels.libraries import attention as library

        reason = library.unsupported_reason(impl, q, window, n_sinks, segment_ids)
        if reason is not None and backend == impl:
            raise ValueError(f"attention: backend {impl!r} {reason}")
        if reason is not None:           # "auto" chose it: the AUTO table's fallback runs
            impl = auto_fallback("attention", impl)
    interpret = kernel_interpret(impl)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if segment_ids is not None:
        check_segment_ids("attention", segment_ids, q)
        if impl in ("flash", "splash") and n_sinks:
            raise ValueError(f"attention: backend {impl!r} does not take segment_ids with "
                             "sinks yet (its sink blocks are the row's first); use 'xla'")
        # Padding inert, as in the linear ops: NaN or Inf there reaches no output or gradient.
        q, k, v = zero_padding(segment_ids, q, k, v)
    if impl == "reference":
        return attention_reference(q, k, v, window=window, n_sinks=n_sinks, scale=scale,
                                   segment_ids=segment_ids).astype(q.dtype)
    if impl == "xla":
        mask = (visibility_mask(q.shape[1], window, n_sinks)[None] if segment_ids is None
                else packed_visibility(segment_ids, window, n_sinks))
        return softmax_attention(q, k, v, mask, scale)
    if impl == "cudnn":
        from pallas_kernels.libraries.attention import cudnn_attention
        return cudnn_attention(q, k, v, window=window, scale=scale)
    if impl == "tokamax":
        from pallas_kernels.libraries.attention import tokamax_attention
        return tokamax_attention(q, k, v, window=window, n_sinks=n_sinks, scale=scale,
                                 segment_ids=segment_ids).astype(q.dtype)
    if impl == "flash":
        from pallas_kernels.attention.flash import flash_attention
        return flash_attention(q, k, v, window=window, n_sinks=n_sinks, scale=scale,
                               interpret=interpret, segment_ids=segment_ids)
    from pallas_kernels.attention.splash import splash_attention
    return splash_attention(q, k, v, window=window, n_sinks=n_sinks, scale=scale,
                            interpret=interpret, segment_ids=segment_ids)
