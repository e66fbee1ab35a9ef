"""Flash attention in Pallas for the GPU (Triton lowering): causal, sliding window, sinks, GQA.

Shape legend:
  B batch, T tokens (Tp: T padded to the block size), H query heads, Hkv key/value heads,
  G = H / Hkv query heads per kv head, Dh head dim (Dp: padded to a power of two, >= 16),
  BQ / BK query / key block sizes, NQ = Tp / BQ, NK = Tp / BK.
  q, o, do [B, Tp, H, Dp]; k, v [B, Tp, Hkv, Dp]; lse, delta [B, H, Tp] (float32).

Query t sees key j iff j <= t and (window is None or t - j < window or j < n_sinks), as in
reference.py. FlashAttention-2 (Dao 2023, arXiv:2307.08691): one program per (batch x head,
query block) keeps a running max m, running sum l and an unnormalised float32 accumulator
while it walks the key blocks (online softmax, Algorithm 1); the output is acc / l.

Block skipping: a query block only walks the key blocks that hold a visible key, i.e. the
sink block(s) at the start and the blocks between the window's left edge and the diagonal
(`key_blocks`). The loop length is at most cdiv(n_sinks, BK) + cdiv(BQ + window - 1, BK) + 1,
so the cost grows with the window, not with T. Key and value heads are picked by the index
map (query head h reads kv head h // G); k and v are never repeated in memory.

Backward (FlashAttention-2, Algorithm 2, split in two kernels so that no program needs atomics):
  delta_i = rowsum(dO_i * O_i)                      (XLA, fused elementwise + reduce)
  P = exp(S - lse),  dS = P * (dO V^T - delta)
  dq kernel, grid (B*H, NQ): dQ = scale * sum over the same key blocks as the forward of dS K
  dkv kernel, grid (B*Hkv, NK): for each of the G query heads of the kv head and each query
    block that can see this key block (`query_blocks`): dV += P^T dO, dK += scale * dS^T Q.
    Summing the G heads inside the program keeps GQA's dK/dV free of a [.., H, ..] temporary.

Written for Pallas' Triton (GPU) lowering (the pattern of jax's ops/gpu/attention.py: each
program sees the whole key sequence of its head and loads [BK, Dp] slices with pl.ds). Runs on
CPU with interpret=True for the tests; it has not been run on a GPU yet.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
# Finite "minus infinity" for masked scores: exp(MASK - m) is 0 for any real m, and a row whose
# visible keys all lie in later blocks never computes inf - inf.
MASK = -0.7 * float(jnp.finfo(F32).max)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """Static settings of one call (hashable: a custom_vjp nondiff argument)."""

    seq_len: int          # T before padding: keys j >= T are masked
    scale: float
    window: int | None
    n_sinks: int
    block_q: int
    block_k: int
    interpret: bool
    highest: bool         # float32 inputs: full-precision dots (not TF32)
    packed: bool = False  # segment ids given: keys of other documents are masked


def _cdiv(a, b):
    return lax.div(a + (b - 1), b)   # a >= 0; lax.div lowers to Triton where // may not


def key_blocks(qi, *, block_q: int, block_k: int, n_k_blocks: int, window: int | None,
               n_sinks: int):
    """Key blocks query block `qi` visits: (n_sink, lo, hi) = blocks [0, n_sink) then [lo, hi).

    Causal: the last key needed is the block's last query, (qi + 1) * BQ - 1. Window: the first
    key visible to the block's first query qi * BQ is qi * BQ - window + 1. Sinks: the blocks
    holding keys [0, n_sinks), unless the window range already starts at or before them.
    Works on Python ints and traced int32 scalars alike (the kernels call it with program ids).
    """
    qi = jnp.asarray(qi, jnp.int32)
    hi = jnp.minimum(_cdiv((qi + 1) * block_q, block_k), n_k_blocks)
    if window is None:
        return jnp.int32(0), jnp.int32(0), hi
    lo = lax.div(jnp.maximum(qi * block_q - (window - 1), 0), block_k)
    n_sink = jnp.minimum(jnp.int32(-(-n_sinks // block_k)), lo)
    return n_sink, lo, hi


def query_blocks(kj, *, block_q: int, block_k: int, n_q_blocks: int, window: int | None,
                 n_sinks: int):
    """Query blocks that see some key of key block `kj`: [lo, hi) (the dK/dV loop).

    Causal: the first query that sees key kj * BK is t = kj * BK. Window: the last query that
    sees the block's last key (kj + 1) * BK - 1 is that key + window - 1. A block holding a sink
    is seen by every later query.
    """
    kj = jnp.asarray(kj, jnp.int32)
    lo = lax.div(kj * block_k, block_q)
    if window is None:
        return lo, jnp.int32(n_q_blocks)
    last_q = (kj + 1) * block_k - 1 + window - 1
    hi = jnp.minimum(lax.div(last_q, block_q) + 1, n_q_blocks)
    if n_sinks:
        hi = jnp.where(kj * block_k < n_sinks, n_q_blocks, hi)
    return lo, hi


def _visible(q_start, k_start, cfg: _Cfg, block_q: int, block_k: int, q_seg=None,
             k_seg=None):
    """[BQ, BK] bool: the definition of the module docstring, plus j < T (padded keys), and
    with packed documents q_seg [BQ] == k_seg [BK] (no sinks then: the dispatcher refuses
    them, so index distance is in-document distance wherever both are in one document)."""
    t = q_start + jnp.arange(block_q, dtype=jnp.int32)[:, None]
    j = k_start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    vis = (j <= t) & (j < cfg.seq_len)
    if q_seg is not None:
        vis = vis & (q_seg[:, None] == k_seg[None, :])
    if cfg.window is not None:
        near = t - j < cfg.window
        if cfg.n_sinks:
            near = near | (j < cfg.n_sinks)
        vis = vis & near
    return vis


def _precision(cfg):
    return lax.Precision.HIGHEST if cfg.highest else lax.Precision.DEFAULT


def _dot(a, b, cfg):            # a [M, K] @ b [K, N]
    return jnp.dot(a, b, precision=_precision(cfg), preferred_element_type=F32)


def _dot_nt(a, b, cfg):         # a [M, K] @ b[N, K]^T
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(cfg),
                           preferred_element_type=F32)


def _dot_tn(a, b, cfg):         # a[M, P]^T @ b [M, Q]
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_precision(cfg),
                           preferred_element_type=F32)


def _probs(q, k, lse, q_start, k_start, cfg, q_seg=None, k_seg=None):
    """P = exp(scale * q k^T - lse) on visible entries, 0 elsewhere: [BQ, BK] float32."""
    s = _dot_nt(q, k, cfg) * cfg.scale
    vis = _visible(q_start, k_start, cfg, q.shape[0], k.shape[0], q_seg, k_seg)
    return jnp.where(vis, jnp.exp(s - lse[:, None]), 0.0)


# ---------------------------------------------------------------------------------- kernels


def _split_segs(refs, cfg, n_out):
    """(array refs..., q_seg_ref, kv_seg_ref, out refs...) -> (arrays, segs or Nones, outs)."""
    if not cfg.packed:
        return refs[:-n_out], (None, None), refs[-n_out:]
    return refs[:-n_out - 2], refs[-n_out - 2:-n_out], refs[-n_out:]


def _fwd_kernel(*refs, cfg: _Cfg, n_k_blocks: int):
    # q_ref [BQ, Dp]; k_ref, v_ref [Tp, Dp] (this head's kv head); o_ref [BQ, Dp]; lse_ref [BQ];
    # packed: q_seg_ref [BQ], kv_seg_ref [Tp].
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (o_ref, lse_ref) = _split_segs(refs, cfg, 2)
    bq, bk = cfg.block_q, cfg.block_k
    q_seg = None if qs_ref is None else qs_ref[...]
    qi = pl.program_id(1)
    q = q_ref[...]
    n_sink, lo, hi = key_blocks(qi, block_q=bq, block_k=bk, n_k_blocks=n_k_blocks,
                                window=cfg.window, n_sinks=cfg.n_sinks)

    def body(i, carry):
        acc, m, row_sum = carry
        kb = jnp.where(i < n_sink, i, lo + (i - n_sink))
        k = k_ref[pl.ds(kb * bk, bk), :]
        v = v_ref[pl.ds(kb * bk, bk), :]
        s = _dot_nt(q, k, cfg) * cfg.scale
        k_seg = None if ks_ref is None else ks_ref[pl.ds(kb * bk, bk)]
        vis = _visible(qi * bq, kb * bk, cfg, bq, bk, q_seg, k_seg)
        s = jnp.where(vis, s, MASK)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)          # rescales what was summed under the old max
        p = jnp.where(vis, jnp.exp(s - m_new[:, None]), 0.0)
        row_sum = alpha * row_sum + p.sum(axis=-1)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, cfg)
        return acc, m_new, row_sum

    init = (jnp.zeros((bq, q.shape[-1]), F32), jnp.full((bq,), -jnp.inf, F32),
            jnp.zeros((bq,), F32))
    acc, m, row_sum = lax.fori_loop(0, n_sink + hi - lo, body, init)
    # Only padded query rows (t >= T) can see no key (row_sum 0). They are sliced off and their
    # dO is 0, but their o enters delta = rowsum(o * dO) in the backward, and 0 * NaN is NaN.
    row_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    # Per-row logsumexp, stored for the backward: P = exp(S - lse) recomputes the normalised
    # probabilities block by block without a second online softmax (FlashAttention-2, Sec. 3.1.1).
    lse_ref[...] = m + jnp.log(row_sum)


def _dq_kernel(*refs, cfg: _Cfg, n_k_blocks: int):
    # q_ref, do_ref, dq_ref [BQ, Dp]; k_ref, v_ref [Tp, Dp]; lse_ref, delta_ref [BQ];
    # packed: q_seg_ref [BQ], kv_seg_ref [Tp].
    arrays, (qs_ref, ks_ref), (dq_ref,) = _split_segs(refs, cfg, 1)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = arrays
    q_seg = None if qs_ref is None else qs_ref[...]
    bq, bk = cfg.block_q, cfg.block_k
    qi = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    n_sink, lo, hi = key_blocks(qi, block_q=bq, block_k=bk, n_k_blocks=n_k_blocks,
                                window=cfg.window, n_sinks=cfg.n_sinks)

    def body(i, dq):
        kb = jnp.where(i < n_sink, i, lo + (i - n_sink))
        k = k_ref[pl.ds(kb * bk, bk), :]
        v = v_ref[pl.ds(kb * bk, bk), :]
        k_seg = None if ks_ref is None else ks_ref[pl.ds(kb * bk, bk)]
        p = _probs(q, k, lse, qi * bq, kb * bk, cfg, q_seg, k_seg)
        ds = p * (_dot_nt(do, v, cfg) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, cfg)

    dq = lax.fori_loop(0, n_sink + hi - lo, body, jnp.zeros((bq, q.shape[-1]), F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: _Cfg, n_q_blocks: int, group: int):
    # q_ref, do_ref [Tp, G, Dp] (the G query heads of this kv head); k_ref, v_ref, dk_ref,
    # dv_ref [BK, Dp]; lse_ref, delta_ref [G, Tp]; packed: q_seg_ref [Tp], kv_seg_ref [BK].
    arrays, (qs_ref, ks_ref), (dk_ref, dv_ref) = _split_segs(refs, cfg, 2)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = arrays
    k_seg = None if ks_ref is None else ks_ref[...]
    bq, bk = cfg.block_q, cfg.block_k
    kj = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    lo, hi = query_blocks(kj, block_q=bq, block_k=bk, n_q_blocks=n_q_blocks,
                          window=cfg.window, n_sinks=cfg.n_sinks)
    dk = jnp.zeros((bk, k.shape[-1]), F32)
    dv = jnp.zeros((bk, v.shape[-1]), F32)
    for g in range(group):      # static: G is small, and a static head index lowers simply

        def body(qb, carry, g=g):
            dk, dv = carry
            rows = pl.ds(qb * bq, bq)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            q_seg = None if qs_ref is None else qs_ref[rows]
            p = _probs(q, k, lse_ref[g, rows], qb * bq, kj * bk, cfg, q_seg, k_seg)
            dv = dv + _dot_tn(p.astype(do.dtype), do, cfg)
            ds = p * (_dot_nt(do, v, cfg) - delta_ref[g, rows][:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q, cfg)
            return dk, dv

        dk, dv = lax.fori_loop(lo, hi, body, (dk, dv))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------ pallas_calls


def _compiler_params(dp: int):
    # Imported here: the Triton-specific Pallas module is only needed when compiling for a GPU.
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=4 if dp <= 64 else 8, num_stages=2)


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg, dp, name):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=None if cfg.interpret else _compiler_params(dp),
        interpret=cfg.interpret, name=name)


def _seg_specs(seg, h, q_block, kv_block):
    """BlockSpecs for seg [B, Tp] in a (batch x heads, block) grid: the program's q block and
    kv block (a size of None: the whole row); [] when there are no segment ids."""
    if seg is None:
        return [], ()
    tp = seg.shape[1]
    spec = lambda size: pl.BlockSpec((None, tp if size is None else size),
                                     (lambda bh, i: (bh // h, 0)) if size is None
                                     else (lambda bh, i: (bh // h, i)))
    return [spec(q_block), spec(kv_block)], (seg, seg)


def _forward(q, k, v, seg, cfg: _Cfg):
    b, tp, h, dp = q.shape
    group = h // k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    # Grid axis 0 is batch x head: program bh serves batch bh // H, query head bh % H, and
    # reads kv head (bh % H) // G.
    q_spec = pl.BlockSpec((None, bq, None, dp), lambda bh, i: (bh // h, i, bh % h, 0))
    kv_spec = pl.BlockSpec((None, tp, None, dp),
                           lambda bh, i: (bh // h, 0, (bh % h) // group, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda bh, i: (bh // h, bh % h, i))
    seg_specs, segs = _seg_specs(seg, h, bq, None)
    kernel = functools.partial(_fwd_kernel, cfg=cfg, n_k_blocks=tp // bk)
    o, lse = _call(kernel, (b * h, tp // bq), [q_spec, kv_spec, kv_spec, *seg_specs],
                   [q_spec, row_spec],
                   [jax.ShapeDtypeStruct(q.shape, q.dtype),
                    jax.ShapeDtypeStruct((b, h, tp), F32)], cfg, dp, "flash_attention_fwd")(
                       q, k, v, *segs)
    return o, lse


def _backward(q, k, v, o, lse, do, seg, cfg: _Cfg):
    b, tp, h, dp = q.shape
    hkv = k.shape[2]
    group = h // hkv
    bq, bk = cfg.block_q, cfg.block_k
    delta = jnp.einsum("bthd,bthd->bht", o.astype(F32), do.astype(F32))
    do = do.astype(q.dtype)

    q_spec = pl.BlockSpec((None, bq, None, dp), lambda bh, i: (bh // h, i, bh % h, 0))
    kv_all = pl.BlockSpec((None, tp, None, dp), lambda bh, i: (bh // h, 0, (bh % h) // group, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda bh, i: (bh // h, bh % h, i))
    seg_specs, segs = _seg_specs(seg, h, bq, None)
    dq = _call(functools.partial(_dq_kernel, cfg=cfg, n_k_blocks=tp // bk), (b * h, tp // bq),
               [q_spec, kv_all, kv_all, q_spec, row_spec, row_spec, *seg_specs], q_spec,
               jax.ShapeDtypeStruct(q.shape, q.dtype), cfg, dp, "flash_attention_dq")(
                   q, k, v, do, lse, delta, *segs)

    # Grid axis 0 is batch x kv head; the program reads the G query heads hk*G .. hk*G + G-1.
    q_grp = pl.BlockSpec((None, tp, group, dp), lambda bk_, j: (bk_ // hkv, 0, bk_ % hkv, 0))
    kv_blk = pl.BlockSpec((None, bk, None, dp), lambda bk_, j: (bk_ // hkv, j, bk_ % hkv, 0))
    row_grp = pl.BlockSpec((None, group, tp), lambda bk_, j: (bk_ // hkv, bk_ % hkv, 0))
    kernel = functools.partial(_dkv_kernel, cfg=cfg, n_q_blocks=tp // bq, group=group)
    seg_specs, segs = _seg_specs(seg, hkv, None, bk)
    dk, dv = _call(kernel, (b * hkv, tp // bk),
                   [q_grp, kv_blk, kv_blk, q_grp, row_grp, row_grp, *seg_specs],
                   [kv_blk, kv_blk],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype),
                    jax.ShapeDtypeStruct(v.shape, v.dtype)], cfg, dp, "flash_attention_dkv")(
                       q, k, v, do, lse, delta, *segs)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg: _Cfg):
    return _forward(q, k, v, seg, cfg)[0]


def _flash_fwd(q, k, v, seg, cfg):
    o, lse = _forward(q, k, v, seg, cfg)
    return o, (q, k, v, o, lse, seg)


def _flash_bwd(cfg, res, do):
    q, k, v, o, lse, seg = res
    # Segment ids are integers: no cotangent.
    return (*_backward(q, k, v, o, lse, do, seg, cfg), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, window: int | None = None, n_sinks: int = 0,
                    scale: float | None = None, block_q: int = 64, block_k: int = 64,
                    interpret: bool = False, segment_ids=None):
    """Causal softmax attention with optional window and sinks, Pallas GPU kernel.

    Args:
        q: [B, T, H, Dh] float32 or bfloat16.
        k, v: [B, T, Hkv, Dh], H a multiple of Hkv (checked by the dispatcher).
        window, n_sinks: visibility as in reference.py.
        scale: score scale, default Dh ** -0.5.
        block_q, block_k: tile sizes (powers of two >= 16 for Triton).
        interpret: run in the Pallas interpreter (CPU tests).
        segment_ids: optional [B, T] int packed-document ids: keys of another document are
            masked (not with sinks: the block skipping keeps the row's first blocks only).

    Returns:
        [B, T, H, Dh] in q's dtype. Differentiable in q, k, v (custom_vjp).
    """
    b, t, h, dh = q.shape
    scale = dh ** -0.5 if scale is None else float(scale)
    step = math.lcm(block_q, block_k)
    tp = -(-t // step) * step
    dp = max(16, pl.next_power_of_2(dh))   # Triton tiles have power-of-two sides
    dtype = q.dtype
    k, v = k.astype(dtype), v.astype(dtype)
    # Zero padding: padded keys are masked by j < T, padded head-dim columns add 0 to q.k and
    # give zero output columns; both are sliced off (and get zero gradient through the slice).
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, dp - dh)))
    if segment_ids is not None and n_sinks:
        raise ValueError("flash_attention: segment_ids with sinks are not supported (each "
                         "document's sinks would need their own key blocks)")
    cfg = _Cfg(seq_len=t, scale=scale, window=window, n_sinks=int(n_sinks), block_q=block_q,
               block_k=block_k, interpret=bool(interpret), highest=dtype == F32,
               packed=segment_ids is not None)
    # Padded tail: segment id -1, a document no real query sees (padded keys are masked by
    # j < T anyway).
    seg = None if segment_ids is None else jnp.pad(
        segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t)), constant_values=-1)
    o = _flash(pad(q), pad(k), pad(v), seg, cfg)
    return o[:, :t, :, :dh]

