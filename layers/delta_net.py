"""DeltaNet and Gated DeltaNet token mixers: linear attention whose state is edited by the
delta rule, optionally with a Mamba2-style decay gate.

Shape legend:
  B batch, T new tokens, D model width, H heads, K key (and query) head dim, V value head dim.

DeltaNet (Schlag, Irie & Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight
Programmers"; made trainable in parallel by Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length", arXiv:2406.06484) keeps a matrix memory
S [K, V] per head and, instead of adding k v^T, replaces what the memory predicts for k:

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,        o_t = scale * S_t^T q_t

Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule", arXiv:2412.06464, eq. 10) first decays the whole memory by alpha_t = exp(g_t):

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T

Layer (both papers, and flash-linear-attention's DeltaNet / GatedDeltaNet layers): q, k, v are
linear projections of x, each through a short causal conv and SiLU; q and k are L2-normalised
per head (keeps the delta-rule transition I - beta k k^T a contraction); beta = sigmoid(x W_b).
The output is RMS-normalised per head, multiplied by an output gate SiLU(x W_g) in the gated
variant, and projected back to D.

Cache: the recurrent state [B, H, K, V] (float32) and the conv tails of q, k, v; its size does
not depend on max_len.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes
from layers.checks import head_errors, min_errors
from layers.conv import ConvCache, ShortConv
from layers.delta_rule import decay_init, l2_normalize, log_decay, recurrent_step
from layers.norm import RMSNorm
from layers.projections import output_projection, projection
from pallas_kernels.backends import LinearBackend
from pallas_kernels.delta_rule import delta_rule
from pallas_kernels.gated_delta_rule import gated_delta_rule


@dataclasses.dataclass(frozen=True)
class DeltaNetArgs:
    gated: bool = False             # True: Gated DeltaNet (decay gate g and output gate)
    n_heads: int | None = None      # None: model.n_heads
    head_dim: int | None = None     # key dim K; None: model.d_model // n_heads
    expand_v: float = 1.0           # value dim V = int(K * expand_v)
    conv_width: int = 4             # short causal conv on q, k and v
    chunk_size: int = 64            # chunk length of the chunkwise-parallel op
    backend: LinearBackend = "auto"    # pallas_kernels/backends.py


@struct.dataclass
class DeltaNetCache(CacheBytes):
    """state: [B, H, K, V] float32 memory; q_conv/k_conv/v_conv: the short convs' input tails
    ([B, W - 1, H*K] or [B, W - 1, H*V], in the cache dtype)."""

    state: jax.Array
    q_conv: ConvCache
    k_conv: ConvCache
    v_conv: ConvCache


class DeltaNet(nnx.Module):
    """DeltaNet / Gated DeltaNet mixer (`args.gated`).

    `y, cache = layer(x, positions=pos, cache=cache)`: x [B, T, D] -> y [B, T, D]. Positions are
    not used: order enters through the recurrence and the causal convs.
    """

    Args = DeltaNetArgs

    def __init__(self, cfg, args: DeltaNetArgs, *, rngs: nnx.Rngs):
        self.gated = args.gated
        self.n_heads = h = args.n_heads or cfg.n_heads
        self.key_dim = kd = args.head_dim or cfg.d_model // h
        self.value_dim = vd = int(kd * args.expand_v)
        self.chunk_size = args.chunk_size
        self.backend = args.backend
        self.precision = cfg.precision
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        d = cfg.d_model
        proj = functools.partial(projection, cfg, d, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = proj(h * kd), proj(h * kd), proj(h * vd)
        self.b_proj = proj(h)
        conv = dict(dtype=self.dtype, rngs=rngs)
        self.q_conv = ShortConv(h * kd, args.conv_width, **conv)
        self.k_conv = ShortConv(h * kd, args.conv_width, **conv)
        self.v_conv = ShortConv(h * vd, args.conv_width, **conv)
        if self.gated:
            self.a_proj, self.g_proj = proj(h), proj(h * vd)
            a_log, dt_bias = decay_init(rngs.params(), (h,))
            self.A_log, self.dt_bias = nnx.Param(a_log), nnx.Param(dt_bias)
        else:
            self.a_proj = self.g_proj = self.A_log = self.dt_bias = None
        # One RMSNorm over V shared by the heads, as in flash-linear-attention's layers.
        self.o_norm = RMSNorm(vd, eps=cfg.norm_eps)
        self.out = output_projection(cfg, h * vd, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: DeltaNetArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        # An explicit 0 is an error here, not "use model.n_heads" (null is that).
        n_heads = cfg.n_heads if args.n_heads is None else args.n_heads
        errs = head_errors(p, n_heads, head_dim=args.head_dim, width=cfg.d_model, null_ok=True,
                           hint=f" (or set {p}.head_dim)")
        kd = args.head_dim or cfg.d_model // max(n_heads, 1)
        if not errs and kd >= 1 and int(kd * args.expand_v) < 1:
            errs.append(f"{p}.expand_v={args.expand_v} gives a value dim < 1 (key dim {kd})")
        return errs + min_errors(p, args, "conv_width", "chunk_size")

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> DeltaNetCache:
        # max_len is unused: the memory is a fixed [K, V] matrix per head.
        del max_len
        h, kd, vd = self.n_heads, self.key_dim, self.value_dim
        return DeltaNetCache(state=jnp.zeros((batch_size, h, kd, vd), jnp.float32),
                             q_conv=self.q_conv.init_cache(batch_size, dtype),
                             k_conv=self.k_conv.init_cache(batch_size, dtype),
                             v_conv=self.v_conv.init_cache(batch_size, dtype))

    def _decay(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> g [B, T, H] float32: log decay -exp(A_log) softplus(x W_a + dt_bias)
        (<= 0), as Mamba2's discretised A dt."""
        return log_decay(self.a_proj(x).astype(jnp.float32), self.A_log[...],
                         self.dt_bias[...])

    def _qkv_beta(self, x: jax.Array, cache: DeltaNetCache | None,
                  segment_ids: jax.Array | None):
        """The delta-rule layers' inputs (DeltaNet and KDA): q, k [B, T, H, K] L2-normalised
        in the compute dtype, v [B, T, H, V] and beta [B, T, H] float32, each of q / k / v
        through its short conv and SiLU; and the convs' new tails (q, k, v; None without a
        cache)."""
        b, t, _ = x.shape
        h, kd, vd = self.n_heads, self.key_dim, self.value_dim
        conv_caches = (None,) * 3 if cache is None else (cache.q_conv, cache.k_conv,
                                                         cache.v_conv)
        seg = dict(segment_ids=segment_ids)
        q, qc = self.q_conv(self.q_proj(x), conv_caches[0], **seg)
        k, kc = self.k_conv(self.k_proj(x), conv_caches[1], **seg)
        v, vc = self.v_conv(self.v_proj(x), conv_caches[2], **seg)
        # The op takes inputs in the compute dtype and accumulates in float32.
        q = l2_normalize(jax.nn.silu(q).reshape(b, t, h, kd), self.eps).astype(self.dtype)
        k = l2_normalize(jax.nn.silu(k).reshape(b, t, h, kd), self.eps).astype(self.dtype)
        v = jax.nn.silu(v).reshape(b, t, h, vd)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        return q, k, v, beta, (qc, kc, vc)

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: DeltaNetCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, DeltaNetCache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): the convs and
        the recurrent state restart at every document start (pallas_kernels/segments.py)."""
        del positions
        b, t, _ = x.shape
        h, kd, vd = self.n_heads, self.key_dim, self.value_dim
        q, k, v, beta, (qc, kc, vc) = self._qkv_beta(x, cache, segment_ids)
        g = self._decay(x) if self.gated else None
        scale = kd ** -0.5

        if cache is not None and t == 1:
            # Single-token decode: the recurrence itself is cheaper than any chunked form.
            o, state = recurrent_step(cache.state, q[:, 0], k[:, 0], v[:, 0], beta[:, 0],
                                      None if g is None else g[:, 0], scale)
            o = o[:, None].astype(self.dtype)
        else:
            # Training (no state) or prefill / chunked prefill (start from the cached state).
            kwargs = dict(scale=scale, chunk_size=self.chunk_size, backend=self.backend,
                          precision=self.precision,
                          initial_state=None if cache is None else cache.state,
                          output_final_state=cache is not None, segment_ids=segment_ids)
            if self.gated:
                o, state = gated_delta_rule(q, k, v, g, beta, **kwargs)
            else:
                o, state = delta_rule(q, k, v, beta, **kwargs)

        o = self.o_norm(o)                                              # per head, over V
        if self.gated:
            gate = jax.nn.silu(self.g_proj(x).astype(jnp.float32)).reshape(b, t, h, vd)
            o = (o.astype(jnp.float32) * gate).astype(self.dtype)
        y = self.out(o.reshape(b, t, h * vd))
        if cache is not None:
            cache = cache.replace(state=state, q_conv=qc, k_conv=kc, v_conv=vc)
        return y, cache
