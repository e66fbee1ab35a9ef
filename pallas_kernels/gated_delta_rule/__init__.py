"""Gated delta-rule linear attention (Gated DeltaNet): one public op with selectable backends.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

Backends (pallas_kernels/backends.py): "reference" (token-by-token lax.scan, reference.py),
"xla" (chunkwise gated WY form, xla.py), "pallas" (the same chunkwise form with the sequential
state sweep in a Pallas kernel, forward and backward: pallas_kernels/state_passing); "auto" per
platform from backends.AUTO. The ungated delta rule (pallas_kernels/delta_rule) is this op
with no gate.
"""

from __future__ import annotations

from pallas_kernels.arguments import check_delta_inputs
from pallas_kernels.dispatch import run_linear_op
from pallas_kernels.gated_delta_rule.reference import gated_delta_rule_reference
from pallas_kernels.gated_delta_rule.xla import gated_delta_rule_xla
from pallas_kernels.segments import check_segment_ids

__all__ = ["gated_delta_rule", "gated_delta_rule_reference", "gated_delta_rule_xla"]


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                     output_final_state=False, chunk_size=64, backend="auto", precision="auto",
                     segment_ids=None):
    """Gated delta rule: S'_t = exp(g_t) S_{t-1}; S_t = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T;
    o_t = (scale q_t)^T S_t.

    The state, gates and the triangular solve are float32 whatever the input dtype. k is
    normally L2-normalised by the caller, but the op does not assume it.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decays (<= 0; exp(g_t) multiplies the state), or None for the
            ungated delta rule.
        beta: [B, T, H] write strengths, usually in (0, 1).
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        chunk_size: chunk length of the chunked backends (ignored by "reference").
        backend: a name of pallas_kernels/backends.py for this op ("auto", "reference", "xla",
            "pallas", "pallas_gpu", "pallas_tpu").
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
    op = "gated_delta_rule" if g is not None else "delta_rule"
    check_delta_inputs(op, q, k, v, beta, g=g, initial_state=initial_state)
    check_segment_ids(op, segment_ids, q)
    return run_linear_op(op, gated_delta_rule_reference, gated_delta_rule_xla, q, k, v, g, beta,
                         backend=backend, precision=precision, chunk_size=chunk_size,
                         scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, segment_ids=segment_ids)
