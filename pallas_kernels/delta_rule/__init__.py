"""Delta-rule linear attention (DeltaNet): the gated delta rule with no gate.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

Every backend is gated_delta_rule's (pallas_kernels/gated_delta_rule) with g = None, which
skips the decay factors rather than multiplying by exp(0) = 1.
"""

from __future__ import annotations

from pallas_kernels.delta_rule.reference import delta_rule_reference
from pallas_kernels.delta_rule.xla import delta_rule_xla
from pallas_kernels.gated_delta_rule import gated_delta_rule

__all__ = ["delta_rule", "delta_rule_reference", "delta_rule_xla"]


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               chunk_size=64, backend="auto", precision="auto", segment_ids=None):
    """Delta rule: S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T, o_t = (scale q_t)^T S_t.

    Arguments, returns and errors as `gated_delta_rule` without g.
    """
    return gated_delta_rule(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, chunk_size=chunk_size,
                            backend=backend, precision=precision, segment_ids=segment_ids)
