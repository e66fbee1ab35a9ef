"""Gated linear attention (Yang et al. 2024): `gla` (per-key-channel decay) and `simple_gla`
(one scalar decay per head), each with selectable backends.

Shapes: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

from pallas_kernels.dispatch import run_linear_op
from pallas_kernels.gla.reference import gla_reference, simple_gla_reference
from pallas_kernels.gla.xla import gla_xla, simple_gla_xla
from pallas_kernels.segments import check_segment_ids


def _check(q, k, v, gate, gate_shape, name):
    """Raises ValueError unless q, k, v and the gate have consistent shapes."""
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or gate.shape != gate_shape:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}, "
                         f"{name} {gate.shape} (expected {gate_shape})")


def gla(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False,
        chunk_size=64, backend="auto", precision="auto", segment_ids=None):
    """Gated linear attention with a per-key-channel decay (Yang et al. 2024, Sec. 4).

    S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T,  o_t = (scale q_t)^T S_t; the "xla" backend uses
    the chunkwise form with secondary sub-chunks (Sec. 4; see xla.py for the numerics).

    Args:
        q: [B, T, H, K] queries, float32 or bf16 (state and gates float32 inside).
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        gk: [B, T, H, K] log-space decays (<= 0), one per key channel.
        scale: query scale; defaults to K ** -0.5.
        initial_state: S [B, H, K, V] before the first token, or None for zeros.
        output_final_state: also return the float32 state after the last token (pass it back
            as initial_state to continue, e.g. when decoding).
        chunk_size: tokens per chunk of the chunked backends (ignored by "reference").
        backend: a name of pallas_kernels/backends.py for this op: "auto", "reference"
            (token-by-token scan), "xla" (chunkwise) or "pallas" (chunkwise, state sweep in a
            Pallas kernel; "pallas_gpu" / "pallas_tpu" name the driver).
        precision: matmul operands of the chunked backends (pallas_kernels/precision.py):
            "highest" (float32), "bf16" (bf16 operands, float32 accumulation), or "auto".
        segment_ids: optional [B, T] int ids of packed documents (0 = padding, documents from
            1): the state restarts from zero at each document start, padding is inert, and
            the final state is the last document's (pallas_kernels/segments.py). Every backend.

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32, or None when
        output_final_state is False).

    Raises:
        ValueError: unknown backend or precision, or mismatched shapes.
    """
    _check(q, k, v, gk, k.shape, "gk")
    check_segment_ids("gla", segment_ids, q)
    return run_linear_op("gla", gla_reference, gla_xla, q, k, v, gk, backend=backend,
                         precision=precision, chunk_size=chunk_size, scale=scale,
                         initial_state=initial_state, output_final_state=output_final_state,
                         segment_ids=segment_ids)


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
               chunk_size=64, backend="auto", precision="auto", segment_ids=None):
    """GLA with one scalar decay per head and step (the head-wise special case of GLA).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T,  o_t = (scale q_t)^T S_t.

    Args:
        q: [B, T, H, K] queries, float32 or bf16 (state and gates float32 inside).
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decays (<= 0), one per head and step.
        scale: query scale; defaults to K ** -0.5.
        initial_state: S [B, H, K, V] before the first token, or None for zeros.
        output_final_state: also return the float32 state after the last token (pass it back
            as initial_state to continue, e.g. when decoding).
        chunk_size: tokens per chunk of the chunked backends (ignored by "reference").
        backend: a name of pallas_kernels/backends.py for this op: "auto", "reference"
            (token-by-token scan), "xla" (chunkwise) or "pallas" (chunkwise, state sweep in a
            Pallas kernel; "pallas_gpu" / "pallas_tpu" name the driver).
        precision: matmul operands of the chunked backends (pallas_kernels/precision.py):
            "highest" (float32), "bf16" (bf16 operands, float32 accumulation), or "auto".
        segment_ids: optional [B, T] int ids of packed documents (0 = padding, documents from
            1): the state restarts from zero at each document start, padding is inert, and
            the final state is the last document's (pallas_kernels/segments.py). Every backend.

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32, or None when
        output_final_state is False).

    Raises:
        ValueError: unknown backend or precision, or mismatched shapes.
    """
    _check(q, k, v, g, q.shape[:3], "g")
    check_segment_ids("simple_gla", segment_ids, q)
    return run_linear_op("simple_gla", simple_gla_reference, simple_gla_xla, q, k, v, g,
                         backend=backend, precision=precision, chunk_size=chunk_size,
                         scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, segment_ids=segment_ids)


__all__ = ["gla", "simple_gla"]
