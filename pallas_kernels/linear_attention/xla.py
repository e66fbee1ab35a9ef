"""Linear attention in chunkwise-parallel form, in jax.numpy (matmuls inside chunks).

Shapes: B batch, T time, H heads, K key dim, V value dim, N chunks, C chunk size.
q, k [B, T, H, K]; v [B, T, H, V]; state S [B, H, K, V]; normalizer state z [B, H, K].

The chunkwise form of linear attention (Yang et al. 2024, "Gated Linear Attention Transformers
with Hardware-Efficient Training", Sec. 2, the chunkwise parallel form; Katharopoulos et al.
2020 for the recurrence): for chunk n with rows Q_n, K_n, V_n and the state S_n entering it,

    O_n     = scale * (Q_n S_n + tril(Q_n K_n^T) V_n)      (inter-chunk + intra-chunk)
    S_{n+1} = S_n + K_n^T V_n

The normalizer z_t = sum_{i<=t} k_i is the same recurrence with a value column of ones, so with
normalize=True the values get an extra all-ones column and the state an extra column z: one pass
yields numerator and denominator together.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.arguments import default_scale
from pallas_kernels.chunking import from_chunks, to_chunks
from pallas_kernels.linear_attention.reference import EPS, split_state
from pallas_kernels.precision import matmul, operand_dtype
from pallas_kernels.segments import ChunkMasks, zero_padding
from pallas_kernels.state_passing import chunk_outputs


def linear_attention_xla(q, k, v, *, scale=None, normalize=False, initial_state=None,
                         output_final_state=False, chunk_size=64, state_impl="xla",
                         segment_ids=None, precision="highest"):
    """Chunkwise linear attention; same contract as `linear_attention_reference`.

    Any T works: T is zero-padded to a multiple of chunk_size (zero k and v, including the ones
    column, add nothing to S or z) and the padded outputs are dropped.

    Args:
        q: [B, T, H, K] queries (feature map already applied).
        k: [B, T, H, K] keys.
        v: [B, T, H, V] values.
        scale: query scale; defaults to K ** -0.5.
        normalize: divide by (scale q_t)^T z_t + EPS.
        initial_state: S [B, H, K, V], or (S, z) when normalize=True; None means zeros.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk (C).
        state_impl: backend of the chunk-to-chunk state sweep (state_passing: "xla",
            "pallas_gpu" or "pallas_tpu"); the intra-chunk terms are XLA either way.
        precision: "highest" or "bf16" matmul operands (pallas_kernels/precision.py).
        segment_ids: optional [B, T] int packed-document ids; masks as segments.ChunkMasks (the
            normalizer z restarts with S).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state float32 or None).
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    scale = default_scale(k, scale)
    s0, z0 = split_state(initial_state, normalize, (b, h, dk, dv))
    masks = None
    if segment_ids is not None:
        q, k, v = zero_padding(segment_ids, q, k, v)
        masks = ChunkMasks(segment_ids, chunk_size)
    if normalize:
        v = jnp.concatenate([v.astype(jnp.float32), jnp.ones((*v.shape[:3], 1), jnp.float32)], -1)
        s0 = jnp.concatenate([s0, z0[..., None]], axis=-1)          # [B, H, K, V + 1]
    # float32 inside: the state sums all past tokens (see reference.py).
    qc, kc, vc = (to_chunks(x, chunk_size) for x in (q, k, v))     # [B, H, N, C, D]
    qc = qc * scale

    # No decay: a vector of ones (the sweep multiplies by it; cheap next to the matmuls).
    ones = jnp.ones(kc.shape[:3] + kc.shape[-1:], jnp.float32)
    mat = operand_dtype(precision)
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    q_state, k_state = qc, kc
    if masks is not None:
        causal = causal & masks.same
        q_state, k_state, ones = qc * masks.reads, kc * masks.writes, ones * masks.keeps
    scores = jnp.where(causal, matmul("bhnik,bhnjk->bhnij", qc, kc, mat), 0.0)
    # o = q S_n + scores v, both inside the sweep.
    low = lambda a: a.astype(mat)
    o, s_final = chunk_outputs(low(q_state), low(scores), None, low(vc), low(k_state), ones, s0,
                               backend=state_impl)

    if normalize:
        o = o[..., :dv] / (o[..., dv:] + EPS)
    o = from_chunks(o, t, q.dtype)
    if not output_final_state:
        return o, None
    if normalize:
        return o, (s_final[..., :dv], s_final[..., dv])
    return o, s_final
