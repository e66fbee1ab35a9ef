"""tokamax 0.0.17's Kimi Delta Attention (`tokamax.ops.kimi_delta_attention`) as the "tokamax"
backend of the kda op: its Pallas Mosaic TPU kernel (forward and custom VJP) on a TPU, its
recurrent XLA form elsewhere.

Shapes: B batch, T time, H heads, K key dim, V value dim; N segments (tokamax's states are
[B, N, H, K, V], one per segment id).

What the adapter adds: the layout (tokamax is heads-first, [H, B, T, *]); our initial / final
state as tokamax's single segment (N = 1). Its conventions match ours otherwise: g is the
log-space decay per key channel (use_gate_in_kernel False), beta the activated write
strength, the scale explicit, float32 states. Its "xla_chunked" form is not used: it needs the
gate activation fused in (raw gate, A_log, dt_bias, a lower bound), and our op takes the
activated log decay.

Packed documents are refused (auto never picks tokamax for kda; a named call says why):
tokamax keeps a state for every segment and needs a static bound on the segments of a row
(max_num_segments), which the documents of a packed row are not; deltanet_tpu and xla take
them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.libraries.linear_call import LinearCall, finish


def unsupported_reason(call: LinearCall) -> str | None:
    """Why tokamax's KDA cannot take `call` (None if it can)."""
    if call.segment_ids is not None:
        return ("does not take packed documents (tokamax keeps a state per segment and needs a "
                "static bound on segments per row); use 'deltanet_tpu' or 'xla'")
    if isinstance(call.scale, jax.core.Tracer):
        return "needs scale as a Python number; got a traced value"
    return None


def run(call: LinearCall):
    """(o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None)."""
    from tokamax import ops

    from pallas_kernels.backends import target_platform

    heads_first = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731   [B, T, H, ...] -> [H, B, T, ...]
    state = None if call.initial_state is None else call.initial_state[:, None]
    o, final = ops.kimi_delta_attention(
        heads_first(call.q), heads_first(call.k), heads_first(call.v), heads_first(call.g),
        heads_first(call.beta), scale=float(call.scale), initial_state=state,
        output_final_state=call.output_final_state,
        implementation="mosaic" if target_platform() == "tpu" else "xla")
    return finish(call, jnp.moveaxis(o, 0, 2), None if final is None else final[:, 0])
