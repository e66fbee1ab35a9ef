"""Delta-rule linear attention (DeltaNet): one public op with selectable backends.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

Backends: "reference" (token-by-token lax.scan, reference.py), "xla" (chunkwise WY form,
xla.py), "pallas" (the same form with the state sweep in a Pallas kernel: state_passing).
"auto" picks "xla": the kernels have been checked only in the Pallas interpreter so far.
"""

from __future__ import annotations

from pallas_kernels.common import (
    PALLAS_BACKENDS,
    check_delta_inputs,
    check_segment_ids,
    fitted_chunk_size,
    resolve_backend,
    state_backend,
)
from pallas_kernels.delta_rule.reference import delta_rule_reference
from pallas_kernels.delta_rule.xla import delta_rule_xla

__all__ = ["delta_rule", "delta_rule_reference", "delta_rule_xla"]


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               chunk_size=64, backend="auto", interpret=False, segment_ids=None):
    """Delta rule: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = (scale q_t)^T S_t.

    Computed in float32 whatever the input dtype. k is normally L2-normalised by the caller, but
    the op does not assume it.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths, usually in (0, 1).
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        chunk_size: chunk length of the chunked backends (ignored by "reference").
        backend: "auto" (= "xla"), "reference", "xla", or "pallas" (the platform's kernel;
            "pallas_gpu" / "pallas_tpu" name one).
        interpret: run a Pallas backend in the interpreter (needed on CPU).
        segment_ids: optional [B, T] int ids of packed documents, as in gated_delta_rule.

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32, or None when
        output_final_state is False).

    Raises:
        ValueError: unknown backend, inconsistent shapes, or chunk_size < 1.
    """
    impl = resolve_backend(backend, ("reference", "xla", *PALLAS_BACKENDS), op="delta_rule")
    check_delta_inputs("delta_rule", q, k, v, beta, initial_state=initial_state)
    check_segment_ids("delta_rule", segment_ids, q)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  segment_ids=segment_ids)
    if impl == "reference":
        return delta_rule_reference(q, k, v, beta, **kwargs)
    if int(chunk_size) < 1:
        raise ValueError(f"delta_rule: chunk_size must be >= 1; got {chunk_size}")
    # Shorter than one chunk: a shorter chunk, not padding (common.fitted_chunk_size).
    chunk_size = fitted_chunk_size(q.shape[1], chunk_size)
    return delta_rule_xla(q, k, v, beta, chunk_size=chunk_size, **kwargs,
                          state_impl=state_backend(impl, interpret, "delta_rule"),
                          interpret=interpret)
