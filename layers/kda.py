"""Kimi Delta Attention (KDA) token mixer: the gated delta rule with a decay per key channel.

Shape legend:
  B batch, T new tokens, D model width, H heads, K key (and query) head dim, V value head dim,
  R rank of the low-rank gate projections.

KDA (Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture",
arXiv:2510.26692, Sec. 3) refines Gated DeltaNet's scalar decay into one per key channel:

    S_t = (I - beta_t k_t k_t^T) diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

Layer (the paper's Sec. 3.2 and flash-linear-attention's KimiDeltaAttention): q, k, v are
linear projections of x, each through a short causal conv and SiLU; q and k L2-normalised per
head; beta = sigmoid(x W_b); the forget gate is low-rank, f = W_f^up W_f^down x [H, K], and
becomes the log decay g = -exp(A_log_h) softplus(f + dt_bias) (<= 0; Mamba2's discretisation
per channel, A_log per head, dt_bias per channel); the output is RMS-normalised per head and
gated by sigmoid(W_g^up W_g^down x) (also low-rank, rank R = V by default), then projected
back to D.

Cache: the recurrent state [B, H, K, V] (float32) and the conv tails of q, k, v; its size does
not depend on max_len.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from layers.conv import ShortConv
from layers.delta_net import DeltaNet, DeltaNetCache
from layers.delta_rule import decay_init, log_decay, recurrent_step
from layers.norm import RMSNorm
from layers.projections import output_projection, projection
from pallas_kernels.backends import LinearBackend
from pallas_kernels.kda import kda


@dataclasses.dataclass(frozen=True)
class KDAArgs:
    n_heads: int | None = None      # None: model.n_heads
    head_dim: int | None = None     # key dim K; None: model.d_model // n_heads
    expand_v: float = 1.0           # value dim V = int(K * expand_v)
    gate_rank: int | None = None    # R of the low-rank forget / output gates; None: V
    conv_width: int = 4             # short causal conv on q, k and v
    chunk_size: int = 64            # chunk length of the chunkwise-parallel op
    backend: LinearBackend = "auto"    # pallas_kernels/backends.py


class KDA(nnx.Module):
    """KDA mixer. `y, cache = layer(x, positions=pos, cache=cache)`: x [B, T, D] -> y [B, T, D].
    Positions are not used: order enters through the recurrence and the causal convs."""

    Args = KDAArgs

    def __init__(self, cfg, args: KDAArgs, *, rngs: nnx.Rngs):
        self.n_heads = h = args.n_heads or cfg.n_heads
        self.key_dim = kd = args.head_dim or cfg.d_model // h
        self.value_dim = vd = int(kd * args.expand_v)
        rank = args.gate_rank or vd
        self.chunk_size = args.chunk_size
        self.backend = args.backend
        self.precision = cfg.precision
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        d = cfg.d_model
        proj = functools.partial(projection, cfg, rngs=rngs)
        self.q_proj, self.k_proj = proj(d, h * kd), proj(d, h * kd)
        self.v_proj, self.b_proj = proj(d, h * vd), proj(d, h)
        conv = dict(dtype=self.dtype, rngs=rngs)
        self.q_conv = ShortConv(h * kd, args.conv_width, **conv)
        self.k_conv = ShortConv(h * kd, args.conv_width, **conv)
        self.v_conv = ShortConv(h * vd, args.conv_width, **conv)
        # Low-rank forget gate (logits per key channel) and output gate.
        self.f_down, self.f_up = proj(d, rank), proj(rank, h * kd)
        self.g_down, self.g_up = proj(d, rank), proj(rank, h * vd, use_bias=True)
        a_log, _ = decay_init(rngs.params(), (h,))
        _, dt_bias = decay_init(rngs.params(), (h, kd))
        self.A_log, self.dt_bias = nnx.Param(a_log), nnx.Param(dt_bias)
        self.o_norm = RMSNorm(vd, eps=cfg.norm_eps)
        self.out = output_projection(cfg, h * vd, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: KDAArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine): DeltaNet's (heads,
        widths, conv, chunk), then the gate rank."""
        errs = DeltaNet.check_config(cfg, args, name)
        if args.gate_rank is not None and args.gate_rank < 1:
            errs.append(f"model.mixer_args.{name}.gate_rank must be >= 1 or null (the value "
                        f"dim); got {args.gate_rank}")
        return errs

    # The same cache as DeltaNet's: state [B, H, K, V] float32 and the q / k / v conv tails;
    # the same q / k / v / beta preamble (convs, SiLU, L2-normalised q and k).
    init_cache = DeltaNet.init_cache
    _qkv_beta = DeltaNet._qkv_beta

    def _decay(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> g [B, T, H, K] float32 log decays -exp(A_log) softplus(f + dt_bias)."""
        b, t, _ = x.shape
        logits = self.f_up(self.f_down(x)).astype(jnp.float32).reshape(
            b, t, self.n_heads, self.key_dim)
        return log_decay(logits, self.A_log[...][:, None], self.dt_bias[...])

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: DeltaNetCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, DeltaNetCache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): the convs and
        the recurrent state restart at every document start (pallas_kernels/segments.py)."""
        del positions
        b, t, _ = x.shape
        h, kd, vd = self.n_heads, self.key_dim, self.value_dim
        q, k, v, beta, (qc, kc, vc) = self._qkv_beta(x, cache, segment_ids)
        g = self._decay(x)                                              # [B, T, H, K]
        scale = kd ** -0.5

        if cache is not None and t == 1:
            # Single-token decode: the recurrence itself is cheaper than any chunked form.
            o, state = recurrent_step(cache.state, q[:, 0], k[:, 0], v[:, 0], beta[:, 0],
                                      g[:, 0], scale)
            o = o[:, None].astype(self.dtype)
        else:
            o, state = kda(q, k, v, g, beta, scale=scale, chunk_size=self.chunk_size,
                           backend=self.backend, precision=self.precision,
                           initial_state=None if cache is None else cache.state,
                           output_final_state=cache is not None, segment_ids=segment_ids)

        gate = jax.nn.sigmoid(self.g_up(self.g_down(x)).astype(jnp.float32))
        o = self.o_norm(o).astype(jnp.float32) * gate.reshape(b, t, h, vd)
        y = self.out(o.astype(self.dtype).reshape(b, t, h * vd))
        if cache is not None:
            cache = cache.replace(state=state, q_conv=qc, k_conv=kc, v_conv=vc)
        return y, cache
