"""Gated linear attention in chunkwise-parallel form, in jax.numpy (matmuls inside chunks).

Shapes: B batch, T time, H heads, K key dim, V value dim, N chunks, C chunk size,
S sub-chunks per chunk, c sub-chunk size (C = S * c).
q, k, gk [B, T, H, K]; g [B, T, H]; v [B, T, H, V]; state [B, H, K, V].

Chunkwise GLA (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
Training", Sec. 4, the chunkwise parallel form). Within a chunk let G_i = sum_{j<=i} gk_j (the
inclusive cumulative log decay from the chunk start, G_i <= 0 and non-increasing in i), and
S_n the state entering the chunk:

    o_i     = (scale q_i * exp(G_i))^T S_n                                     (inter-chunk)
            + sum_{j<=i} (scale q_i * k_j * exp(G_i - G_j))^T 1 v_j             (intra-chunk)
    S_{n+1} = diag(exp(G_C)) S_n + sum_j (k_j * exp(G_C - G_j)) v_j^T

Every exponent above is <= 0, so nothing overflows however negative the gates are; terms that
underflow to 0 are below float32's range in the exact result too.

Numerics of the intra-chunk term: the paper's factorization (q_i exp(G_i)) (k_j exp(-G_j))^T
overflows for strong gates; the scores are formed by sub-chunks instead
(pallas_kernels/channel_decay.py, the paper's secondary-level chunking), every exponent <= 0.
simple_gla's decay is a scalar per step, so its [C, C] decay matrix exp(G_i - G_j) is formed
directly (masked before the exp) and needs no sub-chunks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.arguments import default_scale
from pallas_kernels.channel_decay import decayed_score_blocks, exp_masked, sub_chunk_size
from pallas_kernels.chunking import from_chunks, to_chunks
from pallas_kernels.precision import matmul, operand_dtype
from pallas_kernels.segments import ChunkMasks, zero_padding
from pallas_kernels.state_passing import chunk_outputs


def _gla_intra(qs, ks, vs, g_cum, sub, count=None, dtype=jnp.float32):
    """Intra-chunk output sum_{j<=i} (sum_d q_id k_jd exp(G_id - G_jd)) v_j.

    Args:
        qs: [B, H, N, C, K] scaled queries.
        ks: [B, H, N, C, K] keys.
        vs: [B, H, N, C, V] values.
        g_cum: [B, H, N, C, K] inclusive cumulative log decays within each chunk.
        sub: sub-chunk size c (divides C).
        count: optional [B, 1, N, C] in-chunk document-start counts (segments.ChunkMasks.count):
            pairs in different documents are dropped.
        dtype: matmul operand dtype (precision.operand_dtype); the decay factors are formed
            in float32 and enter the score matmuls multiplied into the queries.

    Returns:
        [B, H, N, C, V] float32.
    """
    b, h, n, cs, dk = qs.shape
    s = cs // sub
    v4 = vs.reshape(b, h, n, s, sub, vs.shape[-1])
    a_diag, a_off = decayed_score_blocks(qs, ks, g_cum, sub, count, dtype)

    # Scores stay in [a, b, i, j] block layout and multiply v per block, rather than being
    # transposed into a [C, C] matrix: fewer copies.
    o = matmul("zhnxyij,zhnyjv->zhnxiv", a_off, v4, dtype)
    o = o + matmul("zhnxij,zhnxjv->zhnxiv", a_diag, v4, dtype)
    return o.reshape(b, h, n, cs, vs.shape[-1])


def _finish(o, s_final, t, dtype, output_final_state):
    return from_chunks(o, t, dtype), (s_final if output_final_state else None)


def gla_xla(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False,
            chunk_size=64, state_impl="xla", segment_ids=None,
            precision="highest"):
    """Chunkwise GLA with per-key-channel decay; same contract as `gla_reference`.

    Any T works: T is zero-padded to a multiple of chunk_size (k = v = 0 adds nothing, and a
    log-gate of 0 is a decay of 1, so the state passes padded steps unchanged); padded outputs
    are dropped. Sub-chunks are SUB_CHUNK tokens when that divides chunk_size, else one
    sub-chunk spans the whole chunk.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        gk: [B, T, H, K] log-space decays (<= 0).
        scale: query scale; defaults to K ** -0.5.
        initial_state: S [B, H, K, V] or None for zeros.
        output_final_state: also return the float32 state after the last token.
        chunk_size: tokens per chunk (C).
        state_impl: backend of the chunk-to-chunk state sweep (state_passing: "xla",
            "pallas_gpu" or "pallas_tpu"); the intra-chunk terms are XLA either way.
        precision: "highest" or "bf16" matmul operands (pallas_kernels/precision.py).
        segment_ids: optional [B, T] int packed-document ids; masks as segments.ChunkMasks.

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32 or None).
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = default_scale(k, scale)
    s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    masks = None
    if segment_ids is not None:
        q, k, v, gk = zero_padding(segment_ids, q, k, v, gk)
        masks = ChunkMasks(segment_ids, chunk_size)
    # float32 inside: cumulative gates and the state are long sums (see reference.py).
    qc, kc, vc, gc = (to_chunks(x, chunk_size) for x in (q, k, v, gk))    # [B, H, N, C, D]
    qc = qc * scale
    g_cum = jnp.cumsum(gc, axis=3)                                         # G_i, <= 0
    g_last = g_cum[..., -1, :]                                             # G_C [B, H, N, K]

    k_state = kc * jnp.exp(g_last[..., None, :] - g_cum)                   # exponent <= 0
    q_state, chunk_decay = qc * jnp.exp(g_cum), jnp.exp(g_last)
    if masks is not None:
        q_state, k_state = q_state * masks.reads, k_state * masks.writes
        chunk_decay = chunk_decay * masks.keeps
    low = lambda a: a.astype(operand_dtype(precision))
    # The inter-chunk term q_i exp(G_i) S_n inside the sweep; the intra-chunk one below.
    o, s_final = chunk_outputs(low(q_state), None, None, low(vc), low(k_state), chunk_decay, s0,
                               backend=state_impl)

    sub = sub_chunk_size(chunk_size)
    o = o + _gla_intra(qc, kc, vc, g_cum, sub, None if masks is None else masks.count,
                       operand_dtype(precision))
    return _finish(o, s_final, t, q.dtype, output_final_state)


def simple_gla_xla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
                   chunk_size=64, state_impl="xla", segment_ids=None,
            precision="highest"):
    """Chunkwise GLA with one scalar decay per head and step; contract of `simple_gla_reference`.

    Padding as in `gla_xla`.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decays (<= 0).
        scale: query scale; defaults to K ** -0.5.
        initial_state: S [B, H, K, V] or None for zeros.
        output_final_state: also return the float32 state after the last token.
        chunk_size: tokens per chunk (C).
        state_impl: backend of the chunk-to-chunk state sweep (state_passing: "xla",
            "pallas_gpu" or "pallas_tpu"); the intra-chunk terms are XLA either way.
        precision: "highest" or "bf16" matmul operands (pallas_kernels/precision.py).
        segment_ids: optional [B, T] int packed-document ids; masks as segments.ChunkMasks.

    Returns:
        (o [B, T, H, V] in q's dtype, final_state [B, H, K, V] float32 or None).
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = default_scale(k, scale)
    s0 = (jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    masks = None
    if segment_ids is not None:
        q, k, v, g = zero_padding(segment_ids, q, k, v, g)
        masks = ChunkMasks(segment_ids, chunk_size)
    qc, kc, vc = (to_chunks(x, chunk_size) for x in (q, k, v))             # [B, H, N, C, D]
    gc = to_chunks(g, chunk_size)                                          # [B, H, N, C]
    qc = qc * scale
    g_cum = jnp.cumsum(gc, axis=-1)
    g_last = g_cum[..., -1]                                                # [B, H, N]

    k_state = kc * jnp.exp(g_last[..., None] - g_cum)[..., None]
    chunk_decay = jnp.broadcast_to(jnp.exp(g_last)[..., None], (*g_last.shape, dk))
    mat = operand_dtype(precision)
    causal = np.tril(np.ones((chunk_size, chunk_size), bool))
    q_state = qc * jnp.exp(g_cum)[..., None]
    if masks is not None:
        causal = causal & masks.same                                       # [B, 1, N, C, C]
        q_state, k_state = q_state * masks.reads, k_state * masks.writes
        chunk_decay = chunk_decay * masks.keeps
    decay = exp_masked(g_cum[..., :, None] - g_cum[..., None, :], causal)  # [B, H, N, C, C]
    scores = matmul("bhnik,bhnjk->bhnij", qc, kc, mat) * decay
    # o = q_i exp(G_i) S_n + scores v, both inside the sweep.
    low = lambda a: a.astype(mat)
    o, s_final = chunk_outputs(low(q_state), low(scores), None, low(vc), low(k_state),
                               chunk_decay, s0, backend=state_impl)
    return _finish(o, s_final, t, q.dtype, output_final_state)
