"""NSA's selected-block attention in Pallas for the GPU (Triton lowering), forward and backward.

Shape legend (the kernel layout; selected.py pads and reshapes to it):
  B batch, T queries (= keys), Tp keys padded (>= T + l', a multiple of l'), H key/value heads,
  Gp query heads of one key/value head padded to a power of two >= 16 (Triton's smallest dot),
  Kp / Vp head dims padded to powers of two >= 16, n selected blocks per query, l' block size,
  NT = Tp / l' aligned key tiles, P (query, tile) pairs.
  q [B, T, H, Gp, Kp]; k [B, Tp, H, Kp]; v [B, Tp, H, Vp]; starts [B, T, H, n] int32;
  o, do [B, T, H, Gp, Vp]; lse, delta [B, T, H, Gp] float32.

Query t of key/value head h attends to the keys of its n selected blocks: block i covers keys
starts[t, h, i] .. starts[t, h, i] + l' - 1 (the document-relative block's absolute first key;
-1: unused), of which those <= t are visible (a block never reaches before t's document:
selection only names blocks of t's document). NSA's kernel (Yuan et al. 2025, Sec. 3.4,
Figure 3): one program per (query, GQA group) loads the group's query heads together, so the
G heads share each block's key/value load, and walks the n blocks with an online softmax
(FlashAttention-2, Algorithm 1); scores, running max/sum and the accumulator in float32.

Backward (FlashAttention-2, Algorithm 2, no atomics):
  delta = rowsum(dO * O) (XLA); P = exp(S - lse); dS = P * (dO V^T - delta)
  dq kernel, grid (B * H, T): per query, dQ = scale * sum over its blocks of dS K.
  dkv kernel, grid (B * H, NT): per aligned key tile, the (query, block start) pairs whose
    block overlaps the tile (selected.py's tile_pairs: sorted by tile, offsets[NT + 1]);
    dV += P^T dO, dK += scale * dS^T Q over them. A block that does not start on a tile
    boundary (packed documents: blocks count from each document's first token) overlaps two
    tiles and is listed under both, each masking the keys outside it; so every program owns
    its output tile and no two write the same keys.
  The pairs of the first tile include every query (the first block is always selected), so
  that program does T pair steps where an average one does ~n T / NT: the backward's critical
  path, as in flash-linear-attention's NSA backward, which scans all queries per block.

Written for Pallas' Triton lowering: scalars (block starts, pair entries, offsets) are read
from refs at dynamic indices, blocks are pointer slices pl.ds(start, l'). Runs on CPU with
interpret=True (tests/test_op_nsa.py); lowered for cuda in tests/test_lowering.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.nsa.dots import dot, dot_nt, dot_tn

F32 = jnp.float32
# Finite "minus infinity" (flash.py's): exp(MASK - m) is 0 for any real m, no inf - inf.
MASK = -0.7 * float(jnp.finfo(F32).max)


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static settings of one call (hashable: a custom_vjp nondiff argument)."""

    block_size: int       # l'
    block_count: int      # n
    tile: int             # TS: keys loaded per block (>= l', a power of two) and per dkv tile
    scale: float
    interpret: bool
    highest: bool         # float32 operands: full-precision dots (not TF32)


def _block_keys(starts_ref, i, t, cfg):
    """Block i of query t: (first key clamped to >= 0, [TS] bool visible keys: the block's
    l' keys of the TS loaded, those at or before t)."""
    first = starts_ref[i]
    lo = jnp.maximum(first, 0)
    key = lo + jnp.arange(cfg.tile, dtype=jnp.int32)
    return lo, (first >= 0) & (key < lo + cfg.block_size) & (key <= t)


def _fwd_kernel(q_ref, k_ref, v_ref, starts_ref, o_ref, lse_ref, *, cfg: Cfg):
    # q_ref [Gp, Kp]; k_ref [Tp, Kp], v_ref [Tp, Vp]; starts_ref [n]; o_ref [Gp, Vp]; lse [Gp].
    t = pl.program_id(1)
    q = q_ref[...]
    bs = cfg.tile

    def body(i, carry):
        acc, m, row_sum = carry
        lo, vis = _block_keys(starts_ref, i, t, cfg)
        k = k_ref[pl.ds(lo, bs), :]
        v = v_ref[pl.ds(lo, bs), :]
        s = jnp.where(vis[None, :], dot_nt(q, k, cfg.highest) * cfg.scale, MASK)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)          # rescales what was summed under the old max
        p = jnp.where(vis[None, :], jnp.exp(s - m_new[:, None]), 0.0)
        row_sum = alpha * row_sum + p.sum(axis=-1)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v, cfg.highest)
        return acc, m_new, row_sum

    gp = q.shape[0]
    init = (jnp.zeros((gp, o_ref.shape[-1]), F32), jnp.full((gp,), MASK, F32),
            jnp.zeros((gp,), F32))
    acc, m, row_sum = lax.fori_loop(0, cfg.block_count, body, init)
    # Every query sees its own key (its current block is always selected); a padding query
    # of a packed row may see none: 0 output, and lse stays finite.
    row_sum = jnp.where(row_sum == 0.0, 1.0, row_sum)
    o_ref[...] = (acc / row_sum[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(row_sum)


def _dq_kernel(q_ref, k_ref, v_ref, starts_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: Cfg):
    # q_ref, dq_ref [Gp, Kp]; k_ref [Tp, Kp]; v_ref [Tp, Vp]; starts_ref [n]; do_ref [Gp, Vp];
    # lse_ref, delta_ref [Gp].
    t = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    bs = cfg.tile

    def body(i, dq):
        lo, vis = _block_keys(starts_ref, i, t, cfg)
        k = k_ref[pl.ds(lo, bs), :]
        v = v_ref[pl.ds(lo, bs), :]
        s = dot_nt(q, k, cfg.highest) * cfg.scale
        p = jnp.where(vis[None, :], jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (dot_nt(do, v, cfg.highest) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k, cfg.highest)

    dq = lax.fori_loop(0, cfg.block_count, body, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, offsets_ref, pair_t_ref,
                pair_start_ref, dk_ref, dv_ref, *, cfg: Cfg):
    # q_ref [T, Gp, Kp], do_ref [T, Gp, Vp], lse_ref / delta_ref [T, Gp] (the row's queries of
    # this key/value head); k_ref, dk_ref [l', Kp], v_ref, dv_ref [l', Vp] (key tile j);
    # offsets_ref [NT + 1]; pair_t_ref / pair_start_ref [P] (query, block's first key).
    j = pl.program_id(1)
    bs = cfg.block_size
    k, v = k_ref[...], v_ref[...]
    key = j * cfg.tile + jnp.arange(cfg.tile, dtype=jnp.int32)

    def body(e, carry):
        dk, dv = carry
        t = pair_t_ref[e]
        first = pair_start_ref[e]
        q, do = q_ref[t], do_ref[t]
        vis = (key >= first) & (key < first + bs) & (key <= t)
        s = dot_nt(q, k, cfg.highest) * cfg.scale
        p = jnp.where(vis[None, :], jnp.exp(s - lse_ref[t][:, None]), 0.0)
        dv = dv + dot_tn(p.astype(do.dtype), do, cfg.highest)
        ds = p * (dot_nt(do, v, cfg.highest) - delta_ref[t][:, None])
        dk = dk + dot_tn(ds.astype(q.dtype), q, cfg.highest)
        return dk, dv

    init = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
    dk, dv = lax.fori_loop(offsets_ref[j], offsets_ref[j + 1], body, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg: Cfg, width: int, name: str):
    params = None
    if not cfg.interpret:
        # Imported here: the Triton-specific module is only needed when compiling for a GPU.
        from jax.experimental.pallas import triton as pltriton
        params = pltriton.CompilerParams(num_warps=4 if width <= 64 else 8, num_stages=2)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, compiler_params=params,
                          interpret=cfg.interpret, name=name)


def _query_specs(h, gp, kp, vp, n):
    """BlockSpecs of the per-query programs, grid (B * H, T): program (bh, t) serves batch
    bh // H, key/value head bh % H, query t."""
    at = lambda bh, t: (bh // h, t, bh % h, 0, 0)  # noqa: E731
    row = lambda bh, t: (bh // h, t, bh % h, 0)    # noqa: E731
    return dict(
        q=pl.BlockSpec((None, None, None, gp, kp), at),
        o=pl.BlockSpec((None, None, None, gp, vp), at),
        starts=pl.BlockSpec((None, None, None, n), row),
        lse=pl.BlockSpec((None, None, None, gp), row),
    )


def _kv_spec(h, tp, d):
    return pl.BlockSpec((None, tp, None, d), lambda bh, t: (bh // h, 0, bh % h, 0))


def forward(q, k, v, starts, cfg: Cfg):
    """(o [B, T, H, Gp, Vp] float32, lse [B, T, H, Gp] float32)."""
    b, t, h, gp, kp = q.shape
    tp, vp = k.shape[1], v.shape[-1]
    spec = _query_specs(h, gp, kp, vp, starts.shape[-1])
    return _call(functools.partial(_fwd_kernel, cfg=cfg), (b * h, t),
                 [spec["q"], _kv_spec(h, tp, kp), _kv_spec(h, tp, vp), spec["starts"]],
                 [spec["o"], spec["lse"]],
                 [jax.ShapeDtypeStruct((b, t, h, gp, vp), F32),
                  jax.ShapeDtypeStruct((b, t, h, gp), F32)], cfg, max(kp, vp),
                 "nsa_selected_fwd")(q, k, v, starts)


def backward(q, k, v, starts, o, lse, do, pairs, cfg: Cfg):
    """(dq, dk, dv) in the kernel layout; pairs = (offsets [B, H, NT + 1], pair_t [B, H, P],
    pair_start [B, H, P]) from selected.tile_pairs."""
    b, t, h, gp, kp = q.shape
    tp, vp = k.shape[1], v.shape[-1]
    bs = cfg.tile
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1)           # [B, T, H, Gp]
    do = do.astype(q.dtype)
    spec = _query_specs(h, gp, kp, vp, starts.shape[-1])
    dq = _call(functools.partial(_dq_kernel, cfg=cfg), (b * h, t),
               [spec["q"], _kv_spec(h, tp, kp), _kv_spec(h, tp, vp), spec["starts"],
                spec["o"], spec["lse"], spec["lse"]], spec["q"],
               jax.ShapeDtypeStruct(q.shape, q.dtype), cfg, max(kp, vp),
               "nsa_selected_dq")(q, k, v, starts, do, lse, delta)

    offsets, pair_t, pair_start = pairs
    whole = lambda *dims: pl.BlockSpec(  # noqa: E731
        (None, t, None, *dims), lambda bh, j: (bh // h, 0, bh % h) + (0,) * len(dims))
    tile = lambda d: pl.BlockSpec((None, bs, None, d), lambda bh, j: (bh // h, j, bh % h, 0))  # noqa: E731
    per_head = lambda n: pl.BlockSpec((None, None, n), lambda bh, j: (bh // h, bh % h, 0))  # noqa: E731
    dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg), (b * h, tp // bs),
                   [whole(gp, kp), tile(kp), tile(vp), whole(gp, vp), whole(gp), whole(gp),
                    per_head(offsets.shape[-1]), per_head(pair_t.shape[-1]),
                    per_head(pair_t.shape[-1])],
                   [tile(kp), tile(vp)],
                   [jax.ShapeDtypeStruct(k.shape, k.dtype),
                    jax.ShapeDtypeStruct(v.shape, v.dtype)], cfg, max(kp, vp),
                   "nsa_selected_dkv")(q, k, v, do, lse, delta, offsets, pair_t, pair_start)
    return dq, dk, dv
