"""Short gated convolution (Based, Arora et al. 2024, Sec. 4 "BaseConv"; from H3 / Hyena).

Shape legend: B batch, T new tokens, D model width, E hidden width (D * expand), W conv width.

    u = x W_in,  g = x W_gate                                  ([B, T, E] each)
    y = (ShortConv_W(u) * g) W_out                             ([B, T, D])

Based interleaves this with its linear and sliding-window attention: a short causal filter
(width 3-4) gives exact local token mixing (e.g. looking at the previous token, the building
block of induction heads), which the global, low-precision Taylor attention is poor at.
The paper's layer adds the input back (y = conv(u) * Linear(u) + u); here the block's residual
connection already does that, so the mixer leaves it out.

Decode cache: the conv's last W - 1 inputs (layers/conv.py), independent of length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from layers.checks import min_errors
from layers.conv import ConvCache, ShortConv
from layers.projections import output_projection, projection


@dataclasses.dataclass(frozen=True)
class GatedConvArgs:
    width: int = 4      # filter length: Based uses short filters
    expand: int = 1     # hidden width = model.d_model * expand


class GatedConv(nnx.Module):
    """`y, cache = conv(x, positions=pos, cache=cache)`: x [B, T, D]; positions are unused."""

    Args = GatedConvArgs

    def __init__(self, cfg, args: GatedConvArgs, *, rngs: nnx.Rngs):
        self.hidden = cfg.d_model * args.expand
        self.dtype = jnp.dtype(cfg.dtype)
        self.in_proj = projection(cfg, cfg.d_model, 2 * self.hidden, rngs=rngs)
        # A bias on the filter, like PyTorch's Conv1d default in the BaseConv reference code.
        self.conv = ShortConv(self.hidden, args.width, dtype=self.dtype, use_bias=True,
                              rngs=rngs)
        self.out = output_projection(cfg, self.hidden, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: GatedConvArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        return min_errors(f"model.mixer_args.{name}", args, "width", "expand")

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> ConvCache:
        del max_len   # the filter only ever looks W - 1 tokens back
        return self.conv.init_cache(batch_size, dtype)

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: ConvCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, ConvCache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): the filter's
        taps never reach into the previous document."""
        del positions
        u, g = jnp.split(self.in_proj(x), 2, axis=-1)        # [B, T, E] each
        u, cache = self.conv(u, cache, segment_ids=segment_ids)
        return self.out((u * g).astype(self.dtype)), cache
