"""jax-linear-attention 0.1 (Pallas Mosaic GPU kernels for Hopper, forward and backward) as the
"jla" backend of gated_delta_rule, delta_rule, gla, simple_gla and kda.

Shapes: B batch, T time, H heads, K key dim, V value dim (ours [B, T, H, *], as the library's).

What the adapter adds (linear_call.py): our packed-document convention, K and V zero-padded up
to the widths the kernels are built for (64 or 128), the scale as a Python float, and bf16
operands: the Mosaic GPU kernels take bf16 (or fp16) q, k, v only, so they run the "bf16"
precision (float32 accumulation and state inside); a "highest" (float32) call is refused with
that reason, and "auto" then runs our xla form. Gates are log decays (<= 0) and beta the
activated write strength, as ours; the state is float32 [B, H, K, V].

On a GPU the library's `impl="mosaic_gpu"`, which needs an sm_90 GPU (its own check, whose
reason is passed on). Off a GPU, inside interpret_kernels() (the CPU tests), its
`impl="chunked"`: the library's chunk-parallel JAX form of the same op, the twin its kernels
are tested against; the Mosaic GPU kernels have no CPU interpreter. The adapter, the layout,
the packed documents and the padding are the same on both paths; what CPU does not check is
the kernels themselves, which tests/test_lowering.py lowers for an H100 (its sm_90 check told
so by backends.lowering_for) and benchmarks/device_check.sh runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backends import kernel_interpret
from pallas_kernels.libraries.linear_call import (
    LinearCall,
    finish,
    library_segments,
    pad_head_dims,
)

WIDTHS = (64, 128)             # the head dims the kernels are built for
KIND = {"gated_delta_rule": "gated_deltanet", "delta_rule": "deltanet", "gla": "gla",
        "simple_gla": "simple_gla", "kda": "kda"}


def _width(d: int) -> int | None:
    return next((w for w in WIDTHS if d <= w), None)


def _on_kernels() -> bool:
    """Whether this call runs the Mosaic GPU kernels (not the chunked twin off the GPU)."""
    return not kernel_interpret("jla")


def _kernel_reason(call: LinearCall) -> str | None:
    """The library's own reason for refusing the padded call (its sm_90 check included)."""
    import jla.ops.mosaic_gpu  # noqa: F401  (registers and loads the kernels)
    from jla.ops.mosaic_gpu import scalar_gate

    padded = pad_head_dims(call, _width(call.key_dim), _width(call.value_dim))
    spec = lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, jnp.bfloat16)
    q, k, v = spec(padded.q), spec(padded.k), spec(padded.v)
    options = dict(scale=float(call.scale), initial_state=padded.initial_state,
                   output_final_state=call.output_final_state, segment_ids=call.segment_ids)
    if call.op == "gla":
        from jla.ops.mosaic_gpu import gla, vector_gate_ops

        # The dedicated GLA kernels' checks: the shared ones, then their own CUDA grid limit
        # on T (what jla's gla() itself runs before launching them).
        return (vector_gate_ops.unsupported_reason(q, k, v, padded.g, True, options)
                or gla._grid_reason(q))
    if call.op == "kda":                 # the vector-gate (KDA / GDN-2) kernels' own checks
        from jla.ops.mosaic_gpu import vector_gate_ops

        gates_ok = padded.beta.shape == q.shape[:3]
        return vector_gate_ops.unsupported_reason(q, k, v, padded.g, gates_ok, options)
    gates = tuple(x for x in (padded.g, padded.beta) if x is not None)
    return scalar_gate.unsupported_reason(q, k, v, gates, options, delta=call.op != "simple_gla")


def unsupported_reason(call: LinearCall) -> str | None:
    """Why jax-linear-attention cannot take `call` on this target (None if it can)."""
    if _width(call.key_dim) is None or _width(call.value_dim) is None:
        return (f"takes K, V <= {WIDTHS[-1]} (its kernels are built for {WIDTHS}; narrower "
                f"heads are zero-padded); got K={call.key_dim}, V={call.value_dim}: use 'xla'")
    if isinstance(call.scale, jax.core.Tracer):
        return "needs scale as a Python number; got a traced value"
    if not _on_kernels():
        return None
    if call.precision != "bf16":
        return ("runs bf16 operands only (its Mosaic GPU kernels take bf16 q, k, v): use "
                "precision 'bf16' or 'auto' with bf16 inputs, or backend 'xla' for float32")
    reason = _kernel_reason(call)
    return None if reason is None else f"cannot take this call: {reason}"


def run(call: LinearCall):
    """(o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None)."""
    from jla.ops import linear_attention

    padded, runs = library_segments(
        pad_head_dims(call, _width(call.key_dim), _width(call.value_dim)))
    gates = {"g": padded.g} if call.op in ("gla", "simple_gla") else {"beta": padded.beta}
    if call.op in ("gated_delta_rule", "kda"):
        gates["g"] = padded.g
    q, k, v = padded.q, padded.k, padded.v
    if _on_kernels():
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
        impl, extra = "mosaic_gpu", {}
    else:
        impl = "chunked"
        extra = {"precision": jax.lax.Precision.HIGHEST if call.precision == "highest"
                 else jax.lax.Precision.DEFAULT}
    o, final = linear_attention(KIND[call.op], q, k, v, impl=impl, scale=float(call.scale),
                                initial_state=padded.initial_state,
                                output_final_state=call.output_final_state,
                                segment_ids=runs, **gates, **extra)
    return finish(call, o, final)
