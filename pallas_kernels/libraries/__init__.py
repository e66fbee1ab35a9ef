"""The field's kernel libraries behind our op signatures and conventions, imported lazily.

    deltanet_tpu.py   deltanet-tpu 0.3 (Pallas TPU): chunk_gdn, chunk_delta_rule, chunk_gla.
    jla.py            jax-linear-attention 0.1 (Pallas Mosaic GPU, Hopper): gated_deltanet,
                      deltanet, gla, simple_gla.
    tokamax_kda.py    tokamax's Kimi Delta Attention (Mosaic TPU; its XLA form elsewhere).
    attention.py      attention through cuDNN (jax.nn.dot_product_attention) and tokamax.
    linear_call.py    what the linear adapters share: one call record, packed documents in our
                      convention, head dims padded to the widths a kernel is built for.

Each adapter has `unsupported_reason(...)`: None, or why the library cannot take this call on
the target platform (a head dim, a dtype, sinks, packed documents). `run_linear_library` and
the attention op consult it first: a backend named outright refuses the call with that reason,
"auto" falls back to the AUTO table's fallback (pallas_kernels/backends.py).
"""

from __future__ import annotations

from pallas_kernels.backends import auto_fallback
from pallas_kernels.libraries.linear_call import LinearCall

LINEAR_LIBRARIES = ("deltanet_tpu", "jla", "tokamax")


def _adapter(backend: str):
    if backend == "deltanet_tpu":
        from pallas_kernels.libraries import deltanet_tpu as adapter
    elif backend == "tokamax":
        from pallas_kernels.libraries import tokamax_kda as adapter
    else:
        from pallas_kernels.libraries import jla as adapter
    return adapter


def run_linear_library(impl: str, requested: str, call: LinearCall, fallback):
    """`call` through library `impl` ("deltanet_tpu" / "jla" / "tokamax"), or, when the library
    does not take it and "auto" chose it (`requested`), through fallback(backend_name).

    Raises:
        ValueError: the library does not take the call and it was named outright.
    """
    reason = _adapter(impl).unsupported_reason(call)
    if reason is None:
        return _adapter(impl).run(call)
    if requested != impl:        # "auto" picked it: the table's fallback runs instead
        return fallback(auto_fallback(call.op, impl))
    raise ValueError(f"{call.op}: backend {impl!r} {reason}")
