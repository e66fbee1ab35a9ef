"""deltanet-tpu 0.3 (Pallas TPU kernels, forward and backward) as the "deltanet_tpu" backend of
gated_delta_rule (chunk_gdn), delta_rule (chunk_delta_rule), kda (chunk_kda), gla and
simple_gla (chunk_gla with a per-channel or per-head log decay).

Shapes: B batch, T time, H heads, K key dim, V value dim (ours [B, T, H, *], as the library's).

What the adapter adds (linear_call.py): our packed-document convention, K and V up to 128
zero-padded to the library's only width (its kernels are built for K = V = 128), the scale as
a Python float. Its conventions already match ours: g is a log decay (<= 0; it clamps positive
values, which ours never are), beta is the activated write strength, states are float32
[B, H, K, V], the initial state feeds the first document of a row. precision "highest" is its
"fp32", "bf16" its "bf16" (bf16 matmul operands, float32 accumulation and state).

Off a TPU the library runs its kernels in the Pallas interpreter (it decides from
jax.default_backend()); pallas_kernels/backends.py lets that happen only inside
interpret_kernels() (the CPU tests), and lowering_for("tpu") makes it build the TPU kernels.
"""

from __future__ import annotations

import jax

from pallas_kernels.libraries.linear_call import (
    LinearCall,
    finish,
    library_segments,
    pad_head_dims,
)

WIDTH = 128          # the K and V the kernels are built for (chunk_gdn2 refuses others)
CHUNK = 128          # the only chunk length the kernels take


def unsupported_reason(call: LinearCall) -> str | None:
    """Why deltanet-tpu cannot take `call` (None if it can)."""
    if call.key_dim > WIDTH or call.value_dim > WIDTH:
        return (f"takes K, V <= {WIDTH} (its kernels are built for {WIDTH}; narrower heads are "
                f"zero-padded); got K={call.key_dim}, V={call.value_dim}: use 'xla' or 'pallas'")
    if isinstance(call.scale, jax.core.Tracer):
        return "needs scale as a Python number (the kernels bake it in); got a traced value"
    return None


def run(call: LinearCall):
    """(o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None)."""
    import deltanet_tpu

    padded, runs = library_segments(pad_head_dims(call, WIDTH, WIDTH))
    common = dict(segment_ids=runs, initial_state=padded.initial_state,
                  output_final_state=call.output_final_state, chunk_size=CHUNK,
                  precision="bf16" if call.precision == "bf16" else "fp32",
                  scale=float(call.scale))
    q, k, v = padded.q, padded.k, padded.v
    if call.op == "gated_delta_rule":
        out = deltanet_tpu.chunk_gdn(q, k, v, padded.g, padded.beta, **common)
    elif call.op == "delta_rule":
        out = deltanet_tpu.chunk_delta_rule(q, k, v, padded.beta, **common)
    elif call.op == "kda":
        out = deltanet_tpu.chunk_kda(q, k, v, padded.g, padded.beta, **common)
    else:                                        # gla ([B, T, H, K] gate) / simple_gla ([B, T, H])
        out = deltanet_tpu.chunk_gla(q, k, v, padded.g, **common)
    o, final = out if call.output_final_state else (out, None)
    return finish(call, o, final)
