"""NSA's selected-block branch through a Pallas kernel (GPU: triton.py, TPU: mosaic.py): the
blocks' first keys from select_blocks' choice, the layout the kernels take, the (query, key
tile) pairs of the backward, and the custom_vjp that ties them together.

Shape legend: B batch, T queries (= keys), H key/value heads, HQ query heads (G = HQ / H), K
key dim, V value dim, n selected blocks, l' block size, TS key tile (aligned, >= l'), NT key
tiles of the padded row, P = 2 n T (query, tile) pairs.

The kernels compute o_slc of eq. 5 (arXiv:2502.11089): softmax attention of each query over
the keys of its n selected blocks that are at or before it. They take the block choice as
data (`starts`, the absolute first key of each block, -1 unused), so every backend reads the
blocks selection.select_blocks picked (ties included), and no kernel recomputes a selection.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def block_starts(blocks: jax.Array, doc_start: jax.Array, block_size: int) -> jax.Array:
    """blocks [B, T, H, n] document-relative block numbers (-1 unused), doc_start [B, T] the
    key index where each query's document starts -> [B, T, H, n] int32 absolute first keys
    (-1 unused)."""
    first = doc_start[:, :, None, None] + blocks * block_size
    return jnp.where(blocks >= 0, first, -1).astype(jnp.int32)


def tile_pairs(starts: jax.Array, block_size: int, tile: int, n_tiles: int):
    """The backward's work list: for each aligned key tile (keys [j TS, (j + 1) TS)), the
    (query, block first key) pairs whose block overlaps it.

    starts [B, T, H, n] -> (offsets [B, H, NT + 1] int32: the pairs of tile j are entries
    offsets[j] .. offsets[j + 1] - 1; pair_t [B, H, P] query index; pair_start [B, H, P]
    block first key). A block of l' <= TS keys overlaps one tile, or two when it does not
    start on a tile boundary (packed documents). Unused entries sort after the last tile.
    """
    b, t, h, n = starts.shape
    valid = starts >= 0
    first_tile = jnp.where(valid, starts // tile, n_tiles)
    last_tile = (starts + block_size - 1) // tile
    second = jnp.where(valid & (last_tile != first_tile), last_tile, n_tiles)
    tiles = jnp.concatenate([first_tile, second], axis=-1)             # [B, T, H, 2n]
    firsts = jnp.concatenate([starts, starts], axis=-1)
    queries = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None, :, None, None],
                               tiles.shape)
    flat = lambda x: jnp.moveaxis(x, 2, 1).reshape(b, h, t * 2 * n)  # noqa: E731
    tiles, pair_t, pair_start = jax.lax.sort((flat(tiles), flat(queries), flat(firsts)),
                                             dimension=-1, num_keys=1, is_stable=True)
    counts = jnp.zeros((b, h, n_tiles + 1), jnp.int32).at[
        jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None], tiles].add(1)
    offsets = jnp.concatenate([jnp.zeros((b, h, 1), jnp.int32),
                               jnp.cumsum(counts[..., :n_tiles], axis=-1)], axis=-1)
    return offsets.astype(jnp.int32), pair_t, pair_start.astype(jnp.int32)


def _driver(name: str):
    if name == "gpu":
        from pallas_kernels.nsa import triton
        return triton
    from pallas_kernels.nsa import mosaic
    return mosaic


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _selected(q, k, v, starts, cfg, driver: str):
    return _driver(driver).forward(q, k, v, starts, cfg)[0]


def _selected_fwd(q, k, v, starts, cfg, driver):
    o, lse = _driver(driver).forward(q, k, v, starts, cfg)
    return o, (q, k, v, starts, o, lse)


def _selected_bwd(cfg, driver, res, do):
    q, k, v, starts, o, lse = res
    n_tiles = k.shape[1] // cfg.tile
    pairs = tile_pairs(starts, cfg.block_size, cfg.tile, n_tiles)
    dq, dk, dv = _driver(driver).backward(q, k, v, starts, o, lse, do, pairs, cfg)
    return dq, dk, dv, None          # starts: integers, no cotangent


_selected.defvjp(_selected_fwd, _selected_bwd)


def _pow2(x: int, least: int = 16) -> int:
    return max(least, 1 << (x - 1).bit_length())


def selected_attention(q, k, v, starts, *, block_size: int, scale: float, driver: str,
                       interpret: bool):
    """Attention of each query over its selected blocks' keys at or before it.

    Args:
        q: [B, T, HQ, K] (queries = keys: no cache offset).
        k, v: [B, T, H, K] / [B, T, H, V].
        starts: [B, T, H, n] int32 absolute first key of each selected block (-1 unused).
        block_size: l'.
        scale: score scale.
        driver: "gpu" (Triton) or "tpu" (Mosaic).
        interpret: run in the Pallas interpreter.

    Returns:
        [B, T, HQ, V] float32. Differentiable in q, k, v.
    """
    b, t, hq, kd = q.shape
    h, vd = k.shape[2], v.shape[-1]
    g = hq // h
    if driver == "gpu":
        # Triton: power-of-two tiles, dots of at least 16 x 16.
        from pallas_kernels.nsa.triton import Cfg
        gp, kp, vp, tile = _pow2(g), _pow2(kd), _pow2(vd), _pow2(block_size)
    else:
        # Mosaic: query heads padded to whole sublanes, key tiles of whole bf16 sublane tiles.
        from pallas_kernels.nsa.mosaic import Cfg
        gp, kp, vp, tile = -(-g // 8) * 8, kd, vd, -(-block_size // 16) * 16
    # Keys padded so that every block's keys (first key <= T - 1, at most `tile` loaded) and
    # every tile are in range; padded keys are never visible (key <= t < T).
    tp = -(-(t + tile) // tile) * tile
    cfg = Cfg(block_size=block_size, block_count=starts.shape[-1], tile=tile, scale=scale,
              interpret=bool(interpret), highest=q.dtype == F32)
    qg = jnp.pad(q.reshape(b, t, h, g, kd), ((0, 0),) * 3 + ((0, gp - g), (0, kp - kd)))
    kk = jnp.pad(k.astype(q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, kp - kd)))
    vv = jnp.pad(v.astype(q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, vp - vd)))
    o = _selected(qg, kk, vv, starts.astype(jnp.int32), cfg, driver)   # [B, T, H, Gp, Vp]
    return o[:, :, :, :g, :vd].reshape(b, t, hq, vd)


def nsa_pallas(q, k, v, k_cmp, v_cmp, gates, *, t, seg_q, slots, geometry, scale: float,
               query_chunk: int, segment_ids, driver: str, interpret: bool):
    """nsa_reference's signature and results for queries = keys, with the selected branch in
    this module's kernel and the window branch in the platform's attention kernel (flash on a
    GPU, splash on a TPU: keys t - w + 1 .. t of t's document is their sliding window with
    segment ids). The compressed branch and the selection run in XLA query chunk by query
    chunk (xla.py), as in the gathered form: their T x C scores are the part no kernel here
    takes on."""
    from pallas_kernels.attention import attention
    from pallas_kernels.nsa.selection import mix_branches
    from pallas_kernels.nsa.xla import compressed_and_selection, map_query_chunks

    tk = k.shape[1]
    step = lambda q_c, t_c, seg_c: compressed_and_selection(  # noqa: E731
        q_c, t_c, seg_c, k_cmp, v_cmp, slots, geometry, scale, tk)
    o_cmp, blocks = map_query_chunks(step, (q, t, seg_q), query_chunk)
    doc_start = jnp.take_along_axis(slots.doc_start, t, axis=1)
    starts = block_starts(blocks, doc_start, geometry.block_size)
    o_slc = selected_attention(q, k, v, starts, block_size=geometry.block_size, scale=scale,
                               driver=driver, interpret=interpret)
    # The attention kernels take one head dim: zero columns pad K or V to the larger (scores
    # and outputs unchanged; the padded output columns are dropped).
    kd, vd = k.shape[-1], v.shape[-1]
    width = max(kd, vd)
    pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])  # noqa: E731
    o_swa = attention(pad(q), pad(k), pad(v), window=geometry.window, scale=scale,
                      segment_ids=segment_ids,
                      backend="flash" if driver == "gpu" else "splash")[..., :vd].astype(F32)
    return mix_branches(gates, o_cmp, o_slc, o_swa), blocks
