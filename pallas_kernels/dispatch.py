"""The one dispatch every linear-family op shares: its backend name resolved to the token scan
(reference), the chunked form or a kernel library (pallas_kernels/libraries), the chunk fitted
to short sequences, the precision resolved for the matmuls.

Shapes: q [B, T, H, K] (T sets the chunk; q's dtype the precision's "auto").
"""

from __future__ import annotations

import operator
from collections.abc import Callable

from pallas_kernels.backends import resolve_backend
from pallas_kernels.chunking import fitted_chunk_size
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.libraries import LINEAR_LIBRARIES, run_linear_library
from pallas_kernels.libraries.linear_call import make_call
from pallas_kernels.precision import resolve_precision


def run_linear_op(op: str, reference: Callable, chunked: Callable, *args, backend: str,
                  precision: str, chunk_size, **kwargs):
    """reference(*args, **kwargs) or chunked(*args, chunk_size=, state_impl=, precision=,
    **kwargs), as `backend` resolves for `op` (args[0] is q).

    Raises:
        ValueError: an unknown backend or precision, or chunk_size < 1.
    """
    shards = sequence_shards()
    if shards is not None:
        # Time sharded over the mesh's sequence axis: each shard runs its slice from the state
        # the earlier shards hand it (context_parallel/linear.py).
        from pallas_kernels.context_parallel.linear import sharded_linear_op

        def run(*a, **kw):
            return run_linear_op(op, reference, chunked, *a, backend=backend,
                                 precision=precision, chunk_size=chunk_size, **kw)
        return sharded_linear_op(op, run, args, kwargs, shards)
    impl = resolve_backend(op, backend)
    if impl in LINEAR_LIBRARIES:
        # Library ops take (q, k, v, g, beta) (delta rules) or (q, k, v, g) (GLA).
        q, k, v, g, beta = (*args, None)[:5]
        call = make_call(op, q, k, v, g, beta, precision=resolve_precision(precision, q.dtype,
                                                                           impl), **kwargs)
        return run_linear_library(impl, backend, call, lambda name: run_linear_op(
            op, reference, chunked, *args, backend=name, precision=precision,
            chunk_size=chunk_size, **kwargs))
    if impl == "reference":
        return reference(*args, **kwargs)
    try:
        chunk = operator.index(chunk_size)
    except TypeError:
        chunk = 0
    if isinstance(chunk_size, bool) or chunk < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int; got {chunk_size!r}")
    q = args[0]
    # Shorter than one chunk: a shorter chunk, not padding (chunking.fitted_chunk_size).
    return chunked(*args, chunk_size=fitted_chunk_size(q.shape[1], chunk),
                   state_impl=impl, precision=resolve_precision(precision, q.dtype, impl),
                   **kwargs)
