"""Titans neural memory in chunkwise-parallel form (the paper's parallel training), jax.numpy.

Shape legend: B batch, T time, H heads, K key dim, V value dim, E hidden width, L memory depth,
C chunk size (b in the paper), N = number of chunks.
    q, k [B, T, H, K]; v [B, T, H, V]; theta, eta, alpha [B, T, H]; o [B, T, H, V];
    memory weights: tuple of L arrays [B, H, in_l, out_l]; chunk tensors [N, B, H, C, ...].

The rule is the one of reference.py (Behrouz, Zhong & Mirrokni 2025, arXiv:2501.00663,
eqs. 12-15 and Sec. 3.2): inside a chunk every gradient is taken at the chunk-start weights
M_0 (local indices t = 1..C), so the chunk's gradients do not depend on each other and are
computed for all C tokens at once. With u_i = -theta_i grad l(M_0; x_i):

    S_t = eta_t S_{t-1} + u_t            =>  S_t = E_t S_0 + sum_{i<=t} LE[t, i] u_i
    M_t = (1 - alpha_t) M_{t-1} + S_t    =>  M_t = A_t M_0 + B_t S_0 + sum_{i<=t} P[t, i] u_i

    E_t = prod_{m<=t} eta_m,  A_t = prod_{m<=t} (1 - alpha_m),
    LE[t, i] = prod_{i<m<=t} eta_m,  LA[t, j] = prod_{j<m<=t} (1 - alpha_m)   (1 on the diagonal)
    P = LA @ diag(real) @ LE,  B = LA @ diag(real) E      (real = 1 on real tokens, see below)

(the second line unrolls M_t = A_t M_0 + sum_{j<=t} LA[t, j] S_j and substitutes the first;
with eta = 0 it is the paper's M_t = beta_t M_0 - sum_i theta_i beta_t / beta_i grad l(M_0; x_i)).
Momentum and forgetting are thus two linear recurrences solved by decay matrices, and only the
chunk-to-chunk passing of (M, S) is sequential (lax.scan).

Per-token gradients without per-token weights: for the MLP memory the gradient of one token's
loss is, layer by layer, an outer product grad W_l = a_{l-1}^T d_l of the layer's input
activation a_{l-1} [in] and its back-propagated error d_l [out] (d_L = 2 (M_0(k) - v),
d_l = (d_{l+1} W_{l+1}^T) * silu'(z_l)), computed in closed form for all C keys at once. The
read y_t = M_t(q_t) with the per-token weights M_t then never builds them: with x the query's
input to layer l (under M_t),

    x M_t,l = A_t (x W_l) + B_t (x S_l) - sum_{i<=t} P[t, i] theta_i (x . a_{l-1,i}) d_{l,i}

i.e. chunked linear attention with a decay-and-momentum mask, layer after layer. The chunk
end is the same sum at t = C, as matmuls [in, C] @ [C, out].

Gates in log space: the decay products are exp of segment sums of log(1 - alpha) and log(eta).
Ratios A_t / A_j of cumulative products would divide two underflowed zeros (0 / 0 = NaN) under
strong forgetting over a chunk; a segment sum adds only the terms of its own segment, so it
neither divides nor cancels two large cumulative sums, and every exponent is <= 0. Log space
also makes zero padding inert (log-gate 0 = keep everything, theta 0 = no write).

Any T and any start offset: tokens are placed at their position in the chunk grid (offset
chunk_offset, static or traced) in an otherwise zero buffer, padded to whole chunks; the first
chunk's gradients use the carried chunk-start weights. Zero gates alone do not make a padded
step inert: with theta = 0, alpha = 0 and eta = 1 the momentum still moves the memory
(M_j = M_{j-1} + S_j). A mask removes the S_j term on padded steps (real_j = 0 below).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.chunking import to_chunks
from pallas_kernels.precision import HIGHEST
from pallas_kernels.titans.reference import TitansState, clip_scale, initial_state

# Clamps before the logs: alpha = 1 or eta = 0 exactly (a saturated float32 sigmoid) would give
# log 0 = -inf, whose gradient is inf and turns 0 * inf into NaN. The clamped factors (6e-8 and
# 1e-30) are zero for every practical purpose.
ALPHA_MAX = 1.0 - 2.0 ** -24
ETA_MIN = 1e-30


def _mm(spec, a, b):
    return jnp.einsum(spec, a, b, precision=HIGHEST)


def _silu_grad(z):
    s = jax.nn.sigmoid(z)
    return s * (1 + z * (1 - s))


def _segment_decay(log_gate: jax.Array) -> jax.Array:
    """[..., C] log-gates -> [..., C, C] with [t, j] = exp(sum_{j<m<=t} log_gate_m) for t >= j,
    else 0 (Mamba2's "segsum": each entry sums only its own segment; see the docstring)."""
    c = log_gate.shape[-1]
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    seg = jnp.cumsum(jnp.where(strict, log_gate[..., :, None], 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((c, c), bool)), jnp.exp(seg), 0.0)


def _chunk(mem, mom, grad_w, xs, grad_clip=None):
    """One chunk: per-token gradients at grad_w, reads with the per-token weights, chunk end.

    mem, mom, grad_w: tuples of [B, H, in, out]; xs: the chunk's [B, H, C, ...] tensors.
    Returns (memory after the chunk, momentum after the chunk, o [B, H, C, V]).
    """
    q, k, v, coef_a, coef_b, read, read1, mem_last, mom_last, a_last, b_last, e_last = xs
    depth = len(mem)
    # Gradients of ||M_0(k_i) - v_i||^2 for all C keys: forward through grad_w, then backward.
    acts, pre = [k], []
    for i, w in enumerate(grad_w):
        pre.append(_mm("bhci,bhio->bhco", acts[-1], w))
        if i < depth - 1:
            acts.append(jax.nn.silu(pre[-1]))
    deltas = [None] * depth
    d = 2.0 * (pre[-1] - v)
    for i in reversed(range(depth)):
        deltas[i] = d
        if i:
            d = _mm("bhco,bhio->bhci", d, grad_w[i]) * _silu_grad(pre[i - 1])
    if grad_clip is not None:
        # Token i's layer-l gradient is the outer product a_{l-1,i}^T d_{l,i}, whose Frobenius
        # norm is |a_{l-1,i}| |d_{l,i}|; scaling every d_{l,i} scales token i's whole gradient.
        sq = sum(jnp.sum(a ** 2, -1) * jnp.sum(d ** 2, -1) for a, d in zip(acts, deltas))
        scale = clip_scale(sq, grad_clip)[..., None]                       # [B, H, C, 1]
        deltas = [d * scale for d in deltas]
    # Reads y_t = M_t(q_t), layer by layer (the docstring's linear-attention form).
    x = q
    for i in range(depth):
        # Layer 1's mask times q.k was formed outside the scan: it needs no weights.
        qa = read1 if i == 0 else read * _mm("bhci,bhji->bhcj", x, acts[i])
        z = (coef_a[..., None] * _mm("bhci,bhio->bhco", x, mem[i])
             + coef_b[..., None] * _mm("bhci,bhio->bhco", x, mom[i])
             + _mm("bhcj,bhjo->bhco", qa, deltas[i]))
        x = jax.nn.silu(z) if i < depth - 1 else z
    # The state after the chunk's last token.
    col = lambda s: s[..., None, None]
    new_mem = tuple(col(a_last) * m + col(b_last) * s
                    + _mm("bhci,bhco->bhio", a * mem_last[..., None], d)
                    for m, s, a, d in zip(mem, mom, acts, deltas))
    new_mom = tuple(col(e_last) * s + _mm("bhci,bhco->bhio", a * mom_last[..., None], d)
                    for s, a, d in zip(mom, acts, deltas))
    return new_mem, new_mom, x


def _chunk_coefficients(qc, kc, vc, th, la, le, real):
    """The per-chunk tensors _chunk takes, from [N, B, H, C, ...] chunked inputs, log-gates and
    the real-step mask (nothing here depends on the weights)."""
    decay_a, decay_e = _segment_decay(la), _segment_decay(le)           # LA, LE [N, B, H, C, C]
    coef_a = jnp.exp(jnp.cumsum(la, axis=-1))                           # A_t [N, B, H, C]
    e_cum = jnp.exp(jnp.cumsum(le, axis=-1))                            # E_t
    # A padded step must leave (M, S) as they are, but no gate values do that (eta = 1 keeps S,
    # and then M += S still moves M): padded steps instead drop the S_j term of M's recurrence,
    # M_j = (1 - alpha_j) M_{j-1} + real_j S_j, i.e. LA's column j is scaled by real_j.
    decay_a = decay_a * real[..., None, :]
    coef_b = _mm("...tj,...j->...t", decay_a, e_cum)                    # B = LA @ E
    read = _mm("...tj,...ji->...ti", decay_a, decay_e) * -th[..., None, :]   # -P[t, i] theta_i
    read1 = read * _mm("...ik,...jk->...ij", qc, kc)
    return (qc, kc, vc, coef_a, coef_b, read, read1, read[..., -1, :],
            -th * decay_e[..., -1, :], coef_a[..., -1], coef_b[..., -1], e_cum[..., -1])


def titans_memory_xla(q, k, v, theta, eta, alpha, *, memory0, momentum0=None,
                      chunk_start0=None, chunk_offset=0, chunk_size=16,
                      output_final_state=False, grad_clip=None):
    """Chunkwise-parallel Titans memory (same contract as the reference), float32 inside.

    Args: as pallas_kernels.titans.titans_memory (chunk_size C a Python int).

    Returns:
        (o [B, T, H, V] in q's dtype, final TitansState or None).
    """
    b, t, h = q.shape[:3]
    c = int(chunk_size)
    f32 = jnp.float32
    static = isinstance(chunk_offset, int)
    if static:
        lead, tp = chunk_offset, -(-(chunk_offset + t) // c) * c
    else:   # traced offset: room for any lead in [0, C)
        lead, tp = jnp.asarray(chunk_offset, jnp.int32), -(-(t + c - 1) // c) * c

    def chunked(x):   # [B, T, H, ...] -> [N, B, H, C, ...], zeros outside the real tokens
        x = jnp.asarray(x, f32)
        if static:
            x = jnp.pad(x, [(0, 0), (lead, tp - lead - t)] + [(0, 0)] * (x.ndim - 2))
        else:
            x = jax.lax.dynamic_update_slice_in_dim(jnp.zeros((b, tp) + x.shape[2:], f32), x,
                                                    lead, axis=1)
        return jnp.moveaxis(to_chunks(x, c), 2, 0)

    qc, kc, vc, th = (chunked(x) for x in (q, k, v, theta))
    la = chunked(jnp.log1p(-jnp.minimum(jnp.asarray(alpha, f32), ALPHA_MAX)))  # log(1 - alpha)
    le = chunked(jnp.log(jnp.maximum(jnp.asarray(eta, f32), ETA_MIN)))         # log(eta)
    real = chunked(jnp.ones(q.shape[:3], f32))                         # 0 on padded steps
    xs = _chunk_coefficients(qc, kc, vc, th, la, le, real)

    st = initial_state(memory0, momentum0, chunk_start0, chunk_offset)
    # Chunk 0 takes its gradients at the carried chunk-start weights (the call may start
    # mid-chunk); every later chunk at the memory entering it.
    if static:
        grad0 = st.memory if lead == 0 else st.chunk_start
    else:   # as the reference: a chunk starting at offset 0 takes the current memory
        grad0 = tuple(jnp.where(lead == 0, m, g) for m, g in zip(st.memory, st.chunk_start))
    mem, mom, o0 = _chunk(st.memory, st.momentum, grad0, jax.tree.map(lambda x: x[0], xs),
                          grad_clip)
    n_next = (lead + t) // c            # the chunk holding the token after the last one

    def step(carry, inputs):
        mem, mom, keep = carry
        idx, xs_c = inputs
        if output_final_state:          # remember the start weights of chunk n_next
            keep = tuple(jnp.where(idx == n_next, m, g) for m, g in zip(mem, keep))
        mem, mom, o = _chunk(mem, mom, mem, xs_c, grad_clip)
        return (mem, mom, keep), o

    keep0 = grad0 if output_final_state else ()
    (mem, mom, keep), o_rest = jax.lax.scan(
        step, (mem, mom, keep0),
        (jnp.arange(1, tp // c), jax.tree.map(lambda x: x[1:], xs)))
    o = jnp.concatenate([o0[None], o_rest], axis=0)                     # [N, B, H, C, V]
    o = jnp.moveaxis(o, 0, 2).reshape(b, h, tp, -1)
    o = jax.lax.dynamic_slice_in_dim(o, lead, t, axis=2) if not static else o[:, :, lead:lead + t]
    o = jnp.moveaxis(o, 1, 2).astype(q.dtype)
    if not output_final_state:
        return o, None
    offset = jnp.asarray((lead + t) % c, jnp.int32)
    chunk_start = tuple(jnp.where(offset == 0, m, g) for m, g in zip(mem, keep))
    return o, TitansState(mem, mom, chunk_start, offset)


def titans_memory_packed_xla(q, k, v, theta, eta, alpha, *, memory0, segment_ids, chunk_size,
                             chunk_capacity, momentum0=None, chunk_start0=None, chunk_offset=0,
                             grad_clip=None):
    """Packed documents in chunkwise-parallel form: every document starts from the state
    (memory0, momentum0, chunk_start0, chunk_offset) and counts its chunks from there.

    A row's shared chunk grid cannot hold that (a document starting inside a chunk would need
    gradients at weights from the middle of it), so the tokens are first laid out document by
    document, each at chunk position chunk_offset (segments.document_layout's prefix,
    `chunk_capacity` chunks per row); the chunk scan resets (M, S) to the starting state at
    every chunk that opens a document (whose gradients are then taken at chunk_start0), and
    the outputs are gathered back. Empty slots are inert steps (theta 0,
    log-gates 0, real 0). Where a row's documents need more chunks than chunk_capacity
    (documents much shorter than a chunk), the exact token-by-token form runs instead
    (reference.titans_memory_packed_reference, chosen by a lax.cond: both are compiled).

    Args: as titans_memory_xla, plus segment_ids [B, T] int (0 = padding) and chunk_capacity
        (static int). Returns o [B, T, H, V] in q's dtype (0 at padding).
    """
    from pallas_kernels.segments import document_layout
    from pallas_kernels.titans.reference import titans_memory_packed_reference

    b, t, h = q.shape[:3]
    c = int(chunk_size)
    f32 = jnp.float32
    lead = int(chunk_offset)
    lay = document_layout(segment_ids, c, chunk_capacity, prefix=lead)
    s = chunk_capacity * c
    bi = jnp.arange(b)[:, None]

    def fast(q, k, v, theta, eta, alpha, start):
        def buffered(x):     # [B, T, H, ...] -> [N, B, H, C, ...] in layout order, zeros between
            x = jnp.asarray(x, f32)
            buf = jnp.zeros((b, s) + x.shape[2:], f32).at[bi, lay.slot].set(x, mode="drop")
            return jnp.moveaxis(to_chunks(buf, c), 2, 0)

        qc, kc, vc, th = (buffered(x) for x in (q, k, v, theta))
        # Gates buffered in log space: an empty slot gets log-gate 0 (keep all) and theta 0.
        la = buffered(jnp.log1p(-jnp.minimum(jnp.asarray(alpha, f32), ALPHA_MAX)))
        le = buffered(jnp.log(jnp.maximum(jnp.asarray(eta, f32), ETA_MIN)))
        real = jnp.moveaxis(to_chunks(jnp.broadcast_to(
            (lay.segment_ids != 0)[:, :, None], (b, s, h)).astype(f32), c), 2, 0)
        xs = _chunk_coefficients(qc, kc, vc, th, la, le, real)
        st = initial_state(*start)
        # A document's first chunk takes its gradients at the carried chunk-start weights when
        # it starts mid-chunk, as the unpacked call from that state does.
        grad0 = st.memory if lead == 0 else st.chunk_start

        def step(carry, inputs):
            opens, xs_c = inputs
            at = opens[:, None, None, None]
            pick = lambda fresh, cur: tuple(jnp.where(at, f, x) for f, x in zip(fresh, cur))
            mem, mom = pick(st.memory, carry[0]), pick(st.momentum, carry[1])
            mem, mom, o = _chunk(mem, mom, pick(grad0, mem), xs_c, grad_clip)
            return (mem, mom), o

        _, o = jax.lax.scan(step, (st.memory, st.momentum), (lay.opens.T, xs))  # [N,B,H,C,V]
        o = jnp.moveaxis(o, 0, 2).reshape(b, h, s, -1)
        o = jnp.moveaxis(o, 1, 2)[bi, jnp.minimum(lay.slot, s - 1)]     # back to [B, T, H, V]
        return jnp.where((segment_ids != 0)[..., None, None], o, 0.0)

    def exact(q, k, v, theta, eta, alpha, start):
        return titans_memory_packed_reference(
            q, k, v, theta, eta, alpha, memory0=start[0], momentum0=start[1],
            chunk_start0=start[2], chunk_offset=lead, segment_ids=segment_ids, chunk_size=c,
            grad_clip=grad_clip).astype(f32)

    start = (tuple(memory0), momentum0, chunk_start0)
    o = jax.lax.cond(lay.fits, fast, exact, q, k, v, theta, eta, alpha, start)
    return o.astype(q.dtype)
