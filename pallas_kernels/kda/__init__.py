"""Kimi Delta Attention (KDA): the gated delta rule with a decay per key channel, one public
op with selectable backends.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

Backends (pallas_kernels/backends.py): "reference" (token-by-token lax.scan, reference.py),
"xla" (chunkwise gated WY form with per-channel decays, xla.py), "pallas" (the same with the
state sweep in a Pallas kernel: pallas_kernels/state_passing), the kernel libraries
"deltanet_tpu" (chunk_kda, TPU), "jla" (jax-linear-attention's KDA kernels, Hopper) and
"tokamax" (tokamax.ops.kimi_delta_attention: Mosaic TPU; no packed documents)
(pallas_kernels/libraries); "auto" per platform from backends.AUTO. Arguments follow
flash-linear-attention's chunk_kda.
"""

from __future__ import annotations

from pallas_kernels.arguments import check_delta_inputs
from pallas_kernels.dispatch import run_linear_op
from pallas_kernels.kda.reference import kda_reference
from pallas_kernels.kda.xla import kda_xla
from pallas_kernels.segments import check_segment_ids

__all__ = ["kda", "kda_reference", "kda_xla"]


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        chunk_size=64, backend="auto", precision="auto", segment_ids=None):
    """KDA: S'_t = diag(exp(g_t)) S_{t-1}; S_t = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T;
    o_t = (scale q_t)^T S_t.

    The state, gates and the triangular solve are float32 whatever the input dtype. k is
    normally L2-normalised by the caller, but the op does not assume it.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H, K] log-space decays per key channel (<= 0).
        beta: [B, T, H] write strengths, usually in (0, 1).
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        chunk_size: chunk length of the chunked backends (ignored by "reference").
        backend: a name of pallas_kernels/backends.py for this op ("auto", "reference", "xla",
            "pallas", "pallas_gpu", "pallas_tpu", "deltanet_tpu", "jla", "tokamax").
        precision: matmul operands of the chunked backends (pallas_kernels/precision.py):
            "highest" (float32), "bf16" (bf16 operands, float32 accumulation), or "auto".
        segment_ids: optional [B, T] int ids of packed documents (0 = padding, documents from
            1): the state restarts from zero at each document start, padding is inert, and
            the final state is the last document's (pallas_kernels/segments.py). Every backend.

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32, or None when
        output_final_state is False).

    Raises:
        ValueError: unknown backend or precision, inconsistent shapes, or chunk_size < 1.
    """
    check_delta_inputs("kda", q, k, v, beta, initial_state=initial_state)
    if g.shape != k.shape:
        raise ValueError(f"kda: g must be [B, T, H, K] = {k.shape} (a log decay per key "
                         f"channel); got {g.shape}")
    check_segment_ids("kda", segment_ids, q)
    return run_linear_op("kda", kda_reference, kda_xla, q, k, v, g, beta,
                         backend=backend, precision=precision, chunk_size=chunk_size,
                         scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, segment_ids=segment_ids)
