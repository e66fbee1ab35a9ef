"""Sequence-parallel softmax attention as a ring: each shard keeps its queries and passes its
key / value block around the N shards (ppermute), attending to each block as it arrives with
an online softmax in float32 (Liu et al. 2023, "Ring Attention with Blockwise Transformers").

Shape legend: B batch, Tl tokens of one shard, N shards, H query heads, Hkv key/value heads
(G = H / Hkv), Dh head dim, Dv value head dim.

Against the all-gather form (attention.py) a shard holds one key / value block at a time
instead of all N, and the transfers can overlap the block's products. The mask is the same
definition on original token indices (or, for packed documents, document ids and in-document
positions that travel with the block), so both layouts work.

The backward is its own (jax.custom_vjp), FlashAttention-2's (Dao 2023, Alg. 2) around the
ring: the forward saves only q, the shard's own block, the output and the log-sum-exp
[B, H, Tl]; the backward passes the block around again together with its gradient
accumulators (dK, dV, which travel N hops and arrive back at their owner), recomputing each
step's probabilities from the log-sum-exp. So no step's [B, H, Tl, Tl] scores outlive the step
in either pass, and the activation memory is O(Tl) per head, not the all-gather form's
[B, H, Tl, T]. A block that travels as something narrower than its keys and values (MLA's
latents, through `expand`) is re-expanded each step and its gradient pulled back through the
expansion (jax.vjp) before it travels on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.context_parallel import SEQUENCE, SequenceShards

F32 = jnp.float32
MASK = -0.7 * float(jnp.finfo(F32).max)     # finite "minus infinity": no inf - inf


def _identity(k, v, w):
    return k, v


def ring_local(q, k, v, doc, *, scale, shards: SequenceShards, tl: int, expand=None,
               weights=None):
    """Inside a shard: q [B, Tl, H, Dh]; k / v [B, Tl, Hkv, Dh|Dv] (or, with expand, what
    expand(k, v, weights) turns into them); doc None or (segment ids, in-document positions)
    [B, Tl] each -> [B, Tl, H, Dv] in q's dtype."""
    b = q.shape[0]
    if doc is None:
        idx = shards.local_tokens(tl)
        q_pos, q_seg = jnp.broadcast_to(idx, (b, tl)), None
    else:
        q_seg, q_pos = doc
    run = functools.partial(_ring, shards.n, expand or _identity, scale)
    return run(q, k, v, weights, q_pos, q_seg)


def _mask(q_pos, q_seg, k_pos, k_seg):
    """[B, 1, 1, Tl, Tl]: key j visible to query i (pallas_kernels/masks' definition, full
    causal: a window takes the halo form, window.py)."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask[:, None, None]


def _pass_on(xs, n):
    """Every shard's xs to the next shard (r -> r + 1 mod N)."""
    shift = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, SEQUENCE, shift), xs)


def _grouped(q, hkv):
    b, tl, h, dh = q.shape
    return q.reshape(b, tl, hkv, h // hkv, dh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(n, expand, scale, q, k, v, weights, q_pos, q_seg):
    return _forward(n, expand, scale, q, k, v, weights, q_pos, q_seg)[0]


def _steps(n, step, carry, block):
    """carry = step(carry, block) for each of the N blocks as it arrives, the block passed on
    after each step: a lax.scan over all N, so one step's temporaries are live at a time
    whatever N is (unrolled, XLA kept several steps' [B, H, Tl, Tl] scores alive: 5.7x the
    one-device memory at N = 8 under weak scaling, against 1.0x now). The last hop brings the
    block home, one transfer that the loop's uniformity buys (measured: the scan over N - 1
    steps plus a last one outside it kept two steps' temporaries at N = 2)."""
    def body(state, _):
        carry, block = state
        return (step(carry, block), _pass_on(block, n)), None

    (carry, block), _ = jax.lax.scan(body, (carry, block), None, length=n)
    return carry


def _forward(n, expand, scale, q, k, v, weights, q_pos, q_seg):
    """(out [B, Tl, H, Dv], lse [B, Hkv, G, Tl] float32)."""
    b, tl, h, _ = q.shape
    kb, vb = jax.eval_shape(expand, k, v, weights)
    hkv, dv = kb.shape[2], vb.shape[-1]
    qg = _grouped(q, hkv)

    def step(carry, block):
        acc, m, total = carry
        kv_src, kv_dst, k_pos, k_seg = block
        kb, vb = expand(kv_src, kv_dst, weights)
        mask = _mask(q_pos, q_seg, k_pos, k_seg)
        s = jnp.einsum("btkgd,bskd->bkgts", qg, kb, preferred_element_type=F32) * scale
        s = jnp.where(mask, s, MASK)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        total = alpha * total + p.sum(-1)
        acc = alpha[..., None] * acc + jnp.einsum("bkgts,bskd->bkgtd", p.astype(vb.dtype), vb,
                                                  preferred_element_type=F32)
        return acc, m_new, total

    shape = (b, hkv, h // hkv, tl)
    init = (jnp.zeros(shape + (dv,), F32), jnp.full(shape, MASK, F32), jnp.zeros(shape, F32))
    acc, m, total = _steps(n, step, init, (k, v, q_pos, q_seg))
    seen = total > 0.0              # a query with no visible key (none here: causal) gives 0
    out = acc / jnp.where(seen, total, 1.0)[..., None]              # [B, Hkv, G, Tl, Dv]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), 0.0)
    out = jnp.moveaxis(out, 3, 1).reshape(b, tl, h, -1).astype(q.dtype)
    return out, lse


def _ring_fwd(n, expand, scale, q, k, v, weights, q_pos, q_seg):
    out, lse = _forward(n, expand, scale, q, k, v, weights, q_pos, q_seg)
    return out, (q, k, v, weights, q_pos, q_seg, out, lse)


def _ring_bwd(n, expand, scale, res, d_out):
    q, k, v, weights, q_pos, q_seg, out, lse = res
    b, tl, h, _ = q.shape
    hkv = jax.eval_shape(expand, k, v, weights)[0].shape[2]
    qg = _grouped(q, hkv)
    dog = _grouped(d_out, hkv).astype(F32)
    # delta_i = rowsum(dO_i * O_i) (FlashAttention-2, Alg. 2 line 4).
    delta = jnp.einsum("btkgd,btkgd->bkgt", dog, _grouped(out, hkv).astype(F32))
    zeros = lambda x: jnp.zeros(x.shape, F32)  # noqa: E731

    def step(carry, _):
        (dq, d_weights), block, grads = carry
        kv_src, kv_dst, k_pos, k_seg = block
        (kb, vb), pull_back = jax.vjp(expand, kv_src, kv_dst, weights)
        mask = _mask(q_pos, q_seg, k_pos, k_seg)
        s = jnp.einsum("btkgd,bskd->bkgts", qg, kb, preferred_element_type=F32) * scale
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bkgts,btkgd->bskd", p, dog)
        dp = jnp.einsum("btkgd,bskd->bkgts", dog, vb.astype(F32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kb.astype(F32))
        dk = jnp.einsum("bkgts,btkgd->bskd", ds, qg.astype(F32))
        d_src, d_dst, d_w = pull_back((dk.astype(kb.dtype), dv.astype(vb.dtype)))
        grads = (grads[0] + d_src.astype(F32), grads[1] + d_dst.astype(F32))
        d_weights = jax.tree.map(lambda a, g: a + g.astype(F32), d_weights, d_w)
        # The block and its gradients travel on together, N hops in all (as _steps), so both
        # are back at their owner at the end.
        block, grads = _pass_on((block, grads), n)
        return ((dq, d_weights), block, grads), None

    init = ((jnp.zeros(qg.shape, F32), jax.tree.map(zeros, weights)), (k, v, q_pos, q_seg),
            (zeros(k), zeros(v)))
    ((dq, d_weights), _, grads), _ = jax.lax.scan(step, init, None, length=n)
    dq = dq.reshape(b, tl, h, -1).astype(q.dtype)
    d_weights = jax.tree.map(lambda g, w: g.astype(w.dtype), d_weights, weights)
    return (dq, grads[0].astype(k.dtype), grads[1].astype(v.dtype), d_weights, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)
