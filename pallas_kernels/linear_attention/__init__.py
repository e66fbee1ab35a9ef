"""Linear attention (Katharopoulos et al. 2020): one public op with selectable backends.

Shapes: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

from pallas_kernels.dispatch import run_linear_op
from pallas_kernels.linear_attention.reference import EPS, linear_attention_reference
from pallas_kernels.linear_attention.xla import linear_attention_xla
from pallas_kernels.segments import check_segment_ids


def linear_attention(q, k, v, *, scale=None, normalize=False, initial_state=None,
                     output_final_state=False, chunk_size=64, backend="auto", precision="auto",
                     segment_ids=None):
    """Causal linear attention: S_t = S_{t-1} + k_t v_t^T, o_t = (scale q_t)^T S_t.

    With normalize=True, o_t is divided by (scale q_t)^T z_t + EPS (EPS = 1e-6), where
    z_t = sum_{i<=t} k_i is the running key sum (Katharopoulos et al. 2020, Eq. 20). The feature
    map (e.g. elu + 1) is the caller's job; normalize assumes non-negative q and k.

    State convention: with normalize=False the state is S [B, H, K, V]; with normalize=True it
    is the tuple (S [B, H, K, V], z [B, H, K]), both for initial_state and for final_state, so
    that continuing from a returned state (decoding) gives the same result as one long call.

    Args:
        q: [B, T, H, K] queries, float32 or bf16.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        scale: query scale; defaults to K ** -0.5.
        normalize: apply the running-key-sum normalizer.
        initial_state: state before the first token (format above) or None for zeros.
        output_final_state: also return the float32 state after the last token.
        chunk_size: tokens per chunk of the chunked backends (ignored by "reference").
        backend: a name of pallas_kernels/backends.py for this op: "auto", "reference"
            (token-by-token scan), "xla" (chunkwise) or "pallas" (chunkwise, state sweep in a
            Pallas kernel; "pallas_gpu" / "pallas_tpu" name the driver).
        precision: matmul operands of the chunked backends (pallas_kernels/precision.py):
            "highest" (float32), "bf16" (bf16 operands, float32 accumulation), or "auto".
        segment_ids: optional [B, T] int ids of packed documents (0 = padding, documents from
            1): S (and z) restart from zero at each document start, padding is inert, and the
            final state is the last document's (pallas_kernels/segments.py). Every backend.

    Returns:
        (o [B, T, H, V] in q's dtype, final_state or None when output_final_state is False).

    Raises:
        ValueError: unknown backend or precision, or a state of the wrong format or shape.
    """
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}")
    check_segment_ids("linear_attention", segment_ids, q)
    return run_linear_op("linear_attention", linear_attention_reference, linear_attention_xla,
                         q, k, v, backend=backend, precision=precision, chunk_size=chunk_size,
                         scale=scale, normalize=normalize, initial_state=initial_state,
                         output_final_state=output_final_state, segment_ids=segment_ids)


__all__ = ["EPS", "linear_attention"]
