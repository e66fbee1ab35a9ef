"""Titans neural long-term memory (Behrouz, Zhong & Mirrokni 2025, arXiv:2501.00663): one public
op with selectable backends, plus the read and the single-token step the layers use.

Shape legend: B batch, T time, H heads, K key dim, V value dim, E hidden width, L memory depth.

Backends: "reference" (token-by-token lax.scan of the chunked rule, reference.py), "xla"
(chunkwise-parallel form, xla.py); "auto" from pallas_kernels/backends.py (no kernel yet).
See reference.py for the rule, the MLP memory and the read rule (token t reads M_t).
"""

from __future__ import annotations

import jax

from pallas_kernels.backends import resolve_backend
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.context_parallel.ulysses import heads_divide, sharded_by_heads
from pallas_kernels.segments import check_segment_ids, zero_padding
from pallas_kernels.titans.reference import (
    TitansState,
    initial_state,
    memory_read,
    titans_memory_packed_reference,
    titans_memory_reference,
    titans_step,
)
from pallas_kernels.titans.xla import titans_memory_packed_xla, titans_memory_xla

__all__ = ["TitansState", "initial_state", "memory_read", "titans_memory",
           "titans_memory_packed_reference", "titans_memory_packed_xla",
           "titans_memory_reference", "titans_memory_xla", "titans_step"]

_OP = "titans_memory"


def _as_weights(tree) -> tuple | None:
    if tree is None:
        return None
    if hasattr(tree, "shape"):            # a bare array: a matrix memory (L = 1)
        return (tree,)
    return tuple(tree)


def _check(q, k, v, theta, eta, alpha, memory0, momentum0, chunk_start0, chunk_offset,
           chunk_size) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"{_OP}: q and k must both be [B, T, H, K]; got {q.shape}, {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{_OP}: v must be [B, T, H, V] matching q; got {v.shape}")
    for name, g in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if g.shape != q.shape[:3]:
            raise ValueError(f"{_OP}: {name} must be [B, T, H] = {q.shape[:3]}; got {g.shape}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be a positive int; got {chunk_size!r}")
    if isinstance(chunk_offset, int) and not 0 <= chunk_offset < chunk_size:
        raise ValueError(f"{_OP}: chunk_offset must be in [0, chunk_size={chunk_size}); "
                         f"got {chunk_offset}")
    if not memory0:
        raise ValueError(f"{_OP}: memory0 must hold at least one weight matrix (L >= 1)")
    b, _, h, dk = q.shape
    width = dk
    for i, w in enumerate(memory0):
        if w.ndim != 4 or w.shape[:3] != (b, h, width):
            raise ValueError(f"{_OP}: memory0[{i}] must be [B, H, in, out] = [{b}, {h}, {width}, "
                             f"*] (layer inputs chain K -> ... -> V); got {w.shape}")
        width = w.shape[-1]
    if width != v.shape[-1]:
        raise ValueError(f"{_OP}: the memory's last layer outputs {width} features but v has "
                         f"V = {v.shape[-1]}")
    shapes = [w.shape for w in memory0]
    for name, tree in (("momentum0", momentum0), ("chunk_start0", chunk_start0)):
        if tree is not None and [w.shape for w in tree] != shapes:
            raise ValueError(f"{_OP}: {name} must match memory0's shapes {shapes}; "
                             f"got {[w.shape for w in tree]}")


def titans_memory(q, k, v, theta, eta, alpha, *, memory0, momentum0=None, chunk_start0=None,
                  chunk_offset=0, chunk_size=16, output_final_state=False, grad_clip=None,
                  backend="auto", segment_ids=None, chunk_capacity=None):
    """Titans memory over a sequence: per token, a gradient step with momentum and forgetting
    on ||M(k_t) - v_t||^2 (gradient at the chunk-start weights), then y_t = M_t(q_t).

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t);  M_t = (1 - alpha_t) M_{t-1} + S_t,
    t' the start of t's chunk of `chunk_size` tokens (chunks counted from chunk_offset tokens
    before this call's first token). Computed in float32 whatever the input dtype.

    Args:
        q: [B, T, H, K] queries (L2-normalised by the layer; not assumed here).
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        theta: [B, T, H] inner learning rates (>= 0).
        eta: [B, T, H] momentum decays in [0, 1].
        alpha: [B, T, H] forgetting gates in [0, 1].
        memory0: the memory weights before the first token: a tuple of L arrays
            [B, H, in_l, out_l] chaining K -> E -> ... -> V (a bare [B, H, K, V] array means
            L = 1). M(x) = W_L(silu(... silu(x W_1))).
        momentum0: the momentum before the first token, same structure (zeros if None).
        chunk_start0: the weights at the start of the current chunk, same structure; used only
            when chunk_offset > 0 (None: memory0).
        chunk_offset: how many tokens of the current chunk came before this call: a Python int
            in [0, chunk_size) or a traced int32 scalar (decode caches).
        chunk_size: b, tokens per chunk (the rule depends on it; b = 1 is fully sequential).
        output_final_state: whether to return the final TitansState.
        grad_clip: cap on each token's gradient norm (over all layers; reference.py), or None.
        backend: "auto", "reference" or "xla" (pallas_kernels/backends.py).
        segment_ids: optional [B, T] int ids of packed documents (0 = padding, documents from
            1): every document starts from the state (memory0, momentum0, chunk_start0,
            chunk_offset) -- chunk_offset a Python int here -- and counts its chunks from
            there, as it would alone; padding outputs 0. Not with output_final_state (a
            packed row is the cache-free training call; TitansState's chunk offset is one for
            the whole batch).
        chunk_capacity: with segment_ids and the xla backend, the chunks per row of the
            document-by-document layout (xla.titans_memory_packed_xla; None: twice the row's
            chunks). Rows that need more take the exact token-by-token form.

    Returns:
        (o [B, T, H, V] in q's dtype, TitansState(memory, momentum, chunk_start, offset) after
        the last token, float32 weights, or None when output_final_state is False).

    Raises:
        ValueError: unknown backend, inconsistent shapes, bad chunk_size or chunk_offset.
    """
    impl = resolve_backend(_OP, backend)
    memory0, momentum0, chunk_start0 = (_as_weights(x) for x in (memory0, momentum0,
                                                                  chunk_start0))
    _check(q, k, v, theta, eta, alpha, memory0, momentum0, chunk_start0, chunk_offset,
           chunk_size)
    if grad_clip is not None and not grad_clip > 0:
        raise ValueError(f"{_OP}: grad_clip must be > 0 or None; got {grad_clip}")
    if isinstance(chunk_offset, jax.Array) and chunk_offset.ndim != 0:
        raise ValueError(f"{_OP}: chunk_offset must be a scalar; got shape {chunk_offset.shape}")
    shards = sequence_shards()
    if (shards is not None and not output_final_state and isinstance(chunk_offset, int)
            and heads_divide(shards, q.shape[2])):
        # Time sharded over the mesh's sequence axis: the memory update is not affine in the
        # state, so the shards trade the time split for a head split (context_parallel/
        # ulysses.py) and run whole rows of their heads from their heads' initial state.
        def whole_rows(q, k, v, theta, eta, alpha, states, segment_ids):
            memory, momentum, chunk_start = states
            return titans_memory(q, k, v, theta, eta, alpha, memory0=memory,
                                 momentum0=momentum, chunk_start0=chunk_start,
                                 chunk_offset=chunk_offset, chunk_size=chunk_size,
                                 grad_clip=grad_clip, backend=backend,
                                 segment_ids=segment_ids, chunk_capacity=chunk_capacity)[0]

        return sharded_by_heads(whole_rows, (q, k, v, theta, eta, alpha),
                                (memory0, momentum0, chunk_start0), segment_ids, shards), None
    if shards is not None and shards.layout == "zigzag" and not output_final_state:
        # What remains is XLA's partitioner, which would read the reordered row as the row.
        # (A call with a final state is a cache's: the persistent tokens, not the sharded row.)
        raise ValueError(f"{_OP}: under the zigzag sequence layout the memory runs by a head "
                         f"split, which needs mesh.sequence = {shards.n} to divide its "
                         f"{q.shape[2]} heads; use such a head count, or "
                         "mesh.sequence_layout=contiguous")
    if segment_ids is not None:
        check_segment_ids(_OP, segment_ids, q)
        if output_final_state:
            raise ValueError(f"{_OP}: segment_ids (packed documents) go without "
                             "output_final_state: the chunk offset is one for the whole batch")
        if not isinstance(chunk_offset, int):
            raise ValueError(f"{_OP}: with segment_ids, chunk_offset (where every document "
                             f"starts in its chunk) must be a Python int; got {chunk_offset!r}")
        # Padding may hold anything (NaN): zeroed before it meets an unselected branch, whose
        # gradient would be 0 * NaN.
        q, k, v, theta, eta, alpha = zero_padding(segment_ids, q, k, v, theta, eta, alpha)
        kw = dict(memory0=memory0, momentum0=momentum0, chunk_start0=chunk_start0,
                  chunk_offset=chunk_offset, segment_ids=segment_ids, chunk_size=chunk_size,
                  grad_clip=grad_clip)
        if impl == "reference":
            return titans_memory_packed_reference(q, k, v, theta, eta, alpha, **kw), None
        n = -(-q.shape[1] // chunk_size)
        capacity = 2 * n if chunk_capacity is None else int(chunk_capacity)
        return titans_memory_packed_xla(q, k, v, theta, eta, alpha, chunk_capacity=capacity,
                                        **kw), None
    fn = titans_memory_reference if impl == "reference" else titans_memory_xla
    return fn(q, k, v, theta, eta, alpha, memory0=memory0, momentum0=momentum0,
              chunk_start0=chunk_start0, chunk_offset=chunk_offset, chunk_size=chunk_size,
              output_final_state=output_final_state, grad_clip=grad_clip)
