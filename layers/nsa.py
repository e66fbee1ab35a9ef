"""Native Sparse Attention (NSA) token mixer: compressed, selected and sliding-window branches.

Shape legend:
  B batch, T new tokens, D model width, HQ query heads, H key/value heads (GQA: G = HQ / H
  query heads share one block selection), K head dim, S cache slots (max_len), C compressed
  tokens, l compression block, d compression stride.

Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse
Attention" (arXiv:2502.11089): q, k, v projections with RoPE (in-document positions in packed
rows, as every attention layer here); each query attends through three branches (the op,
pallas_kernels/nsa) mixed by per-head sigmoid gates from the input (eq. 5):
  * compressed: tokens phi(k_{id+1 .. id+l}) every d keys (eq. 7). phi is the paper's MLP with
    an intra-block position encoding, here added to the block's mean: phi(x) = mean(x) +
    MLP(x + pos) with the MLP's last layer starting at the residual-branch scale, so training
    starts from flash-linear-attention's mean pooling and learns the rest;
  * selected: the n blocks of l' keys ranked by the compressed attention (eqs. 8-11);
  * window: the last w keys.

Cache: the full KV cache [B, S, H, K] (selection and the window read it; layers/attention.py's
KVCache) and the compressed tokens [B, C, H, K], each written once its l keys are in (every d
tokens). A decode step reads C + n l' + w keys, not S.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from layers.attention import Attention, AttentionArgs, KVCache, write_cache
from layers.cache import CacheBytes, refuse_segments_with_cache
from layers.projections import dense, output_projection, output_std, projection
from layers.rope import apply_rope
from pallas_kernels.backends import NSABackend
from pallas_kernels.context_parallel import SEQUENCE, run_sharded, sequence_shards, whole_rows
from pallas_kernels.nsa import Geometry, compression_slots, n_slots, nsa, slot_windows
from pallas_kernels.nsa.selection import geometry_errors
from pallas_kernels.segments import zero_padding


@dataclasses.dataclass(frozen=True)
class NSAArgs:
    n_heads: int | None = None      # HQ; None: model.n_heads
    n_kv_heads: int | None = None   # H; None: model.n_kv_heads
    cmp_block: int = 32             # l: keys per compressed token (the paper's 32)
    cmp_stride: int = 16            # d: a compressed token every d keys (16)
    block_size: int = 64            # l': keys per selected block (64)
    block_count: int = 16           # n: blocks per query, the first and 2 local included (16)
    window: int = 512               # w: the sliding-window branch (512)
    compress: Literal["mlp", "mean"] = "mlp"   # phi above, or flash-linear-attention's mean
    rope: bool = True
    query_chunk: int = 128          # queries per step of the gathered form
    backend: NSABackend = "auto"    # pallas_kernels/backends.py


@struct.dataclass
class NSACache(CacheBytes):
    """kv: the full KV cache (layers/attention.py's KVCache: k, v [B, S, H, K], rotated keys,
    slot positions); k_cmp, v_cmp: [B, C, H, K] compressed tokens (slot c holds keys
    c d .. c d + l - 1 once they are all in)."""

    kv: KVCache
    k_cmp: jax.Array
    v_cmp: jax.Array


class Compressor(nnx.Module):
    """phi: [B, C, l, H, K] blocks of keys (or values) -> [B, C, H, K] compressed tokens."""

    def __init__(self, cfg, block: int, dim: int, learned: bool, *, rngs: nnx.Rngs):
        self.learned = learned
        if learned:
            self.pos = nnx.Param(jnp.zeros((block, dim), jnp.float32))
            self.hidden = projection(cfg, block * dim, dim, rngs=rngs)
            self.proj = dense(dim, dim, std=output_std(cfg), dtype=jnp.dtype(cfg.dtype),
                              rngs=rngs)

    def __call__(self, blocks: jax.Array) -> jax.Array:
        mean = jnp.mean(blocks.astype(jnp.float32), axis=2)
        if not self.learned:
            return mean.astype(blocks.dtype)
        b, c, width, h, k = blocks.shape
        x = blocks + self.pos[...][:, None, :].astype(blocks.dtype)
        x = jnp.moveaxis(x, 2, 3).reshape(b, c, h, width * k)
        y = self.proj(jax.nn.silu(self.hidden(x)))
        return (mean + y.astype(jnp.float32)).astype(blocks.dtype)


class NSA(nnx.Module):
    """`y, cache = layer(x, positions=pos, cache=cache)`: x [B, T, D], positions [B, T]."""

    Args = NSAArgs

    def __init__(self, cfg, args: NSAArgs, *, rngs: nnx.Rngs):
        self.n_heads = hq = args.n_heads or cfg.n_heads
        self.n_kv_heads = h = args.n_kv_heads or (cfg.resolved_kv_heads if args.n_heads is None
                                                  else hq)
        self.head_dim = k = cfg.resolved_head_dim
        self.geometry = Geometry(args.cmp_block, args.cmp_stride, args.block_size,
                                 args.block_count, args.window)
        self.use_rope = args.rope
        self.rope_theta = cfg.rope_theta
        self.query_chunk = args.query_chunk
        self.backend = args.backend
        self.dtype = jnp.dtype(cfg.dtype)
        self.qkv = projection(cfg, cfg.d_model, (hq + 2 * h) * k, rngs=rngs)
        self.gates = projection(cfg, cfg.d_model, 3 * hq, rngs=rngs)
        learned = args.compress == "mlp"
        self.k_compress = Compressor(cfg, args.cmp_block, k, learned, rngs=rngs)
        self.v_compress = Compressor(cfg, args.cmp_block, k, learned, rngs=rngs)
        self.out = output_projection(cfg, hq * k, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: NSAArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine): the head layout and
        RoPE as attention's, then the blocks."""
        heads = AttentionArgs(n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, rope=args.rope)
        errs = Attention.check_config(cfg, heads, name)
        p = f"model.mixer_args.{name}"
        errs += geometry_errors(p, Geometry(args.cmp_block, args.cmp_stride, args.block_size,
                                            args.block_count, args.window))
        if args.query_chunk < 1:
            errs.append(f"{p}.query_chunk must be >= 1, got {args.query_chunk}")
        return errs

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> NSACache:
        h, k = self.n_kv_heads, self.head_dim
        c = n_slots(max_len, self.geometry)
        zeros = lambda n: jnp.zeros((batch_size, n, h, k), dtype)  # noqa: E731
        kv = KVCache(k=zeros(max_len), v=zeros(max_len),
                     pos=jnp.full((batch_size, max_len), -1, jnp.int32),
                     length=jnp.zeros((), jnp.int32))
        return NSACache(kv=kv, k_cmp=zeros(c), v_cmp=zeros(c))

    def _compress(self, k: jax.Array, v: jax.Array, end: jax.Array):
        """Compressed tokens of the slots ending at key indices end [B, C']."""
        width = self.geometry.cmp_block
        return (self.k_compress(slot_windows(k, end, width)),
                self.v_compress(slot_windows(v, end, width)))

    def _update_cache(self, cache: NSACache, k: jax.Array, v: jax.Array,
                      positions: jax.Array) -> NSACache:
        """Write T new keys / values at the cache's length, then the compressed tokens whose
        last key is among them (at most ceil(T / d); earlier ones are already in, later ones
        wait for their keys)."""
        t, s = k.shape[1], cache.kv.k.shape[1]
        start = cache.kv.length
        kv = write_cache(cache.kv, k, v, positions)
        g = self.geometry
        c = cache.k_cmp.shape[1]
        lo = jnp.maximum(0, -((g.cmp_block - 1 - start) // g.cmp_stride))   # ceil, >= 0
        slot = lo + jnp.arange((t - 1) // g.cmp_stride + 1)
        end = slot * g.cmp_stride + g.cmp_block - 1
        done = (end >= start) & (end < start + t) & (slot < c) & (end < s)
        new_k, new_v = self._compress(kv.k, kv.v,
                                      jnp.broadcast_to(end, (k.shape[0],) + end.shape))
        target = jnp.where(done, slot, c)                                    # c: dropped
        put = lambda buf, x: buf.at[:, target].set(x.astype(buf.dtype), mode="drop")  # noqa
        return cache.replace(kv=kv, k_cmp=put(cache.k_cmp, new_k),
                             v_cmp=put(cache.v_cmp, new_v))

    def _sharded(self, q, k, v, gates, segment_ids, settings, shards) -> jax.Array:
        """The cache-free call with the time axis sharded over the mesh's sequence axis
        (pallas_kernels/context_parallel): keys and values (and the document ids) are
        all-gathered into whole rows in the original order, as attention's all-gather form;
        the compressed tokens are computed C / N per shard and gathered (T / d of them); each
        shard picks blocks for its own queries at their original indices (the op's q_index,
        the "xla" form). No [B, T, D] activation travels -> o [B, T, HQ, K]."""
        b, t, hq, _ = q.shape
        tl = shards.check_length("nsa", t)
        heads = shards.head_spec(self.n_kv_heads) and shards.head_spec(hq)
        whole = [k, v] + ([] if segment_ids is None else [segment_ids])
        k_all, v_all, *seg_all = whole_rows(shards, whole, heads)
        seg_all = seg_all[0] if seg_all else None
        if seg_all is not None:                    # padding inert before phi sees it
            k_all, v_all = zero_padding(seg_all, k_all, v_all)
        slots = compression_slots(seg_all, b, t, self.geometry)
        # Each shard compresses C / N of the slots (phi runs once per slot, as on one device),
        # and the compressed tokens, T / d of them, are gathered for every shard's queries.
        batch = shards.batch_spec(b)
        spread = NamedSharding(shards.mesh, P(batch, SEQUENCE, None, heads, None))
        width = self.geometry.cmp_block
        k_cmp, v_cmp = (
            compress(jax.lax.with_sharding_constraint(slot_windows(x, slots.end, width), spread))
            for compress, x in ((self.k_compress, k_all), (self.v_compress, v_all)))

        def local(q, gates, k, v, k_cmp, v_cmp, *seg):
            q_index = jnp.broadcast_to(shards.local_tokens(tl), q.shape[:2])
            return nsa(q, k, v, gates[..., 0], gates[..., 1], gates[..., 2], k_cmp=k_cmp,
                       v_cmp=v_cmp, segment_ids=seg[0] if seg else None, q_index=q_index,
                       **settings)

        local_spec, row_spec = P(batch, SEQUENCE, heads), P(batch, None, heads)
        args = (q, gates, k_all, v_all, k_cmp, v_cmp) + ((seg_all,) if seg_all is not None
                                                         else ())
        specs = (local_spec,) * 2 + (row_spec,) * 4 + ((P(batch, None),) if seg_all is not None
                                                       else ())
        return run_sharded(shards, local, args, specs, local_spec)

    def __call__(self, x: jax.Array, *, positions: jax.Array, cache: NSACache | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, NSACache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): no branch
        crosses a document start, compressed tokens and blocks count from each document's
        first token; `positions` are in-document positions (RoPE), as the LM passes them."""
        refuse_segments_with_cache("nsa", segment_ids, cache)
        b, t, _ = x.shape
        hq, h, kd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = jnp.split(self.qkv(x), [hq * kd, (hq + h) * kd], axis=-1)
        q, k, v = q.reshape(b, t, hq, kd), k.reshape(b, t, h, kd), v.reshape(b, t, h, kd)
        if self.use_rope:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        gates = jax.nn.sigmoid(self.gates(x).astype(jnp.float32)).reshape(b, t, hq, 3)
        g = self.geometry
        settings = dict(cmp_block=g.cmp_block, cmp_stride=g.cmp_stride,
                        block_size=g.block_size, block_count=g.block_count, window=g.window,
                        scale=kd ** -0.5, backend=self.backend, query_chunk=self.query_chunk)
        shards = sequence_shards() if cache is None else None
        if shards is not None:
            o = self._sharded(q, k, v, gates, segment_ids, settings, shards)
        elif cache is None:
            if segment_ids is not None:            # padding inert before phi sees it
                k, v = zero_padding(segment_ids, k, v)
            slots = compression_slots(segment_ids, b, t, g)
            k_cmp, v_cmp = self._compress(k, v, slots.end)
            o = nsa(q, k, v, gates[..., 0], gates[..., 1], gates[..., 2], k_cmp=k_cmp,
                    v_cmp=v_cmp, segment_ids=segment_ids, **settings)
        else:
            if t > cache.kv.k.shape[1]:
                raise ValueError(f"nsa: {t} tokens do not fit the KV cache of "
                                 f"{cache.kv.k.shape[1]} slots")
            start = cache.kv.length
            cache = self._update_cache(cache, k, v, positions)
            o = nsa(q, cache.kv.k.astype(q.dtype), cache.kv.v.astype(q.dtype), gates[..., 0],
                    gates[..., 1], gates[..., 2], k_cmp=cache.k_cmp.astype(q.dtype),
                    v_cmp=cache.v_cmp.astype(q.dtype), q_start=start, **settings)
        return self.out(o.reshape(b, t, hq * kd)), cache
