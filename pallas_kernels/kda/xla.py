"""Kimi Delta Attention in chunkwise-parallel form: the gated WY form of
gated_delta_rule/xla.py with the decay per key channel, in jax.numpy.

Shape legend: B batch, T time, H heads, K key dim, V value dim, C chunk size, N = ceil(T / C).
    q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; state S [B, H, K, V].

Derivation (Kimi Linear, arXiv:2510.26692, Sec. 3, the chunkwise form; the scalar case is
gated_delta_rule/xla.py). Inside a chunk starting from state S, let G_t = g_1 + ... + g_t per
channel (G_t [K] <= 0, non-increasing), and for rows x, y the decayed score
<x_t, y_j>_G = sum_d x_td y_jd exp(G_td - G_jd) (j <= t). The state step t reads is
S'_t = diag(exp(G_t)) S + sum_{j<t} diag(exp(G_t - G_j)) k_j x_j^T, so the new values
x_t = beta_t (v_t - S'_t^T k_t) satisfy

    x_t = beta_t v_t - beta_t (exp(G_t) * k_t)^T S - sum_{j<t} beta_t <k_t, k_j>_G x_j

    (I + A) X = diag(beta) Vc - diag(beta) (exp(G) * Kc) S,   A_tj = beta_t <k_t, k_j>_G, j < t
    X = U - W S,   U = T diag(beta) Vc,   W = T diag(beta) (exp(G) * Kc),   T = (I + A)^-1
    O_t = (exp(G_t) * q_t)^T S + sum_{j<=t} <q_t, k_j>_G x_j
    S_next = diag(exp(G_C)) S + sum_j (exp(G_C - G_j) * k_j) x_j^T

(* elementwise per channel). exp(G_t), exp(G_C - G_j) are <= 1. The two decayed score matrices
would factor as (x exp(G)) (y exp(-G))^T, but exp(-G_j) overflows once a channel's gates sum
below ~-88 within a chunk; they are formed by sub-chunks with every exponent <= 0
(pallas_kernels/channel_decay.py), so the intra-chunk decay ratios stay finite for any gates.
The solve, the decays and the state are float32; the sweep is state_passing's, whose
chunk_decay is already per channel.

Any T works: inputs are zero-padded to a multiple of C (g = 0, beta = 0, k = 0: no decay, no
write), so the state after the last real step is unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.arguments import initial_state_f32
from pallas_kernels.channel_decay import decayed_scores, sub_chunk_size
from pallas_kernels.chunking import from_chunks, to_chunks
from pallas_kernels.precision import operand_dtype
from pallas_kernels.segments import ChunkMasks, zero_padding
from pallas_kernels.state_passing import chunk_outputs
from pallas_kernels.triangular import solve_unit_lower


def kda_xla(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
            chunk_size=64, state_impl="xla", segment_ids=None, precision="highest"):
    """Chunkwise-parallel KDA (same contract as `kda_reference`), float32 inside.

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H, K] log-space decays per key channel (<= 0).
        beta: [B, T, H] write strengths.
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        chunk_size: C, the steps handled in parallel per chunk (a Python int).
        state_impl: backend of the state sweep ("xla", "pallas_gpu" or "pallas_tpu").
        segment_ids: optional [B, T] int packed-document ids (segments.ChunkMasks): pairs
            across a document start are dropped from A and the scores; W / gq / kd rows and
            the chunk decay are masked as in gated_delta_rule_xla.
        precision: "highest" or "bf16" matmul operands (pallas_kernels/precision.py).

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    """
    t, dk = q.shape[1], q.shape[-1]
    if segment_ids is not None:
        q, k, v, g, beta = zero_padding(segment_ids, q, k, v, g, beta)
    c = int(chunk_size)
    mat = operand_dtype(precision)
    scale = dk ** -0.5 if scale is None else scale
    qc, kc, vc, gc = (to_chunks(x, c) for x in (q, k, v, g))         # [B, H, N, C, K|V]
    qc = qc * scale
    bc = to_chunks(beta, c)[..., None]                               # [B, H, N, C, 1]
    cum = jnp.cumsum(gc.astype(jnp.float32), axis=-2)                # G [B, H, N, C, K]
    masks = None if segment_ids is None else ChunkMasks(segment_ids, c)
    count = None if masks is None else masks.count
    sub = sub_chunk_size(c)
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    # The decayed scores are zero above the diagonal (and across documents); A drops the
    # diagonal as well.
    a = jnp.where(strict, bc * decayed_scores(kc, kc, cum, sub, count, mat), 0.0)
    qk = decayed_scores(qc, kc, cum, sub, count, mat)
    rhs = jnp.concatenate([bc * jnp.exp(cum) * kc, bc * vc], axis=-1)
    gq = jnp.exp(cum) * qc                                           # exponent <= 0
    kd = jnp.exp(cum[..., -1:, :] - cum) * kc                        # exponent <= 0
    chunk_decay = jnp.exp(cum[..., -1, :])                           # [B, H, N, K]
    if masks is not None:
        # As in gated_delta_rule_xla: rows after a start in the chunk read no chunk-start
        # state, only the chunk's last document writes it, a chunk with a start keeps none.
        rhs = jnp.concatenate([rhs[..., :dk] * masks.reads, rhs[..., dk:]], axis=-1)
        gq, kd = gq * masks.reads, kd * masks.writes
        chunk_decay = chunk_decay * masks.keeps
    wu = solve_unit_lower(a, rhs)
    w, u = wu[..., :dk], wu[..., dk:]
    low = lambda x: x.astype(mat)
    o, s = chunk_outputs(low(gq), low(qk), low(w), low(u), low(kd), chunk_decay,
                         initial_state_f32(initial_state, q, v), backend=state_impl)
    return from_chunks(o, t, q.dtype), (s if output_final_state else None)
