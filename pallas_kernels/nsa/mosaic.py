"""NSA's selected-block attention in Pallas for the TPU (Mosaic), forward and backward: a
kernel of its own that fetches each query's blocks from HBM by DMA.

Shape legend (canonical layout in, as triton.py's; this module transposes to head-major):
  B batch, T queries, Tq queries padded to BQ (queries per program), Tp keys padded (a multiple
  of TS, >= T + TS), H key/value heads, Gp query heads of one key/value head padded to whole
  sublanes (8), K / V head dims, n selected blocks, l' block size, TS key tile (l' rounded up
  to 16 rows: a whole bf16 sublane tile, so every tile DMA is aligned), NT = Tp / TS, CH pair
  entries fetched per DMA, P pairs.
  In: q [B, T, H, Gp, K]; k [B, Tp, H, K]; v [B, Tp, H, V]; starts [B, T, H, n] int32.
  Kernels: q [B, H, Tq, Gp, K]; k, v [B, H, Tp, K|V] left in HBM; starts
  [B, H, Tq / BQ, 1, BQ * n] in SMEM blocks; o [B, H, Tq, Gp, V] float32; lse, delta
  [B, H, Tq, Gp, 1] float32.

Why DMA: a query's n blocks are anywhere in its document, and the next query's are elsewhere,
so no BlockSpec pipeline can name them without a per-query scalar prefetch table (n x T
entries: 4 MiB at T = 64k, n = 16, beyond SMEM). Instead each program takes BQ queries, reads
their block starts from an SMEM block, and copies each block's one or two aligned key tiles
(a block of a packed document need not start on a tile boundary) into VMEM, attending with
an online softmax in float32 (FlashAttention-2, Algorithm 1; NSA's kernel, Yuan et al. 2025
Sec. 3.4, loads the G heads of a group together as here). The copies are synchronous: the
tile DMA latency is not hidden behind the previous tile's dots. That is the first thing to
change once a TPU profile shows it (a two-slot buffer over the flattened (query, block) loop).

Backward, no atomics, as triton.py: dq per query over the same tiles; dk / dv per key tile
over the (query, block first key) pairs that overlap it (selected.tile_pairs), their query
rows (q, dO, lse, delta) fetched by DMA, pair entries CH at a time into SMEM. Scores are
formed transposed there (keys x heads, k q^T), so every product is a plain or NT matmul.

Runs on CPU in the TPU interpreter (pltpu.InterpretParams; tests/test_op_nsa.py) and is lowered
for the TPU in tests/test_lowering.py; it has not run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.nsa.dots import dot, dot_nt

F32 = jnp.float32
MASK = -0.7 * float(jnp.finfo(F32).max)      # finite "minus infinity", as triton.py
BQ = 16          # queries per program
CH = 128         # pair entries per SMEM fetch


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static settings of one call (hashable: a custom_vjp nondiff argument)."""

    block_size: int       # l'
    block_count: int      # n
    tile: int             # TS: aligned key tile (>= l')
    scale: float
    interpret: bool
    highest: bool         # float32 operands: full-precision dots


def _pltpu():
    from jax.experimental.pallas import tpu as pltpu
    return pltpu


def _tiles_of_block(first, cfg, visit):
    """Calls visit(tile) for the one or two aligned key tiles block `first` overlaps."""
    a = first // cfg.tile
    z = (first + cfg.block_size - 1) // cfg.tile
    visit(a)

    @pl.when(z != a)
    def _():
        visit(z)


def _visible(tile, first, t, cfg, shape, axis):
    """Keys of `tile` in the block starting at `first`, at or before query t: bool `shape`,
    the keys along `axis`."""
    key = tile * cfg.tile + lax.broadcasted_iota(jnp.int32, shape, axis)
    return (key >= first) & (key < first + cfg.block_size) & (key <= t)


def _fetch(src, dst, sem_ref, slot):
    return _pltpu().make_async_copy(src, dst, sem_ref.at[slot])


def _wait_all(copies):
    for c in copies:
        c.start()
    for c in copies:
        c.wait()


def _fetch_tile(k_hbm, v_hbm, k_buf, v_buf, sem, b, h, tile, ts):
    """Copies key / value tile `tile` of row b, head h from HBM into k_buf / v_buf."""
    rows = pl.ds(pl.multiple_of(tile * ts, ts), ts)
    _wait_all((_fetch(k_hbm.at[b, h, rows], k_buf, sem, 0),
               _fetch(v_hbm.at[b, h, rows], v_buf, sem, 1)))


def _for_each_block(starts_ref, i, cfg, attend):
    """attend(tile, first) for each aligned key tile of each selected block of query i of the
    program (starts_ref [1, BQ * n]; unused blocks, -1, skipped)."""
    n = cfg.block_count

    def per_block(s, _):
        first = starts_ref[0, i * n + s]

        @pl.when(first >= 0)
        def _():
            _tiles_of_block(first, cfg, lambda tile: attend(tile, first))
        return 0

    lax.fori_loop(0, n, per_block, 0)


def _fwd_kernel(starts_ref, q_ref, k_hbm, v_hbm, o_ref, lse_ref, k_buf, v_buf, acc_ref, m_ref,
                sum_ref, sem, *, cfg: Cfg):
    # starts_ref [1, BQ * n] SMEM; q_ref [BQ, Gp, K]; k_hbm / v_hbm [B, H, Tp, K|V]; o_ref
    # [BQ, Gp, V]; lse_ref [BQ, Gp, 1]; k_buf [TS, K], v_buf [TS, V]; acc [Gp, V];
    # m, sum [Gp, 1].
    b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ts = cfg.tile

    def per_query(i, _):
        t = qb * BQ + i
        q = q_ref[i]
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
        m_ref[...] = jnp.full(m_ref.shape, MASK, F32)
        sum_ref[...] = jnp.zeros(sum_ref.shape, F32)

        def attend(tile, first):
            _fetch_tile(k_hbm, v_hbm, k_buf, v_buf, sem, b, h, tile, ts)
            vis = _visible(tile, first, t, cfg, (q.shape[0], ts), 1)
            s = jnp.where(vis, dot_nt(q, k_buf[...], cfg.highest) * cfg.scale, MASK)
            m = m_ref[...]
            m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
            sum_ref[...] = alpha * sum_ref[...] + p.sum(axis=-1, keepdims=True)
            acc_ref[...] = (alpha * acc_ref[...]
                            + dot(p.astype(v_buf.dtype), v_buf[...], cfg.highest))
            m_ref[...] = m_new

        _for_each_block(starts_ref, i, cfg, attend)
        total = sum_ref[...]
        total = jnp.where(total == 0.0, 1.0, total)        # padded queries see no key
        o_ref[i] = acc_ref[...] / total
        lse_ref[i] = m_ref[...] + jnp.log(total)
        return 0

    lax.fori_loop(0, BQ, per_query, 0)


def _dq_kernel(starts_ref, q_ref, do_ref, lse_ref, delta_ref, k_hbm, v_hbm, dq_ref, k_buf,
               v_buf, dq_acc, sem, *, cfg: Cfg):
    # As _fwd_kernel; do_ref [BQ, Gp, V]; lse_ref, delta_ref [BQ, Gp, 1]; dq_ref [BQ, Gp, K].
    b, h, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ts = cfg.tile

    def per_query(i, _):
        t = qb * BQ + i
        q, do = q_ref[i], do_ref[i]
        lse, delta = lse_ref[i], delta_ref[i]
        dq_acc[...] = jnp.zeros(dq_acc.shape, F32)

        def attend(tile, first):
            _fetch_tile(k_hbm, v_hbm, k_buf, v_buf, sem, b, h, tile, ts)
            vis = _visible(tile, first, t, cfg, (q.shape[0], ts), 1)
            s = dot_nt(q, k_buf[...], cfg.highest) * cfg.scale
            p = jnp.where(vis, jnp.exp(s - lse), 0.0)
            ds = p * (dot_nt(do, v_buf[...], cfg.highest) - delta)
            dq_acc[...] += dot(ds.astype(k_buf.dtype), k_buf[...], cfg.highest)

        _for_each_block(starts_ref, i, cfg, attend)
        dq_ref[i] = (dq_acc[...] * cfg.scale).astype(dq_ref.dtype)
        return 0

    lax.fori_loop(0, BQ, per_query, 0)


def _dkv_kernel(bounds_ref, k_ref, v_ref, q_hbm, do_hbm, lse_hbm, delta_hbm, pair_t_hbm,
                pair_start_hbm, dk_ref, dv_ref, q_buf, do_buf, lse_buf, delta_buf, t_buf,
                first_buf, dk_acc, dv_acc, sem, *, cfg: Cfg):
    # bounds_ref [1, 2] SMEM (this tile's pair entries lo, hi); k_ref, dk_ref [TS, K], v_ref,
    # dv_ref [TS, V] (key tile j); q_hbm [B, H, Tq, Gp, K], do_hbm [.., Gp, V], lse_hbm /
    # delta_hbm [B, H, Tq, 1, Gp]; pair_t_hbm / pair_start_hbm [B, H, P + CH]; buffers for one
    # query row each; t_buf / first_buf [CH] SMEM.
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, F32)
    lo, hi = bounds_ref[0, 0], bounds_ref[0, 1]

    def per_pair(e, _):
        t, first = t_buf[e], first_buf[e]
        _wait_all((_fetch(q_hbm.at[b, h, t], q_buf, sem, 0),
                   _fetch(do_hbm.at[b, h, t], do_buf, sem, 1),
                   _fetch(lse_hbm.at[b, h, t], lse_buf, sem, 2),
                   _fetch(delta_hbm.at[b, h, t], delta_buf, sem, 3)))
        q, do = q_buf[...], do_buf[...]
        # Transposed scores [TS, Gp]: key rows, head columns.
        vis = _visible(j, first, t, cfg, (k.shape[0], q.shape[0]), 0)
        s_t = dot_nt(k, q, cfg.highest) * cfg.scale
        p_t = jnp.where(vis, jnp.exp(s_t - lse_buf[...]), 0.0)
        dv_acc[...] += dot(p_t.astype(do.dtype), do, cfg.highest)
        ds_t = p_t * (dot_nt(v, do, cfg.highest) - delta_buf[...])
        dk_acc[...] += dot(ds_t.astype(q.dtype), q, cfg.highest)
        return 0

    def per_chunk(c, _):
        base = lo + c * CH
        _wait_all((_fetch(pair_t_hbm.at[b, h, pl.ds(base, CH)], t_buf, sem, 0),
                   _fetch(pair_start_hbm.at[b, h, pl.ds(base, CH)], first_buf, sem, 1)))
        lax.fori_loop(0, jnp.minimum(CH, hi - base), per_pair, 0)
        return 0

    lax.fori_loop(0, (hi - lo + CH - 1) // CH, per_chunk, 0)
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, cfg: Cfg, name: str):
    pltpu = _pltpu()
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * 3),
        # Uninitialised outputs read as NaN in the interpreter: an unwritten element shows up.
        interpret=pltpu.InterpretParams() if cfg.interpret else False, name=name)


def _heads_first(x):
    return jnp.moveaxis(x, 2, 1)


def _padded_queries(x, tq):
    return jnp.pad(x, [(0, 0), (0, tq - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _starts_blocks(starts, tq):
    """starts [B, T, H, n] -> [B, H, Tq / BQ, 1, BQ * n] (padded queries: -1, no block). The
    unit axis makes each program's SMEM block span the array's last two dimensions, as
    Mosaic asks of a block that is not a whole number of (8, 128) tiles."""
    b, t, h, n = starts.shape
    s = jnp.pad(starts, [(0, 0), (0, tq - t), (0, 0), (0, 0)], constant_values=-1)
    return _heads_first(s).reshape(b, h, tq // BQ, 1, BQ * n)


def _query_specs(gp, kd, vd, n):
    pltpu = _pltpu()
    at = lambda b, h, i: (b, h, i, 0, 0)  # noqa: E731
    return dict(
        starts=pl.BlockSpec((None, None, None, 1, BQ * n), lambda b, h, i: (b, h, i, 0, 0),
                            memory_space=pltpu.SMEM),
        q=pl.BlockSpec((None, None, BQ, gp, kd), at),
        o=pl.BlockSpec((None, None, BQ, gp, vd), at),
        row=pl.BlockSpec((None, None, BQ, gp, 1), at),
        hbm=pl.BlockSpec(memory_space=pl.ANY),
    )


def forward(q, k, v, starts, cfg: Cfg):
    """(o [B, T, H, Gp, V] float32, lse [B, H, Tq, Gp, 1] float32) from the canonical layout."""
    pltpu = _pltpu()
    b, t, h, gp, kd = q.shape
    vd = v.shape[-1]
    tq = -(-t // BQ) * BQ
    n = cfg.block_count
    spec = _query_specs(gp, kd, vd, n)
    scratch = [pltpu.VMEM((cfg.tile, kd), k.dtype), pltpu.VMEM((cfg.tile, vd), v.dtype),
               pltpu.VMEM((gp, vd), F32), pltpu.VMEM((gp, 1), F32), pltpu.VMEM((gp, 1), F32),
               pltpu.SemaphoreType.DMA((2,))]
    o, lse = _call(functools.partial(_fwd_kernel, cfg=cfg), (b, h, tq // BQ),
                   [spec["starts"], spec["q"], spec["hbm"], spec["hbm"]],
                   [spec["o"], spec["row"]],
                   [jax.ShapeDtypeStruct((b, h, tq, gp, vd), F32),
                    jax.ShapeDtypeStruct((b, h, tq, gp, 1), F32)], scratch, cfg,
                   "nsa_selected_fwd")(
        _starts_blocks(starts, tq), _heads_first(_padded_queries(q, tq)), _heads_first(k),
        _heads_first(v))
    return jnp.moveaxis(o, 1, 2)[:, :t], lse


def backward(q, k, v, starts, o, lse, do, pairs, cfg: Cfg):
    """(dq, dk, dv) in the canonical layout; pairs from selected.tile_pairs."""
    pltpu = _pltpu()
    b, t, h, gp, kd = q.shape
    tp, vd = k.shape[1], v.shape[-1]
    tq = lse.shape[2]
    n = cfg.block_count
    delta = jnp.sum(o.astype(F32) * do.astype(F32), axis=-1)             # [B, T, H, Gp]
    delta = _heads_first(_padded_queries(delta, tq))[..., None]         # [B, H, Tq, Gp, 1]
    qh = _heads_first(_padded_queries(q, tq))
    doh = _heads_first(_padded_queries(do.astype(q.dtype), tq))
    kh, vh = _heads_first(k), _heads_first(v)
    spec = _query_specs(gp, kd, vd, n)
    scratch = [pltpu.VMEM((cfg.tile, kd), k.dtype), pltpu.VMEM((cfg.tile, vd), v.dtype),
               pltpu.VMEM((gp, kd), F32), pltpu.SemaphoreType.DMA((2,))]
    dq = _call(functools.partial(_dq_kernel, cfg=cfg), (b, h, tq // BQ),
               [spec["starts"], spec["q"], spec["o"], spec["row"], spec["row"], spec["hbm"],
                spec["hbm"]], spec["q"], jax.ShapeDtypeStruct(qh.shape, q.dtype), scratch,
               cfg, "nsa_selected_dq")(_starts_blocks(starts, tq), qh, doh, lse, delta, kh, vh)

    offsets, pair_t, pair_start = pairs
    nt = tp // cfg.tile
    bounds = jnp.stack([offsets[..., :-1], offsets[..., 1:]], axis=-1)[..., None, :]
    # bounds [B, H, NT, 1, 2]: the unit axis as in _starts_blocks
    pad_pairs = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, CH)])  # noqa: E731
    tile = lambda d: pl.BlockSpec((None, None, cfg.tile, d), lambda b, h, j: (b, h, j, 0))  # noqa: E731
    row_t = lambda x: jnp.swapaxes(x, -1, -2)            # [.., Gp, 1] -> [.., 1, Gp]  # noqa: E731
    scratch = [pltpu.VMEM((gp, kd), q.dtype), pltpu.VMEM((gp, vd), q.dtype),
               pltpu.VMEM((1, gp), F32), pltpu.VMEM((1, gp), F32),
               pltpu.SMEM((CH,), jnp.int32), pltpu.SMEM((CH,), jnp.int32),
               pltpu.VMEM((cfg.tile, kd), F32), pltpu.VMEM((cfg.tile, vd), F32),
               pltpu.SemaphoreType.DMA((4,))]
    dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg), (b, h, nt),
                   [pl.BlockSpec((None, None, None, 1, 2), lambda b, h, j: (b, h, j, 0, 0),
                                 memory_space=pltpu.SMEM),
                    tile(kd), tile(vd), *[spec["hbm"]] * 6],
                   [tile(kd), tile(vd)],
                   [jax.ShapeDtypeStruct(kh.shape, k.dtype),
                    jax.ShapeDtypeStruct(vh.shape, v.dtype)], scratch, cfg,
                   "nsa_selected_dkv")(bounds, kh, vh, qh, doh, row_t(lse), row_t(delta),
                                       pad_pairs(pair_t), pad_pairs(pair_start))
    back = lambda x: jnp.moveaxis(x, 1, 2)  # noqa: E731
    return back(dq)[:, :t], back(dk), back(dv)
