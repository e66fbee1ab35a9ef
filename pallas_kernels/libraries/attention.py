"""Attention through the field's kernels, behind pallas_kernels/attention's signature:
"cudnn" (NVIDIA's cuDNN flash attention through jax.nn.dot_product_attention) and "tokamax"
(tokamax.dot_product_attention: its Mosaic TPU kernel, its Mosaic GPU (sm_90) or Triton kernel
on a GPU, its XLA form on a CPU).

Shapes: B batch, T tokens, H query heads, Hkv key/value heads, Dh head dim; q [B, T, H, Dh],
k, v [B, T, Hkv, Dh] (both libraries' own layout, GQA included).

Masks. Ours: query t sees key j iff j <= t and (t - j < window or j < n_sinks). jax's and
tokamax's `local_window_size=(left, right)` shows keys t - left .. t + right, so window w is
(w - 1, 0); with is_causal the right side is empty anyway.
  cudnn    causal and windows. No sinks, no packed documents (jax's cuDNN call has per-row
           lengths, not segment ids), bf16 / fp16 only: refused with the backend that can.
  tokamax  causal, and windows natively on a GPU and CPU; sinks, packed documents and (on a
           TPU, whose tokamax kernel refuses a causal window) windows through a dense [B, 1, T, T]
           bool mask (masks.packed_visibility), which its kernels take block by block but which
           costs T^2 bytes per row in memory: for long packed rows "flash" (GPU) and "splash"
           (TPU) build their masks from segment ids instead.

Off a GPU, inside interpret_kernels() (the CPU tests), "cudnn" runs jax.nn.dot_product_attention
with implementation="xla" and the same arguments: that checks the adapter (window, scale, GQA,
dtype), not NVIDIA's kernel: lowering it needs cuDNN on the machine (tests/test_lowering.py
skips it with that reason where cuDNN is absent), and benchmarks/device_check.sh runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backends import kernel_interpret, target_platform
from pallas_kernels.masks import packed_visibility, visibility_mask

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# tokamax implementations to try on each target, in order (it takes the first one that
# supports the call): its Pallas kernels on accelerators, its XLA form elsewhere. Named
# per platform ("mosaic" alone would be resolved from the attached device, which a lowering
# from a CPU does not have).
TOKAMAX_IMPLEMENTATIONS = {"tpu": ("mosaic_tpu",), "gpu": ("mosaic_gpu", "triton"),
                           "cpu": ("xla",)}


def unsupported_reason(backend: str, q, window, n_sinks, segment_ids) -> str | None:
    """Why `backend` ("cudnn" / "tokamax") cannot take this attention call (None if it can)."""
    if backend == "tokamax":
        return None
    if n_sinks:
        return "has no attention sinks: use 'flash' (GPU), 'splash' (TPU) or 'xla'"
    if segment_ids is not None:
        return ("takes no packed documents (jax's cuDNN call has per-row lengths, not segment "
                "ids): use 'flash' (GPU), 'splash' (TPU), 'tokamax' or 'xla'")
    if jnp.dtype(q.dtype) not in CUDNN_DTYPES:
        return (f"runs bf16 / fp16 inputs only (cuDNN flash attention); got {q.dtype}: cast the "
                "inputs, or use 'flash' or 'xla'")
    return None


def _window(window):
    return None if window is None else (window - 1, 0)


def cudnn_attention(q, k, v, *, window, scale):
    """[B, T, H, Dh] causal (windowed) attention through jax's cuDNN call."""
    implementation = "xla" if kernel_interpret("cudnn") else "cudnn"
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=_window(window),
                                        implementation=implementation)


def tokamax_attention(q, k, v, *, window, n_sinks, scale, segment_ids):
    """[B, T, H, Dh] causal attention through tokamax, with windows, sinks and packed
    documents (the latter two as a dense mask, see the module docstring)."""
    import tokamax

    implementation = TOKAMAX_IMPLEMENTATIONS.get(target_platform(), ("xla",))
    mask, local_window = None, _window(window)
    if segment_ids is not None:
        mask, local_window = packed_visibility(segment_ids, window, n_sinks)[:, None], None
    elif n_sinks or (window is not None and target_platform() == "tpu"):
        mask, local_window = visibility_mask(q.shape[1], window, n_sinks)[None, None], None
    return tokamax.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                         local_window_size=local_window,
                                         implementation=implementation)
