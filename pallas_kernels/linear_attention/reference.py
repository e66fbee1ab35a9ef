"""Linear attention, token by token: the readable definition (Katharopoulos et al. 2020).

Shapes: B batch, T time, H heads, K key dim, V value dim.
q, k [B, T, H, K]; v [B, T, H, V]; state S [B, H, K, V]; normalizer state z [B, H, K].

"Transformers are RNNs" (Katharopoulos et al. 2020), Eq. 16-20 with the feature map already
applied by the caller (phi(q), phi(k) are passed in as q, k):

    S_t = S_{t-1} + k_t v_t^T                    (Eq. 18)
    z_t = z_{t-1} + k_t                          (Eq. 19)
    o_t = (scale q_t)^T S_t                      (normalize=False)
    o_t = (scale q_t)^T S_t / ((scale q_t)^T z_t + eps)   (normalize=True, Eq. 20)

Everything runs in float32: S and z are sums over all past tokens, and bf16's 8-bit mantissa
would lose small late contributions against a large running sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import default_scale
from pallas_kernels.precision import HIGHEST
from pallas_kernels.segments import document_starts, reset_at_starts, zero_padding

# Added to the normalizer so that an all-zero feature row (e.g. ReLU features, or the first
# token with an all-zero key) gives o = 0 instead of 0 / 0. Small enough to be invisible next
# to a sum of positive features.
EPS = 1e-6


def linear_attention_reference(q, k, v, *, scale=None, normalize=False, initial_state=None,
                               output_final_state=False, segment_ids=None):
    """Token-by-token linear attention with lax.scan, in float32.

    Args:
        q: [B, T, H, K] queries (feature map already applied).
        k: [B, T, H, K] keys (feature map already applied).
        v: [B, T, H, V] values.
        scale: query scale; defaults to K ** -0.5.
        normalize: divide by (scale q_t)^T z_t + EPS (Eq. 20). Meant for non-negative features
            (e.g. elu + 1, the paper's Eq. 7); with signed features the denominator can cross 0.
        initial_state: normalize=False: S [B, H, K, V] or None. normalize=True: a tuple
            (S [B, H, K, V], z [B, H, K]) or None. None means zeros.
        output_final_state: also return the state after the last token.
        segment_ids: optional [B, T] int packed-document ids: S and z restart from zero at
            each document start; padding (0) is inert (pallas_kernels/segments.py).

    Returns:
        (o [B, T, H, V] in q's dtype, final_state), final_state as initial_state's format in
        float32, or None when output_final_state is False.
    """
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    scale = default_scale(k, scale)
    s0, z0 = split_state(initial_state, normalize, (b, h, dk, dv))
    segs = jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None else segment_ids
    q, k, v = zero_padding(segs, q, k, v)
    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v))   # [T, B, H, D]
    xs += (document_starts(segs).T,)

    def step(carry, x):
        s, z = carry
        qt, kt, vt, start_t = x
        s, z = reset_at_starts(s, start_t), reset_at_starts(z, start_t)
        s = s + kt[..., :, None] * vt[..., None, :]
        z = z + kt
        qt = qt * scale
        o = jnp.einsum("bhk,bhkv->bhv", qt, s, precision=HIGHEST)
        if normalize:
            o = o / (jnp.sum(qt * z, axis=-1, keepdims=True) + EPS)
        return (s, z), o

    (s, z), o = jax.lax.scan(step, (s0, z0), xs)
    o = jnp.moveaxis(o, 0, 1).astype(q.dtype)
    if not output_final_state:
        return o, None
    return o, ((s, z) if normalize else s)


def split_state(initial_state, normalize, shape):
    """Checks the state format and returns float32 (S [B, H, K, V], z [B, H, K])."""
    b, h, dk, dv = shape
    if initial_state is None:
        return jnp.zeros((b, h, dk, dv), jnp.float32), jnp.zeros((b, h, dk), jnp.float32)
    if normalize:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("with normalize=True, initial_state must be a tuple (S, z): "
                             "S [B, H, K, V] and the key-sum normalizer z [B, H, K]")
        s, z = initial_state
    else:
        if isinstance(initial_state, (tuple, list)):
            raise ValueError("with normalize=False, initial_state must be one array "
                             "S [B, H, K, V], not a tuple")
        s, z = initial_state, jnp.zeros((b, h, dk), jnp.float32)
    if s.shape != (b, h, dk, dv) or z.shape != (b, h, dk):
        raise ValueError(f"initial_state shapes {s.shape}, {z.shape} do not match "
                         f"S {(b, h, dk, dv)}, z {(b, h, dk)}")
    return s.astype(jnp.float32), z.astype(jnp.float32)
