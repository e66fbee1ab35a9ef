"""Scores under a per-key-channel decay, inside a chunk, without overflow: what GLA's and Kimi
Delta Attention's chunked forms share.

Shapes: B batch, H heads, N chunks, C chunk size, S sub-chunks per chunk, c sub-chunk size
(C = S * c), K key dim. xs, ys [B, H, N, C, K]; g_cum [B, H, N, C, K].

The score of query row i and key row j (j <= i) under cumulative log decays G (G_i the
inclusive sum of the per-channel log decays from the chunk start, <= 0, non-increasing in i):

    M_ij = sum_d x_id y_jd exp(G_id - G_jd)

The factorization (x_i exp(G_i)) (y_j exp(-G_j))^T, one matmul, needs exp(-G_j), which
overflows once a channel's gates sum below ~-88 inside a chunk (e.g. -5 per step over 18
steps). GLA's secondary-level chunking (Yang et al. 2024, "Gated Linear Attention Transformers
with Hardware-Efficient Training", Sec. 4) avoids it: the chunk is cut into sub-chunks of c
tokens;
  * a query sub-chunk a and an earlier key sub-chunk b < a go through matmuls, with the decay
    split at sub-chunk boundaries (R_b = G at the last step of sub-chunk b, R_{-1} = 0):
    exp(G_i - G_j) = exp(G_i - R_{a-1}) * exp(R_{a-1} - R_b) * exp(R_b - G_j).
    Each exponent is <= 0 because G is non-increasing and j <= end of b <= end of a-1 < i;
    the middle [S, S, K] factor is masked to a > b *before* the exp, so no positive exponent
    is ever formed;
  * diagonal blocks (a == b) form the pairwise exp(G_i - G_j) [c, c, K] directly, masked to
    i >= j before the exp.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels.precision import matmul

# Sub-chunk size c. The pairwise-decay tensor costs T * c * K exps (the bulk of GLA's forward
# time on CPU), the bridge between sub-chunks (C / c)^2 * K per chunk; c = 8 balances the two
# at C = 64 (the fastest of c = 2, 4, 8, 16 timed on CPU for GLA).
SUB_CHUNK = 8


def exp_masked(x, mask):
    """exp(x) where mask, 0 elsewhere; masked before the exp so positive x is never formed.

    exp(-inf) = 0 and its derivative exp(-inf) = 0, so masked entries give exact zeros in the
    forward and backward passes (no inf * 0).
    """
    return jnp.exp(jnp.where(mask, x, -jnp.inf))


def sub_chunk_size(chunk_size: int) -> int:
    """SUB_CHUNK when it divides the chunk, else one sub-chunk spanning the chunk."""
    return SUB_CHUNK if chunk_size % SUB_CHUNK == 0 else chunk_size


def decayed_score_blocks(xs, ys, g_cum, sub: int, count=None, dtype=jnp.float32):
    """M (module docstring) in sub-chunk blocks: (diagonal [B, H, N, S, c, c] with i >= j,
    off-diagonal [B, H, N, S(a), S(b), c, c], zero unless a > b), float32.

    Args:
        xs, ys: [B, H, N, C, K] (queries and keys, or keys and keys).
        g_cum: [B, H, N, C, K] inclusive cumulative log decays within each chunk.
        sub: sub-chunk size c (divides C).
        count: optional [B, 1, N, C] in-chunk document-start counts (segments.ChunkMasks.count):
            pairs in different documents are zeroed.
        dtype: matmul operand dtype (precision.operand_dtype); the decay factors are formed in
            float32 and enter the matmuls multiplied into xs.
    """
    b, h, n, cs, dk = xs.shape
    s = cs // sub
    x4, y4, g4 = (t.reshape(b, h, n, s, sub, dk) for t in (xs, ys, g_cum))

    causal = np.tril(np.ones((sub, sub), bool))[:, :, None]               # [c(i), c(j), 1]
    diff = g4[..., :, None, :] - g4[..., None, :, :]                        # [..., S, c, c, K]
    diag = matmul("bhnsijk,bhnsjk->bhnsij", x4[..., :, None, :] * exp_masked(diff, causal),
                  y4, dtype)

    ref = g4[..., -1, :]                                                   # R_b [..., S, K]
    prev = jnp.concatenate([jnp.zeros_like(ref[..., :1, :]), ref[..., :-1, :]], axis=-2)
    x_ref = x4 * jnp.exp(g4 - prev[..., None, :])                          # exp(G_i - R_{a-1})
    y_ref = y4 * jnp.exp(ref[..., None, :] - g4)                           # exp(R_b - G_j)
    later = (np.arange(s)[:, None] > np.arange(s)[None, :])[:, :, None]   # a > b
    bridge = exp_masked(prev[..., :, None, :] - ref[..., None, :, :], later)  # [..., a, b, K]
    # einsum letters: x = query sub-chunk a, y = key sub-chunk b (z is the batch axis).
    off = matmul("zhnxyik,zhnyjk->zhnxyij", x_ref[..., :, None, :, :] * bridge[..., None, :],
                 y_ref, dtype)
    if count is not None:
        c4 = count.reshape(b, 1, n, s, sub)
        diag = jnp.where(c4[..., :, None] == c4[..., None, :], diag, 0.0)
        same = c4[:, :, :, :, None, :, None] == c4[:, :, :, None, :, None, :]  # [.., a, b, i, j]
        off = jnp.where(same, off, 0.0)
    return diag, off


def decayed_scores(xs, ys, g_cum, sub: int, count=None, dtype=jnp.float32):
    """M as one [B, H, N, C, C] matrix (row i, column j; zero above the diagonal)."""
    diag, off = decayed_score_blocks(xs, ys, g_cum, sub, count, dtype)
    b, h, n, s, c, _ = diag.shape
    blocks = off + jnp.eye(s, dtype=diag.dtype)[:, :, None, None] * diag[..., :, None, :, :]
    return jnp.swapaxes(blocks, -3, -2).reshape(b, h, n, s * c, s * c)
