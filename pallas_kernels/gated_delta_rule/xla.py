"""The gated delta rule in chunkwise-parallel form (gated WY / UT representation), jax.numpy.

Shape legend: B batch, T time, H heads, K key dim, V value dim, C chunk size, N = ceil(T / C).
    q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; state S [B, H, K, V]; o [B, T, H, V].

Derivation (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks", arXiv:2412.06464, extending
the UT transform of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length", arXiv:2406.06484). Inside a chunk starting from state S, let
G_t = g_1 + ... + g_t (within-chunk cumulative log-decay, G_t <= 0), gamma_t = exp(G_t), and
D_tj = exp(G_t - G_j) for t >= j (the decay from step j to step t; <= 1). Then

    S_t = gamma_t S + sum_{j<=t} D_tj k_j x_j^T,   x_t = beta_t (v_t - S'_t^T k_t),

where S'_t = exp(g_t) S_{t-1} = gamma_t S + sum_{j<t} D_tj k_j x_j^T is the decayed state step
t reads. Substituting:

    x_t = beta_t v_t - beta_t gamma_t S^T k_t - sum_{j<t} beta_t D_tj (k_t . k_j) x_j

and, with A = tril(diag(beta) (Kc Kc^T * D), -1) (elementwise *):

    (I + A) X = diag(beta) Vc - diag(beta gamma) Kc S
    X = U - W S,   U = T diag(beta) Vc,   W = T diag(beta gamma) Kc,   T = (I + A)^-1
    O = diag(gamma) Q S + tril(Q Kc^T * D) X        (inclusive diagonal, D_tt = 1)
    S_next = gamma_C S + (diag(exp(G_C - G)) Kc)^T X

With g = 0 this is exactly the ungated form in delta_rule/xla.py. The unit lower-triangular
system is solved through a blocked inverse (pallas_kernels.triangular.solve_unit_lower) for both
right-hand sides at once; see that file for why.

Numerics: G_t - G_j is positive for t < j and could be large (strong gates over a long chunk),
so exp of it would overflow to inf, and inf * 0 from a later mask gives NaN (in the values and
in the gradients). The differences are therefore masked to -inf BEFORE the exponential, so only
exponents <= 0 are ever evaluated; every decay factor used lies in [0, 1].

Any T works: inputs are zero-padded to a multiple of C. A padded step has g = 0 (no decay),
beta = 0 and k = 0 (no write, no read), so the state after the last real step is unchanged.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.arguments import initial_state_f32
from pallas_kernels.chunking import from_chunks, to_chunks
from pallas_kernels.precision import matmul, operand_dtype
from pallas_kernels.segments import ChunkMasks, zero_padding
from pallas_kernels.state_passing import chunk_outputs
from pallas_kernels.triangular import solve_unit_lower


def gated_delta_rule_xla(q, k, v, g, beta, *, scale=None, initial_state=None,
                         output_final_state=False, chunk_size=64, state_impl="xla",
                         segment_ids=None, precision="highest"):
    """Chunkwise-parallel gated delta rule (same contract as the reference), float32 inside.

    Everything per chunk (the solve, W, U, the intra-chunk scores) is batched over all chunks;
    only the state sweep S -> S_next is sequential (pallas_kernels/state_passing, with
    x = U - W S the chunk's new values and decay gamma_C).

    Args:
        q: [B, T, H, K] queries.
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decays (<= 0), or None for no decay: the ungated delta rule
            (delta_rule/xla.py), which then skips every decay factor rather than multiplying
            by exp(0) = 1.
        beta: [B, T, H] write strengths.
        scale: query scale; defaults to K ** -0.5.
        initial_state: optional [B, H, K, V] starting state (zeros if None).
        output_final_state: whether to return the final state.
        chunk_size: C, the number of steps handled in parallel per chunk (a Python int).
        state_impl: backend of the state sweep ("xla", "pallas_gpu" or "pallas_tpu").
        precision: "highest" or "bf16" matmul operands (pallas_kernels/precision.py).
        segment_ids: optional [B, T] int packed-document ids (segments.ChunkMasks): pairs across
            a document start are masked out of A and of the scores, and the W / gq / kd rows
            and the chunk decay are masked as ChunkMasks describes.

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32 or None).
    """
    t, dk = q.shape[1], q.shape[-1]
    if segment_ids is not None:
        q, k, v, g, beta = zero_padding(segment_ids, q, k, v, g, beta)
    c = int(chunk_size)
    # Matmul operands per the precision policy (pallas_kernels/precision.py); the solve and
    # every decay factor stay float32 either way.
    mat = operand_dtype(precision)
    _mm = lambda spec, a, b: matmul(spec, a, b, mat)
    scale = dk ** -0.5 if scale is None else scale
    qc, kc, vc = (to_chunks(x, c) for x in (q, k, v))                # [B, H, N, C, K|V]
    qc = qc * scale
    bc = to_chunks(beta, c)[..., None]                               # [B, H, N, C, 1]
    incl = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    masks = None if segment_ids is None else ChunkMasks(segment_ids, c)
    if masks is not None:
        incl, strict = incl & masks.same, strict & masks.same     # [B, 1, N, C, C]
    if g is None:
        a = jnp.where(strict, bc * _mm("...ik,...jk->...ij", kc, kc), 0.0)
        rhs = jnp.concatenate([bc * kc, bc * vc], axis=-1)
        qk = jnp.where(incl, _mm("...ik,...jk->...ij", qc, kc), 0.0)
        gq, kd = qc, kc
        chunk_decay = jnp.ones(kc.shape[:3] + (dk,), jnp.float32)
    else:
        cum = jnp.cumsum(to_chunks(g, c), axis=-1)                   # G: [B, H, N, C]
        gamma = jnp.exp(cum)[..., None]                              # [B, H, N, C, 1], <= 1
        # Mask before exp: only t >= j (exponent <= 0) is exponentiated; see the docstring.
        decay = jnp.exp(jnp.where(incl, cum[..., :, None] - cum[..., None, :], -jnp.inf))
        a = jnp.where(strict, bc * _mm("...ik,...jk->...ij", kc, kc) * decay, 0.0)
        rhs = jnp.concatenate([bc * gamma * kc, bc * vc], axis=-1)
        qk = jnp.where(incl, _mm("...ik,...jk->...ij", qc, kc) * decay, 0.0)
        gq = gamma * qc                                              # diag(gamma) Q
        kd = jnp.exp(cum[..., -1:] - cum)[..., None] * kc            # diag(exp(G_C - G)) Kc
        chunk_decay = jnp.broadcast_to(jnp.exp(cum[..., -1:]), kc.shape[:3] + (dk,))
    if masks is not None:
        # Tokens after a start inside the chunk read no chunk-start state (their W rows, so x
        # = U there, and their gq rows are 0); only the chunk's last document writes the
        # end-of-chunk state, and a chunk that holds a start does not carry the state over.
        rhs = jnp.concatenate([rhs[..., :dk] * masks.reads, rhs[..., dk:]], axis=-1)
        gq, kd = gq * masks.reads, kd * masks.writes
        chunk_decay = chunk_decay * masks.keeps
    wu = solve_unit_lower(a, rhs)
    w, u = wu[..., :dk], wu[..., dk:]
    low = lambda a: a.astype(mat)
    o, s = chunk_outputs(low(gq), low(qk), low(w), low(u), low(kd), chunk_decay,
                         initial_state_f32(initial_state, q, v), backend=state_impl)
    return from_chunks(o, t, q.dtype), (s if output_final_state else None)
