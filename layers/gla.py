"""Gated linear attention layer (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", Sec. 4.4).

Shape legend:
  B batch, T new tokens, D model width, H heads, K key dim per head (D * expand_k / H),
  V value dim per head (D * expand_v / H), R gate rank.

Per head, with a data-dependent decay per key channel (Eq. in Sec. 4.1 / 4.4):

    alpha_t = sigmoid(x_t W_a1 W_a2 + b)^(1 / tau)           (W_a1 [D, R], R = 16, tau = 16)
    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = (q_t / sqrt(K))^T S_t
    y_t = (RMSNorm(o_t) * SiLU(x_t W_r)) W_o                 (per-head norm, output gate)

The gate is kept in log space, gk = log_sigmoid(.) / tau <= 0: the chunked op works on cumulative
sums of gk, and the power 1/tau pushes alpha towards 1 so that the state forgets slowly (the
paper's reason for tau). Low rank R keeps the gate's parameter count at 2 R D instead of D^2/2.

Decode state per head: S [K, V] float32, independent of length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes
from layers.checks import head_errors
from layers.norm import RMSNorm
from layers.projections import output_projection, projection
from pallas_kernels.backends import LinearBackend
from pallas_kernels.gla import gla
from pallas_kernels.precision import HIGHEST


@dataclasses.dataclass(frozen=True)
class GLAArgs:
    n_heads: int | None = None      # None: model.n_heads
    expand_k: float = 0.5           # total key width = D * expand_k (the paper's d_k = d / 2)
    expand_v: float = 1.0           # total value width = D * expand_v
    gate_low_rank: int = 16         # R: the decay gate is x W_a1 [D, R] W_a2 [R, H K]
    gate_normalizer: float = 16.0   # tau: gk = log_sigmoid(.) / tau
    chunk_size: int = 64            # chunk length of the "xla" (chunkwise) backend
    backend: LinearBackend = "auto"    # pallas_kernels/backends.py


@struct.dataclass
class GLACache(CacheBytes):
    """state: [B, H, K, V] float32, the decayed sum of k_t v_t^T."""

    state: jax.Array


def _widths(d_model: int, args: GLAArgs) -> tuple[int, int]:
    """Total key and value widths (H K, H V)."""
    return int(d_model * args.expand_k), int(d_model * args.expand_v)


class GLA(nnx.Module):
    """`y, cache = gla(x, positions=pos, cache=cache)`: x [B, T, D]; positions are unused."""

    Args = GLAArgs

    def __init__(self, cfg, args: GLAArgs, *, rngs: nnx.Rngs):
        self.n_heads = args.n_heads or cfg.n_heads
        key_dim, value_dim = _widths(cfg.d_model, args)
        self.head_k = key_dim // self.n_heads
        self.head_v = value_dim // self.n_heads
        self.gate_normalizer = args.gate_normalizer
        self.chunk_size = args.chunk_size
        self.backend = args.backend
        self.precision = cfg.precision
        self.dtype = jnp.dtype(cfg.dtype)
        # q, k, v and the output-gate projection r in one matmul.
        self.proj = projection(cfg, cfg.d_model, 2 * key_dim + 2 * value_dim, rngs=rngs)
        self.gk_down = projection(cfg, cfg.d_model, args.gate_low_rank, rngs=rngs)
        # Bias 0: alpha = sigmoid(0)^(1/16) ~ 0.958 at init, a memory of ~24 tokens.
        self.gk_up = projection(cfg, args.gate_low_rank, key_dim, use_bias=True, rngs=rngs)
        # One RMSNorm over V shared by all heads (as in the reference GLA code).
        self.norm = RMSNorm(self.head_v, eps=cfg.norm_eps)
        self.out = output_projection(cfg, value_dim, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: GLAArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        n_heads = args.n_heads or cfg.n_heads
        key_dim, value_dim = _widths(cfg.d_model, args)
        errs = head_errors(p, n_heads)
        if not errs:
            if key_dim <= 0 or key_dim % n_heads:
                errs.append(f"{p}.expand_k={args.expand_k}: model.d_model * expand_k = "
                            f"{key_dim} must be a positive multiple of n_heads={n_heads}")
            if value_dim <= 0 or value_dim % n_heads:
                errs.append(f"{p}.expand_v={args.expand_v}: model.d_model * expand_v = "
                            f"{value_dim} must be a positive multiple of n_heads={n_heads}")
        if args.gate_low_rank <= 0:
            errs.append(f"{p}.gate_low_rank must be > 0, got {args.gate_low_rank}")
        if args.gate_normalizer <= 0:
            errs.append(f"{p}.gate_normalizer must be > 0, got {args.gate_normalizer}")
        if args.chunk_size <= 0:
            errs.append(f"{p}.chunk_size must be > 0, got {args.chunk_size}")
        return errs

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> GLACache:
        # A decayed running sum: float32 whatever `dtype` is; no dependence on max_len.
        del max_len, dtype
        shape = (batch_size, self.n_heads, self.head_k, self.head_v)
        return GLACache(state=jnp.zeros(shape, jnp.float32))

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: GLACache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, GLACache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): the state
        restarts at every document start (pallas_kernels/segments.py)."""
        del positions
        b, t, _ = x.shape
        h, dk, dv = self.n_heads, self.head_k, self.head_v
        q, k, v, r = jnp.split(self.proj(x), [h * dk, 2 * h * dk, 2 * h * dk + h * dv], axis=-1)
        q, k = q.reshape(b, t, h, dk), k.reshape(b, t, h, dk)
        v = v.reshape(b, t, h, dv)
        # Log-space decay in float32: log_sigmoid of a bf16 logit near 0 is fine, but cumulative
        # sums of bf16 gates over a chunk would drift.
        logit = self.gk_up(self.gk_down(x)).astype(jnp.float32)
        gk = (jax.nn.log_sigmoid(logit) / self.gate_normalizer).reshape(b, t, h, dk)
        op = dict(scale=dk ** -0.5, chunk_size=self.chunk_size, backend=self.backend,
                  precision=self.precision)
        if cache is None:
            o, _ = gla(q, k, v, gk, segment_ids=segment_ids, **op)
        elif t == 1:
            o, cache = self._step(q[:, 0], k[:, 0], v[:, 0], gk[:, 0], cache)
            o = o[:, None]
        else:
            o, s = gla(q, k, v, gk, initial_state=cache.state, output_final_state=True, **op)
            cache = cache.replace(state=s)
        o = self.norm(o.astype(self.dtype)) * jax.nn.silu(r.reshape(b, t, h, dv))
        return self.out(o.reshape(b, t, h * dv).astype(self.dtype)), cache

    def _step(self, q, k, v, gk, cache: GLACache) -> tuple[jax.Array, GLACache]:
        """One token (q, k, gk [B, H, K], v [B, H, V]) on the cached state, in float32."""
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        s = jnp.exp(gk)[..., None] * cache.state + k[..., :, None] * v[..., None, :]
        o = jnp.einsum("bhk,bhkv->bhv", q * self.head_k ** -0.5, s, precision=HIGHEST)
        return o.astype(self.dtype), cache.replace(state=s)
