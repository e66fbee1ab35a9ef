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
turns it into one matmul but needs exp(-G_j), which overflows once the gates sum below ~-88
inside a chunk (e.g. gk = -5 over 18 steps). We instead follow the paper's secondary-level
chunking (Sec. 4, hardware-efficient GLA): the chunk is cut into sub-chunks of c tokens;
  * a query sub-chunk a and an earlier key sub-chunk b < a go through matmuls, with the decay
    split at sub-chunk boundaries (R_b = G at the last step of sub-chunk b, R_{-1} = 0):
    exp(G_i - G_j) = exp(G_i - R_{a-1}) * exp(R_{a-1} - R_b) * exp(R_b - G_j).
    Each exponent is <= 0 because G is non-increasing and j <= end of b <= end of a-1 < i;
    the middle [S, S, K] factor is masked to a > b *before* the exp, so no positive exponent
    is ever formed;
  * diagonal blocks (a == b) form the pairwise exp(G_i - G_j) [c, c, K] directly, masked to
    i >= j before the exp.
simple_gla's decay is a scalar per step, so its [C, C] decay matrix exp(G_i - G_j) is formed
directly (masked before the exp) and needs no sub-chunks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.arguments import default_scale
from pallas_kernels.chunking import from_chunks, to_chunks
from pallas_kernels.precision import matmul, operand_dtype
from pallas_kernels.segments import ChunkMasks, zero_padding
from pallas_kernels.state_passing import chunk_outputs

# Sub-chunk size c for gla's diagonal blocks. The pairwise-decay tensor costs T * c * K exps
# (the bulk of the forward time on CPU), the bridge between sub-chunks (C / c)^2 * K per chunk;
# c = 8 balances the two at C = 64 (the fastest of c = 2, 4, 8, 16 timed on CPU).
SUB_CHUNK = 8


def _exp_masked(x, mask):
    """exp(x) where mask, 0 elsewhere; masked before the exp so positive x is never formed.

    exp(-inf) = 0 and its derivative exp(-inf) = 0, so masked entries give exact zeros in the
    forward and backward passes (no inf * 0).
    """
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


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
    q4, k4, g4 = (x.reshape(b, h, n, s, sub, dk) for x in (qs, ks, g_cum))
    v4 = vs.reshape(b, h, n, s, sub, vs.shape[-1])

    # Diagonal sub-blocks: pairwise decay, causal inside the sub-chunk.
    causal = np.tril(np.ones((sub, sub), bool))[:, :, None]               # [c(i), c(j), 1]
    diff = g4[..., :, None, :] - g4[..., None, :, :]                        # [..., S, c, c, K]
    a_diag = matmul("bhnsijk,bhnsjk->bhnsij", q4[..., :, None, :] * _exp_masked(diff, causal),
                    k4, dtype)
    if count is not None:
        c4 = count.reshape(b, 1, n, s, sub)
        a_diag = jnp.where(c4[..., :, None] == c4[..., None, :], a_diag, 0.0)

    # Off-diagonal sub-blocks (query sub-chunk a > key sub-chunk b): three factors, each <= 1.
    ref = g4[..., -1, :]                                                   # R_b [..., S, K]
    prev = jnp.concatenate([jnp.zeros_like(ref[..., :1, :]), ref[..., :-1, :]], axis=-2)
    q_ref = q4 * jnp.exp(g4 - prev[..., None, :])                          # exp(G_i - R_{a-1})
    k_ref = k4 * jnp.exp(ref[..., None, :] - g4)                           # exp(R_b - G_j)
    later = (np.arange(s)[:, None] > np.arange(s)[None, :])[:, :, None]   # a > b
    bridge = _exp_masked(prev[..., :, None, :] - ref[..., None, :, :], later)  # [..., a, b, K]
    # einsum letters: x = query sub-chunk a, y = key sub-chunk b (z is the batch axis).
    a_off = matmul("zhnxyik,zhnyjk->zhnxyij", q_ref[..., :, None, :, :] * bridge[..., None, :],
                   k_ref, dtype)
    if count is not None:
        same = c4[:, :, :, :, None, :, None] == c4[:, :, :, None, :, None, :]  # [.., a, b, i, j]
        a_off = jnp.where(same, a_off, 0.0)

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

    sub = SUB_CHUNK if chunk_size % SUB_CHUNK == 0 else chunk_size
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
    decay = _exp_masked(g_cum[..., :, None] - g_cum[..., None, :], causal)  # [B, H, N, C, C]
    scores = matmul("bhnik,bhnjk->bhnij", qc, kc, mat) * decay
    # o = q_i exp(G_i) S_n + scores v, both inside the sweep.
    low = lambda a: a.astype(mat)
    o, s_final = chunk_outputs(low(q_state), low(scores), None, low(vc), low(k_state),
                               chunk_decay, s0, backend=state_impl)
    return _finish(o, s_final, t, q.dtype, output_final_state)
