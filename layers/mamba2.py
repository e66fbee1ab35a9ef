"""Mamba-2 token mixer (SSD, the state-space dual form).

Shape legend:
  B batch, T new tokens, D model width, E inner width (expand * D), H heads, P head dim
  (E = H * P), G groups of B / C, N state dim.

Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality", arXiv:2405.21060, Sec. 7 and Listing 1): one input
projection gives z [E], x [E], B [G, N], C [G, N] and dt [H]; a short causal conv (SiLU) runs
over x, B and C together; per head, with dt = softplus(dt + dt_bias) and A = -exp(A_log),

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T          (state h [N, P] per head)
    y_t = C_t^T h_t + D x_t

then y * SiLU(z) is RMS-normalised (per group of E / G channels, the reference's
norm_before_gate=False) and projected back to D. The scan is a scalar-decay linear attention,
so it runs through pallas_kernels' simple_gla with q = C, k = B, v = dt x, g = dt A, scale 1
(the SSD chunked form is that op's chunked form): every backend of simple_gla, packed
documents included.

Cache: the SSD state [B, H, N, P] (float32) and the conv tail of (x, B, C); its size does not
depend on max_len.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes
from layers.checks import min_errors
from layers.conv import ConvCache, ShortConv
from layers.delta_rule import decay_init
from layers.projections import output_projection, projection
from pallas_kernels.backends import LinearBackend
from pallas_kernels.gla import simple_gla
from pallas_kernels.precision import HIGHEST


@dataclasses.dataclass(frozen=True)
class Mamba2Args:
    expand: int = 2                 # E = expand * d_model
    head_dim: int = 16              # P (E / P heads)
    state_dim: int = 16             # N
    n_groups: int = 1               # G groups sharing B and C (divides the heads)
    conv_width: int = 4             # short causal conv over (x, B, C)
    chunk_size: int = 64            # chunk length of the chunkwise-parallel op
    backend: LinearBackend = "auto"    # simple_gla's backends (pallas_kernels/backends.py)


@struct.dataclass
class Mamba2Cache(CacheBytes):
    """state: [B, H, N, P] float32 SSD state; conv: the (x, B, C) conv's input tail."""

    state: jax.Array
    conv: ConvCache


class Mamba2(nnx.Module):
    """Mamba-2 mixer. `y, cache = layer(x, positions=pos, cache=cache)`: x [B, T, D] ->
    y [B, T, D]; positions are not used (order enters through the scan and the conv)."""

    Args = Mamba2Args

    def __init__(self, cfg, args: Mamba2Args, *, rngs: nnx.Rngs):
        self.inner = e = args.expand * cfg.d_model
        self.head_dim = p = args.head_dim
        self.n_heads = h = e // p
        self.state_dim = n = args.state_dim
        self.n_groups = g = args.n_groups
        self.chunk_size = args.chunk_size
        self.backend = args.backend
        self.precision = cfg.precision
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        self.conv_dim = e + 2 * g * n
        self.in_proj = projection(cfg, cfg.d_model, 2 * e + 2 * g * n + h, rngs=rngs)
        self.conv = ShortConv(self.conv_dim, args.conv_width, dtype=self.dtype, use_bias=True,
                              rngs=rngs)
        a_log, dt_bias = decay_init(rngs.params(), (h,))
        self.A_log, self.dt_bias = nnx.Param(a_log), nnx.Param(dt_bias)
        self.D = nnx.Param(jnp.ones((h,), jnp.float32))
        self.norm_scale = nnx.Param(jnp.ones((e,), jnp.float32))
        self.out = output_projection(cfg, e, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: Mamba2Args, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        errs = min_errors(p, args, "expand", "head_dim", "state_dim", "n_groups", "conv_width",
                          "chunk_size")
        if errs:
            return errs
        e = args.expand * cfg.d_model
        if e % args.head_dim:
            return [f"{p}.head_dim={args.head_dim} must divide the inner width expand x "
                    f"d_model = {e}"]
        if (e // args.head_dim) % args.n_groups:
            return [f"{p}.n_groups={args.n_groups} must divide the heads "
                    f"({e // args.head_dim} = {e} / head_dim {args.head_dim})"]
        return []

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> Mamba2Cache:
        del max_len           # the state is a fixed [N, P] matrix per head
        state = jnp.zeros((batch_size, self.n_heads, self.state_dim, self.head_dim),
                          jnp.float32)
        return Mamba2Cache(state=state, conv=self.conv.init_cache(batch_size, dtype))

    def _gated_norm(self, y: jax.Array, z: jax.Array) -> jax.Array:
        """RMSNorm(y * SiLU(z)) over groups of E / G channels; float32 in and out."""
        b, t, _ = y.shape
        u = (y * jax.nn.silu(z)).reshape(b, t, self.n_groups, -1)
        u = u * jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + self.eps)
        return u.reshape(b, t, self.inner) * self.norm_scale[...]

    def __call__(self, x: jax.Array, *, positions: jax.Array, cache: Mamba2Cache | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Mamba2Cache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): the conv and the
        scan restart at every document start (pallas_kernels/segments.py)."""
        del positions
        b, t, _ = x.shape
        e, h, p, g, n = self.inner, self.n_heads, self.head_dim, self.n_groups, self.state_dim
        z, xbc, dt = jnp.split(self.in_proj(x), [e, e + self.conv_dim], axis=-1)
        xbc, conv_cache = self.conv(xbc, None if cache is None else cache.conv,
                                    segment_ids=segment_ids)
        xbc = jax.nn.silu(xbc.astype(jnp.float32))
        xs, bs, cs = jnp.split(xbc, [e, e + g * n], axis=-1)
        xs = xs.reshape(b, t, h, p)
        # Each group's B / C serves its H / G heads.
        heads = lambda m: jnp.repeat(m.reshape(b, t, g, n), h // g, axis=2)       # [B,T,H,N]
        bs, cs = heads(bs), heads(cs)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...])            # [B, T, H]
        log_decay = -jnp.exp(self.A_log[...]) * dt                                   # dt A <= 0
        v = dt[..., None] * xs                                                       # dt x

        if cache is not None and t == 1:
            # One token: h = exp(dt A) h + B (dt x)^T; y = C^T h.
            state = (jnp.exp(log_decay[:, 0])[..., None, None] * cache.state
                     + jnp.einsum("bhn,bhp->bhnp", bs[:, 0], v[:, 0], precision=HIGHEST))
            y = jnp.einsum("bhn,bhnp->bhp", cs[:, 0], state, precision=HIGHEST)[:, None]
        else:
            op_dtype = self.dtype      # the op's operands in the compute dtype
            y, state = simple_gla(cs.astype(op_dtype), bs.astype(op_dtype), v.astype(op_dtype),
                                  log_decay, scale=1.0, chunk_size=self.chunk_size,
                                  backend=self.backend, precision=self.precision,
                                  initial_state=None if cache is None else cache.state,
                                  output_final_state=cache is not None,
                                  segment_ids=segment_ids)
        y = y.astype(jnp.float32) + self.D[...][:, None] * xs                      # + D x
        y = self._gated_norm(y.reshape(b, t, e), z.astype(jnp.float32))
        out = self.out(y.astype(self.dtype))
        if cache is not None:
            cache = cache.replace(state=state, conv=conv_cache)
        return out, cache
