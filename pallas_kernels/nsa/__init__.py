"""Native Sparse Attention (NSA): compressed, selected and sliding-window branches behind one
op with selectable backends.

Shape legend: B batch, Tq queries, Tk keys, H key/value heads, HQ query heads (a multiple of
H: GQA groups of G = HQ / H share one block selection), K key dim, V value dim, C compressed
tokens.

Yuan et al. 2025 (arXiv:2502.11089, eq. 5): o_t = sum over c in {cmp, slc, win} of
g^c_t Attn(q_t, K^c_t, V^c_t). The compressed tokens and the block choice are selection.py's,
shared by every backend (the same blocks everywhere, ties included); the backends differ in
how they attend:
  * "reference": reference.py, masked dense attention (the definition; O(Tq Tk) memory).
  * "xla": xla.py, gathers of each query's n blocks and window, query chunk by query chunk.
  * "pallas" ("pallas_gpu" / "pallas_tpu"): selected.py, the selected branch in a Pallas
    kernel (triton.py for the GPU, mosaic.py for the TPU) and the window branch in the
    platform's attention kernel (flash / splash); compressed branch and selection as "xla".
    Cache calls (q_start given: a decode step or a chunk of prefill) and queries at given
    key indices (q_index: a sequence shard's) take the "xla" form: the kernels assume
    queries = keys.
  * "auto": per platform from pallas_kernels/backends.py's AUTO table.
Arguments follow flash-linear-attention's parallel_nsa (q, k, v, g_cmp, g_slc, g_swa,
block_size, block_counts, window_size, scale), with the paper's compression (blocks of l keys
every d, passed in as k_cmp / v_cmp by the layer's learned MLP, mean pooling when omitted)
and packed documents as segment ids.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.backends import kernel_interpret, resolve_backend
from pallas_kernels.nsa.reference import nsa_reference
from pallas_kernels.nsa.selection import (
    Geometry,
    compression_slots,
    geometry_errors,
    n_slots,
    select_blocks,
    slot_windows,
)
from pallas_kernels.nsa.xla import nsa_xla
from pallas_kernels.segments import check_segment_ids, zero_padding

__all__ = ["Geometry", "compression_slots", "n_slots", "nsa", "nsa_reference", "nsa_xla",
           "select_blocks", "slot_windows"]


def _check(q, k, v, gates, k_cmp, v_cmp, segment_ids, q_start, q_index, geometry):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError("nsa: q, k, v must be [B, Tq, HQ, K] / [B, Tk, H, K] / [B, Tk, H, V]; "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    b, tq, hq, kd = q.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != kd:
        raise ValueError(f"nsa: k {k.shape} and v {v.shape} must be [B, Tk, H, K|V] with q's "
                         f"B and K ({q.shape})")
    h = k.shape[2]
    if hq % h:
        raise ValueError(f"nsa: query heads HQ={hq} must be a multiple of key/value heads H={h}")
    for name, g in zip(("g_cmp", "g_slc", "g_swa"), gates):
        if g.shape != (b, tq, hq):
            raise ValueError(f"nsa: {name} must be [B, Tq, HQ] = {(b, tq, hq)}; got {g.shape}")
    errs = geometry_errors("nsa", geometry)
    if errs:
        raise ValueError(errs[0])
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("nsa: pass both k_cmp and v_cmp (the layer's compressed tokens) or "
                         "neither (mean pooling)")
    c = n_slots(k.shape[1], geometry)
    if k_cmp is not None and (k_cmp.shape != (b, c, h, kd)
                              or v_cmp.shape != (b, c, h, v.shape[3])):
        raise ValueError(f"nsa: k_cmp / v_cmp must be [B, C, H, K|V] with C = (Tk - l) // d + 1 "
                         f"= {c} (compression_slots' layout); got {k_cmp.shape}, {v_cmp.shape}")
    if q_start is not None and q_index is not None:
        raise ValueError("nsa: pass q_start (queries q_start .. q_start + Tq - 1) or q_index "
                         "(each query's key index), not both")
    if q_index is not None and q_index.shape != (b, tq):
        raise ValueError(f"nsa: q_index must be [B, Tq] = {(b, tq)}; got {q_index.shape}")
    if q_start is None and q_index is None and tq != k.shape[1]:
        raise ValueError(f"nsa: {tq} queries over {k.shape[1]} keys need q_start (the key "
                         "index of the first query) or q_index")
    if segment_ids is not None:
        check_segment_ids("nsa", segment_ids, k)
        if q_start is not None:
            raise ValueError("nsa: segment_ids are for cache-free calls (queries = keys); got "
                             "q_start too")


def nsa(q, k, v, g_cmp, g_slc, g_swa, *, k_cmp=None, v_cmp=None, cmp_block: int = 32,
        cmp_stride: int = 16, block_size: int = 64, block_count: int = 16, window: int = 512,
        scale: float | None = None, segment_ids=None, q_start=None, q_index=None,
        backend: str = "auto",
        query_chunk: int = 128, return_block_indices: bool = False):
    """Native Sparse Attention.

    Args:
        q: [B, Tq, HQ, K] queries (rotated, when the layer uses RoPE).
        k, v: [B, Tk, H, K] / [B, Tk, H, V] keys and values.
        g_cmp, g_slc, g_swa: [B, Tq, HQ] branch gates (the layer's sigmoids).
        k_cmp, v_cmp: [B, C, H, K|V] compressed tokens laid out as compression_slots says
            (C = (Tk - cmp_block) // cmp_stride + 1); None: each is the mean of its keys.
        cmp_block, cmp_stride: l and d of the compression (l a multiple of d).
        block_size, block_count: l' and n of the selection (l' a multiple of d; n >= 3: the
            first and the two local blocks are always read).
        window: w, keys t - w + 1 .. t in the window branch.
        scale: score scale, default K ** -0.5.
        segment_ids: optional [B, Tk] packed-document ids (0 = padding; queries = keys): no
            branch crosses a document start; compressed tokens and blocks count from each
            document's first token; padding is inert (outputs and gradients zero there).
        q_start: the key index of the first query (a cache: queries q_start .. q_start + Tq - 1
            over the cache's keys, later keys unseen); None: queries are the keys.
        q_index: instead of q_start, each query's key index [B, Tq] int (any order; a sequence
            shard's queries, pallas_kernels/context_parallel): with segment_ids, a query's
            document is its key's.
        backend: "auto", "xla", "pallas", "pallas_gpu", "pallas_tpu" or "reference" (module
            docstring).
        query_chunk: queries per step of the "xla" form (its memory is one chunk's gathers).
        return_block_indices: also return the selection.

    Returns:
        o [B, Tq, HQ, V] in q's dtype; with return_block_indices also the document-relative
        selected blocks [B, Tq, H, block_count] int32 (-1: unused).

    Raises:
        ValueError: inconsistent shapes, bad block settings, unknown backend.
    """
    geometry = Geometry(cmp_block, cmp_stride, block_size, block_count, window)
    gates = (g_cmp, g_slc, g_swa)
    _check(q, k, v, gates, k_cmp, v_cmp, segment_ids, q_start, q_index, geometry)
    impl = resolve_backend("nsa", backend)
    b, tq, _, kd = q.shape
    tk = k.shape[1]
    scale = kd ** -0.5 if scale is None else scale
    seg_q = None
    if segment_ids is not None:
        k, v = zero_padding(segment_ids, k, v)
        seg_q = segment_ids.astype(jnp.int32)
        if q_index is not None:
            seg_q = jnp.take_along_axis(seg_q, q_index, axis=1)
        (q,) = zero_padding(seg_q, q)
    slots = compression_slots(segment_ids, b, tk, geometry)
    if k_cmp is None:
        k_cmp = jnp.mean(slot_windows(k.astype(jnp.float32), slots.end, cmp_block), axis=2)
        v_cmp = jnp.mean(slot_windows(v.astype(jnp.float32), slots.end, cmp_block), axis=2)
        k_cmp, v_cmp = k_cmp.astype(k.dtype), v_cmp.astype(v.dtype)
    if q_index is not None:
        t = q_index.astype(jnp.int32)
    else:
        start = 0 if q_start is None else q_start
        t = jnp.broadcast_to(start + jnp.arange(tq, dtype=jnp.int32), (b, tq))
    gate = jnp.stack(gates, axis=-1)
    kwargs = dict(t=t, seg_q=seg_q, slots=slots, geometry=geometry, scale=scale)
    if impl == "reference":
        o, blocks = nsa_reference(q, k, v, k_cmp, v_cmp, gate, **kwargs)
    elif impl.startswith("pallas") and q_start is None and q_index is None:
        from pallas_kernels.nsa.selected import nsa_pallas
        o, blocks = nsa_pallas(q, k, v, k_cmp, v_cmp, gate, query_chunk=query_chunk,
                               segment_ids=segment_ids, driver=impl.removeprefix("pallas_"),
                               interpret=kernel_interpret(impl), **kwargs)
    else:
        o, blocks = nsa_xla(q, k, v, k_cmp, v_cmp, gate, query_chunk=query_chunk, **kwargs)
    if segment_ids is not None:
        o = jnp.where((seg_q != 0)[..., None, None], o, 0.0)
    o = o.astype(q.dtype)
    if blocks.shape[-1] < block_count:      # fewer blocks in the row than n: unused places
        blocks = jnp.pad(blocks, [(0, 0)] * 3 + [(0, block_count - blocks.shape[-1])],
                         constant_values=-1)
    return (o, blocks) if return_block_indices else o

