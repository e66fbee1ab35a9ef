"""Softmax attention op. Only the readable reference lives here so far; the layer's XLA path is
layers/attention.py and the Pallas kernels (splash on TPU, window-skipping on GPU) come with
the kernels issue."""

from pallas_kernels.attention.reference import attention_reference

__all__ = ["attention_reference"]
