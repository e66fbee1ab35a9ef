"""Compressed Convolutional Attention (CCA) and its grouped-query form (CCGQA).

Shape legend:
  B batch, T new tokens, S cache slots, D model width, C compression factor,
  H query heads, Hkv key/value heads (H for CCA, fewer for CCGQA), G = H / Hkv,
  Dh latent head dim (H * Dh = D / C), E = (H + Hkv) * Dh channels of the q/k convolutions,
  W conv kernel width, P = 2 (W - 1) conv tail, Vh = Hkv * Dh / 2 one value half.

Figliolia et al. 2025, "Compressed Convolutional Attention: Efficient Attention in a Compressed
Latent Space" (Zyphra, arXiv:2510.04476). Queries, keys and values are down-projected into a
latent of width D / C and the whole attention runs there; only the output is projected back up.
Parameters, KV cache and attention FLOPs all shrink by C; CCGQA shares each key/value head among
G query heads, which shrinks the KV cache by a further G. Steps, in the paper's order and under
its names (the comments cite these step numbers; the paper's equation numbers are not cited):

  1. down-projection:  q0 = x W_q [T, H*Dh],  k0 = x W_k [T, Hkv*Dh]
  2. convolutional mixing on u = [q0 ; k0] (E channels), two causal convolutions over time:
     a depthwise one (each channel its own width-W filter), then a grouped one whose groups are
     the H + Hkv heads (a full Dh x Dh channel mix inside each head, also width W):
     c = conv2_{seq+ch}(conv1_{seq}(u)); together they see the last 2W - 1 tokens.
  3. q-k mean: m = (q0 + repeat_G(k0)) / 2 per query head;
     q = c_q + m,  k = c_k + mean over the G query heads of a group of m.
  4. value shift: v_t = [x_t W_v1 ; x_{t-1} W_v2] (x_{-1} = 0), each half Vh wide, reshaped
     to [Hkv, Dh] after the concatenation (an even Hkv: the first Hkv / 2 heads hold current
     values, the others shifted ones; Hkv = 1: each half of the one head).
  5. q and k L2-normalised to norm sqrt(Dh), k times a learned per-head temperature;
     RoPE on q and k in the latent; causal softmax attention with scale 1 / sqrt(Dh)
     (GQA for CCGQA): a logit is sqrt(Dh) * temperature * cos(q, k).
  6. up-projection: y = o W_o, o [T, H*Dh].

Cache (constant size apart from the latent KV, which is 1 / C of MHA's, 1 / (C G) for CCGQA):
the latent k (normalised, temperature-scaled and rotated, as attention caches rotated keys) and
v in a KVCache; the last P rows of u, from which the two convolutions restart exactly (before
the sequence starts u = 0, as the zero padding of the full forward); and x_{t-1} W_v2 of the
last token for the value shift. The convolutions and the shift follow the order tokens arrive
in (as layers/conv.py); positions enter only through RoPE and the mask.

Deviations and choices, each deliberate:
  * The value-shift cache stores the projected half x_{t-1} W_v2 (Vh numbers) instead of
    x_{t-1} itself (D numbers, as ZAYA1's public decode code does): the same v, 2 C G times
    fewer bytes.
  * Temperature = exp(tau_h), tau initialised at 0 (temperature 1): positive by construction.
    ZAYA1's public inference code can clamp tau to [~0, 2] before the exp; no clamp here.
  * Full RoPE over Dh (ZAYA1's config rotates half of each head); conv biases start at zero;
    conv kernels uniform(+-1/sqrt(fan_in)) as PyTorch's Conv1d.
  * Optional sliding window (`window`), the ring-buffer KV cache of layers/attention.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.attention import (
    KVCache,
    attention_mask,
    read_then_write,
    softmax_attention,
    window_errors,
)
from layers.cache import CacheBytes, refuse_segments_with_cache
from layers.checks import head_errors, min_errors, rope_errors
from layers.conv import ConvCache
from layers.delta_rule import l2_normalize
from layers.projections import output_projection, projection
from layers.rope import apply_rope
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.masks import packed_visibility
from pallas_kernels.segments import document_positions


@dataclasses.dataclass(frozen=True)
class CCAArgs:
    n_heads: int | None = None      # query heads H; None: model.n_heads
    n_kv_heads: int | None = None   # None: = n_heads (CCA); a divisor of n_heads: CCGQA
    compression: int = 2            # C: latent width D / C, head dim D / (C H)
    conv_width: int = 2             # kernel of both causal convs over time (paper: 2)
    rope: bool = True
    window: int | None = None       # None: full causal; an int: sliding window (ring cache)


@struct.dataclass
class CCACache(CacheBytes):
    """kv: latent keys/values [B, S, Hkv, Dh]; qk_conv: tail [B, P, E] of u = [q0 ; k0] (zeros
    before the sequence starts); v_prev: [B, Vh], x_{t-1} W_v2 of the last token seen."""

    kv: KVCache
    qk_conv: ConvCache
    v_prev: jax.Array


def _geometry(cfg, args: CCAArgs) -> tuple[int, int, int]:
    """(H, Hkv, Dh) from the model config and the mixer settings (unchecked)."""
    h = args.n_heads or cfg.n_heads
    hkv = args.n_kv_heads or h
    dh = cfg.d_model // max(args.compression, 1) // max(h, 1)
    return h, hkv, dh


def qk_conv(u: jax.Array, past: jax.Array, k1: jax.Array, bias1: jax.Array, k2: jax.Array,
            bias2: jax.Array, *, head_dim: int, doc_pos: jax.Array | None = None,
            past_pos: jax.Array | None = None) -> jax.Array:
    """Step 2. u [B, T, E] after past [B, P, E] (both compute dtype) -> c [B, T, E]; k1 [W, E],
    k2 [W, H + Hkv, Dh, Dh] and the biases [E] are the two convolutions' weights.

    Both convolutions are 'valid' over [past ; u]: the depthwise one leaves T + W - 1 rows
    (its first W - 1 at times before u, which the grouped one needs), the grouped one T.

    doc_pos: optional [B, T] in-document positions (packed documents). Each document then gets
    what it gets alone, where everything before it is zero: a depthwise tap that reaches
    before the document reads 0, and a grouped tap that reaches a row before the document
    reads the depthwise conv of zeros, i.e. its bias. past_pos: [B, P] in-document positions
    of the past rows when they are real tokens (a sequence shard's halo,
    pallas_kernels/context_parallel/halo.py); None when the past is a cache or zeros, whose
    rows are never masked.
    """
    b, t, e = u.shape
    w, dh = k1.shape[0], head_dim
    full = jnp.concatenate([past, u], axis=1)                       # [B, P + T, E]
    n = t + w - 1
    # W shifted multiply-adds (W is 2 or so), as layers/conv.py. Row m of mid is time
    # m - (W - 1); its tap i reads time m - 2 (W - 1) + i, W - 1 - i steps back.
    if doc_pos is None:
        mid = sum(full[:, i:i + n] * k1[i] for i in range(w)) + bias1
    else:
        if past_pos is None:    # rows before time 0 only ever read the zero past: no mask
            pos = jnp.pad(doc_pos, ((0, 0), (w - 1, 0)), constant_values=2 * w)
        else:
            pos = jnp.concatenate([past_pos[:, past_pos.shape[1] - (w - 1):], doc_pos], axis=1)
        pos = pos[..., None]
        mid = sum(jnp.where(pos >= w - 1 - i, full[:, i:i + n], 0) * k1[i]
                  for i in range(w)) + bias1
    mid = mid.reshape(b, n, e // dh, dh)                            # heads are the groups
    if doc_pos is None:
        taps = [mid[:, i:i + t] for i in range(w)]
    else:
        before = jnp.broadcast_to(bias1.reshape(e // dh, dh), mid.shape[2:])
        taps = [jnp.where((doc_pos >= w - 1 - i)[..., None, None], mid[:, i:i + t], before)
                for i in range(w)]
    c = sum(jnp.einsum("btgi,gio->btgo", tap, k2[i]) for i, tap in enumerate(taps))
    return c.reshape(b, t, e) + bias2


class CCA(nnx.Module):
    """CCA / CCGQA token mixer (`args.n_kv_heads` below `n_heads` is CCGQA).

    `y, cache = layer(x, positions=pos, cache=cache)`: x [B, T, D], positions [B, T].
    """

    Args = CCAArgs

    def __init__(self, cfg, args: CCAArgs, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = h, hkv, dh = _geometry(cfg, args)
        self.width = w = args.conv_width
        self.window = args.window
        self.use_rope = args.rope
        self.rope_theta = cfg.rope_theta
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        d = cfg.d_model
        # One matmul for W_q, W_k and both value halves [W_v1, W_v2] (step 1 and step 4).
        self.qkv = projection(cfg, d, (h + 2 * hkv) * dh, rngs=rngs)
        e = (h + hkv) * dh
        k0, k1 = jax.random.split(rngs.params())
        # PyTorch Conv1d init, uniform(+-1/sqrt(fan_in)): fan-in W (depthwise), W * Dh (grouped).
        b0, b1 = w ** -0.5, (w * dh) ** -0.5
        self.conv1_kernel = nnx.Param(jax.random.uniform(k0, (w, e), jnp.float32, -b0, b0))
        self.conv1_bias = nnx.Param(jnp.zeros((e,), jnp.float32))
        self.conv2_kernel = nnx.Param(
            jax.random.uniform(k1, (w, h + hkv, dh, dh), jnp.float32, -b1, b1))
        # Biases 1-D: training/optim.py decays every parameter of 2 or more dims.
        self.conv2_bias = nnx.Param(jnp.zeros((e,), jnp.float32))
        self.log_temp = nnx.Param(jnp.zeros((hkv,), jnp.float32))   # tau: temperature exp(tau)
        self.out = output_projection(cfg, h * dh, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: CCAArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        h, hkv, _ = _geometry(cfg, args)
        if args.compression < 1:
            return [f"{p}.compression must be >= 1, got {args.compression}"]
        if cfg.d_model % args.compression:
            return [f"{p}.compression={args.compression} does not divide "
                    f"model.d_model={cfg.d_model} (the latent width is d_model / compression)"]
        latent = cfg.d_model // args.compression
        errs = head_errors(p, h, n_kv_heads=hkv, width=latent,
                           width_name=f"the latent width model.d_model / {p}.compression = "
                                      f"{latent}")
        if not errs and args.rope:
            errs = rope_errors(p, latent // h, "d_model / compression / n_heads",
                               " (change compression or n_heads, or set rope: false)")
        if not errs and (hkv * latent // h) % 2:
            errs.append(f"{p}: the value shift halves the latent value width n_kv_heads * "
                        f"head_dim = {hkv * latent // h}, which must be even")
        errs += min_errors(p, args, "conv_width")
        errs += window_errors(p, args.window, 0, cfg.max_len)
        return errs

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> CCACache:
        # A window keeps `window` slots whatever max_len is (see Attention.cache_slots).
        s = max_len if self.window is None else self.window
        h, hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        shape = (batch_size, s, hkv, dh)
        kv = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                     pos=jnp.full((batch_size, s), -1, jnp.int32),
                     length=jnp.zeros((), jnp.int32), window=self.window)
        tail = jnp.zeros((batch_size, 2 * (self.width - 1), (h + hkv) * dh), dtype)
        return CCACache(kv=kv, qk_conv=ConvCache(tail=tail),
                        v_prev=jnp.zeros((batch_size, hkv * dh // 2), dtype))

    def _conv_weights(self) -> tuple[jax.Array, ...]:
        """(depthwise kernel [W, E], its bias [E], grouped kernel [W, H + Hkv, Dh, Dh], its bias
        [E]) in the compute dtype."""
        return tuple(p[...].astype(self.dtype) for p in (
            self.conv1_kernel, self.conv1_bias, self.conv2_kernel, self.conv2_bias))

    def _conv(self, u: jax.Array, past: jax.Array, doc_pos: jax.Array | None = None
              ) -> tuple[jax.Array, jax.Array]:
        """Step 2: qk_conv with this layer's weights, and the new tail [B, P, E], the last P
        rows of [past ; u]."""
        c = qk_conv(u, past, *self._conv_weights(), head_dim=self.head_dim, doc_pos=doc_pos)
        return c, jnp.concatenate([past, u], axis=1)[:, u.shape[1]:]

    def _sharded_mixing(self, u, v_del, doc_pos, shards) -> tuple[jax.Array, jax.Array]:
        """Steps 2 and 4 with the time axis sharded over the mesh's sequence axis
        (pallas_kernels/context_parallel/halo.py): each piece takes the previous piece's last
        2 (W - 1) rows of u, with their in-document positions, for the two convolutions, and
        its last row of x W_v2 for the value shift -> (c [B, T, E], shifted [B, T, Vh])."""
        from pallas_kernels.context_parallel.halo import with_halos

        p, head_dim = 2 * (self.width - 1), self.head_dim

        def mix(pieces, halos, *weights):
            u, v_del, *pos = pieces
            past, prev, *past_pos = halos
            doc_pos = pos[0] if pos else None
            if past is None:                                    # width 1: no past
                past, past_pos = u[:, :0], [None if doc_pos is None else doc_pos[:, :0]]
            c = qk_conv(u, past, *weights, head_dim=head_dim, doc_pos=doc_pos,
                        past_pos=past_pos[0] if pos else None)
            shifted = jnp.concatenate([prev, v_del], axis=1)[:, :v_del.shape[1]]
            if doc_pos is not None:   # a document's first token sees x_{-1} = 0
                shifted = jnp.where((doc_pos > 0)[..., None], shifted, 0)
            return c, shifted

        xs, rows = [u, v_del], [p, 1]
        if doc_pos is not None:
            xs, rows = xs + [doc_pos], rows + [p]
        return with_halos(mix, xs, rows, shards, self._conv_weights())

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: CCACache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, CCACache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): the q/k convs,
        the value shift and the attention all stay inside each document; `positions` should
        be in-document positions (RoPE), as the LM passes them."""
        b, t, _ = x.shape
        refuse_segments_with_cache("cca", segment_ids, cache)
        shards = sequence_shards() if cache is None else None
        if segment_ids is None:
            doc_pos = None
        elif shards is None:
            doc_pos = document_positions(segment_ids)
        else:   # counted in the original order (the zigzag layout reorders the row)
            doc_pos = shards.document_positions(segment_ids)
        h, hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        g = h // hkv
        vh = hkv * dh // 2
        # Step 1 (and both value halves of step 4).
        q0, k0, v_cur, v_del = jnp.split(self.qkv(x), [h * dh, (h + hkv) * dh,
                                                       (h + hkv) * dh + vh], axis=-1)
        u = jnp.concatenate([q0, k0], axis=-1)                      # [B, T, E]
        p = 2 * (self.width - 1)
        if cache is None:
            past = jnp.zeros((b, p, u.shape[-1]), self.dtype)       # u_{<0} = 0
            prev = jnp.zeros((b, 1, vh), self.dtype)                # x_{-1} W_v2 = 0
        else:
            past = cache.qk_conv.tail.astype(self.dtype)
            prev = cache.v_prev[:, None].astype(self.dtype)
        if shards is not None:      # steps 2 and 4 with halos from the previous pieces
            c, shifted = self._sharded_mixing(u, v_del, doc_pos, shards)
        else:
            # Step 2.
            c, tail = self._conv(u, past, doc_pos)
            # Step 4, value shift: the x_{t-1} W_v2 half comes one token late.
            v_del = jnp.concatenate([prev, v_del], axis=1)          # [B, T + 1, Vh]
            shifted = v_del[:, :t]
            if doc_pos is not None:   # a document's first token sees x_{-1} = 0
                shifted = jnp.where((doc_pos > 0)[..., None], shifted, 0)
        c_q = c[..., :h * dh].reshape(b, t, hkv, g, dh)
        c_k = c[..., h * dh:].reshape(b, t, hkv, dh)
        # Step 3, q-k mean: m = (q0 + repeat_G(k0)) / 2; k adds the mean of m over each group.
        q0 = q0.reshape(b, t, hkv, g, dh)
        k0 = k0.reshape(b, t, hkv, dh)
        m = (q0 + k0[:, :, :, None]) / 2
        q = (c_q + m).reshape(b, t, h, dh)
        k = c_k + jnp.mean(m, axis=3)
        v = jnp.concatenate([v_cur, shifted], axis=-1).reshape(b, t, hkv, dh)
        # Step 5. L2 norm in float32 (bf16 squares lose small vectors), to norm sqrt(Dh).
        q = l2_normalize(q, self.eps) * math.sqrt(dh)
        temp = jnp.exp(self.log_temp[...])[:, None]                 # [Hkv, 1]
        k = l2_normalize(k, self.eps) * (math.sqrt(dh) * temp)
        if self.use_rope:
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
        q, k = q.astype(self.dtype), k.astype(self.dtype)
        if shards is not None:      # keys and values all-gathered or ringed
            from pallas_kernels.context_parallel.attention import sharded_attention

            o = sharded_attention(q, k, v, window=self.window, n_sinks=0, scale=dh ** -0.5,
                                  segment_ids=segment_ids, shards=shards)
            return self.out(o.reshape(b, t, h * dh)), None
        if cache is None:
            keys, values, k_pos = k, v, positions
        else:
            kv = cache.kv
            if kv.window is None and t > kv.k.shape[1]:
                raise ValueError(f"{t} tokens do not fit a KV cache of {kv.k.shape[1]} slots")
            # Attend over the old cache plus the chunk, then write the chunk.
            seen, k_pos, kv = read_then_write(kv, positions, k=k, v=v)
            keys, values = seen["k"], seen["v"]
            cache = cache.replace(
                kv=kv,
                qk_conv=cache.qk_conv.replace(tail=tail.astype(cache.qk_conv.tail.dtype)),
                v_prev=v_del[:, t].astype(cache.v_prev.dtype))
        if segment_ids is None:
            mask = attention_mask(positions, k_pos, self.window, 0)
        else:
            mask = packed_visibility(segment_ids, self.window, 0)
        o = softmax_attention(q, keys, values, mask, dh ** -0.5)
        # Step 6.
        return self.out(o.reshape(b, t, h * dh)), cache
