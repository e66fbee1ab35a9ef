"""Multi-head latent attention (MLA): DeepSeek-V2 (arXiv 2405.04434, Sec. 2.1), DeepSeek-V3
(arXiv 2412.19437, Sec. 2.1.1).

Shape legend:
  B batch, T new tokens, S key slots (cache slots + T when decoding), D model width,
  H heads, Rq q_lora_rank, R kv_lora_rank, N qk_nope_head_dim, P qk_rope_head_dim,
  V v_head_dim. Einsum letters: b t s d h r n p v.

Equations (V2 Sec. 2.1.2-2.1.3, eqs. 9-19; the paper's h_t is x here):
  queries   c_q = RMSNorm(x W_dq) [B, T, Rq];  [q_nope ; q_rope] = c_q W_uq   [B, T, H, N + P]
            (without a low-rank query path: [q_nope ; q_rope] = x W_q)
  latents   [c_kv ; k_rope] = x W_dkv;  c_kv = RMSNorm(c_kv) [B, T, R];  k_rope = RoPE(k_rope)
            [B, T, P], one rotated key shared by all heads
  keys/vals [k_nope_i ; v_i] = c_kv W_ukv_i                                     [B, S, H, N + V]
  scores    (q_nope_i . k_nope_i + RoPE(q_rope_i) . k_rope) * (N + P)^-0.5
  output    y = concat_i(softmax(scores_i) v_i) W_o

Two ways to compute the same thing:
  * expanded: build k_nope and v per head from c_kv, then ordinary attention. Used for training
    and prefill: T queries share the up-projection of S latents.
  * absorbed (V2 Sec. 2.1.2): W_uk folds into the query, W_uv into the output,
        q~_i = q_nope_i W_uk_i^T [R];  score_i,t = q~_i . c_t + q_rope_i . k_rope_t;
        head_i = (sum_t p_i,t c_t) W_uv_i.
    That is multi-query attention with one shared key [c_kv ; k_rope] (R + P wide) and one
    shared value c_kv: a decode step reads the latents once and never up-projects the cache.
The decode cache holds only c_kv and the rotated k_rope: (R + P) values per token per layer
whatever H is (plus the int32 slot positions every cache here keeps), with the same full /
ring-buffer (window + sinks) slot layout as layers/attention.py.

Deviations: RoPE uses this codebase's rotate-half layout (layers/rope.py) where DeepSeek's code
rotates interleaved pairs; the two differ by a fixed permutation of the P rope channels of W_q
and W_dkv, so a model trained from scratch represents the same functions. V3's YaRN context
extension (and its softmax-scale correction) is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.attention import attention_mask, cached_keys, softmax_attention, window_errors
from layers.cache import CacheBytes, refuse_segments_with_cache
from layers.checks import head_errors
from layers.norm import RMSNorm
from layers.projections import output_projection, projection
from layers.rope import apply_rope
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.masks import packed_visibility

ABSORB_MODES = ("decode", "always", "never")


@dataclasses.dataclass(frozen=True)
class MLAArgs:
    # Defaults sized for a d_model-64 model; DeepSeek-V3 uses H 128, Rq 1536, R 512, N 128,
    # P 64, V 128 at d_model 7168.
    n_heads: int | None = None       # None: model.n_heads
    q_lora_rank: int | None = None   # None or 0: queries straight from x (as in DeepSeek-V2-Lite)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    window: int | None = None        # None: full causal attention
    n_sinks: int = 0
    # "decode": absorbed form for single-token steps with a cache, expanded elsewhere;
    # "always" / "never": one form everywhere (the two give the same outputs, see tests).
    absorb: Literal["decode", "always", "never"] = "decode"


@struct.dataclass
class MLACache(CacheBytes):
    """c_kv: [B, S, R] normalized latents; k_rope: [B, S, P] rotated shared RoPE keys;
    pos: [B, S] absolute position in each slot (-1 empty); length: [] int32 tokens written."""

    c_kv: jax.Array
    k_rope: jax.Array
    pos: jax.Array
    length: jax.Array
    window: int | None = struct.field(pytree_node=False, default=None)
    n_sinks: int = struct.field(pytree_node=False, default=0)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of c_kv + k_rope per cached token of one sequence: (R + P) x itemsize. The
        int32 slot positions (4 bytes per slot) are bookkeeping, counted in nbytes only."""
        return (self.c_kv.shape[-1] * self.c_kv.dtype.itemsize
                + self.k_rope.shape[-1] * self.k_rope.dtype.itemsize)


def expand_latents(c_kv: jax.Array, k_rope: jax.Array, w_ukv: jax.Array, *, nope_dim: int
                   ) -> tuple[jax.Array, jax.Array]:
    """The expanded form's keys and values: c_kv [B, S, R], k_rope [B, S, P], W_ukv
    [R, H, N + V] -> k = [c_kv W_uk_i ; k_rope] [B, S, H, N + P], v = c_kv W_uv_i
    [B, S, H, V] (eqs. 12-13, 15). H is W_ukv's: a shard of the heads expands its own."""
    kv = jnp.einsum("bsr,rhn->bshn", c_kv, w_ukv.astype(c_kv.dtype))
    k_nope, v = kv[..., :nope_dim], kv[..., nope_dim:]
    h = w_ukv.shape[1]
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_rope.shape[:2] + (h, k_rope.shape[-1]))
    return jnp.concatenate([k_nope, k_rope], axis=-1), v


def latent_keys(c_kv: jax.Array, k_rope: jax.Array, _unused=None
                ) -> tuple[jax.Array, jax.Array]:
    """The absorbed form's one shared key [c_kv ; k_rope] [B, S, 1, R + P] and value c_kv
    [B, S, 1, R] (V2 Sec. 2.1.2)."""
    return (jnp.concatenate([c_kv, k_rope], axis=-1)[:, :, None, :], c_kv[:, :, None, :])


class MLA(nnx.Module):
    """Multi-head latent attention with optional low-rank queries, sliding window and sinks.

    `y, cache = mla(x, positions=pos, cache=cache)`: x [B, T, D], positions [B, T].
    """

    Args = MLAArgs

    def __init__(self, cfg, args: MLAArgs, *, rngs: nnx.Rngs):
        if args.absorb not in ABSORB_MODES:
            raise ValueError(f"MLA absorb must be one of {', '.join(map(repr, ABSORB_MODES))}, "
                             f"got {args.absorb!r}")
        self.n_heads = args.n_heads or cfg.n_heads
        self.q_lora_rank = args.q_lora_rank or 0
        self.kv_lora_rank = args.kv_lora_rank
        self.nope_dim = args.qk_nope_head_dim
        self.rope_dim = args.qk_rope_head_dim
        self.v_dim = args.v_head_dim
        self.window = args.window
        self.n_sinks = args.n_sinks
        self.absorb = args.absorb
        self.rope_theta = cfg.rope_theta
        self.dtype = jnp.dtype(cfg.dtype)
        h, r = self.n_heads, self.kv_lora_rank
        proj = functools.partial(projection, cfg, rngs=rngs)
        q_out = h * (self.nope_dim + self.rope_dim)
        if self.q_lora_rank:
            self.wq_a = proj(cfg.d_model, self.q_lora_rank)                      # W_dq
            self.q_norm = RMSNorm(self.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = proj(self.q_lora_rank, q_out)                            # W_uq
        else:
            self.wq = proj(cfg.d_model, q_out)
        self.wkv_a = proj(cfg.d_model, r + self.rope_dim)                        # W_dkv
        self.kv_norm = RMSNorm(r, eps=cfg.norm_eps)
        # W_ukv kept as [R, H, N + V] so both forms slice per-head W_uk / W_uv from one tensor.
        self.wkv_b = nnx.Param(nnx.initializers.normal(cfg.init_std)(
            rngs.params(), (r, h, self.nope_dim + self.v_dim), jnp.float32))
        self.out = output_projection(cfg, h * self.v_dim, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: MLAArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        errs = head_errors(p, args.n_heads or cfg.n_heads)
        if args.q_lora_rank is not None and args.q_lora_rank < 0:
            errs.append(f"{p}.q_lora_rank must be >= 0 or null (0/null: no low-rank query "
                        f"path), got {args.q_lora_rank}")
        for key in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(args, key) <= 0:
                errs.append(f"{p}.{key} must be > 0, got {getattr(args, key)}")
        if args.qk_rope_head_dim < 0:
            errs.append(f"{p}.qk_rope_head_dim must be >= 0 (0: no RoPE, Kimi Linear's MLA), "
                        f"got {args.qk_rope_head_dim}")
        if args.qk_rope_head_dim > 0 and args.qk_rope_head_dim % 2:
            errs.append(f"{p}.qk_rope_head_dim must be even (RoPE rotates pairs), "
                        f"got {args.qk_rope_head_dim}")
        errs += window_errors(p, args.window, args.n_sinks, cfg.max_len)
        if args.absorb not in ABSORB_MODES:
            errs.append(f"{p}.absorb: expected one of {', '.join(map(repr, ABSORB_MODES))}, "
                        f"got {args.absorb!r}")
        return errs

    def cache_slots(self, max_len: int) -> int:
        # As attention.py: a ring keeps n_sinks + window slots whatever max_len is.
        return max_len if self.window is None else self.n_sinks + self.window

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> MLACache:
        s = self.cache_slots(max_len)
        return MLACache(c_kv=jnp.zeros((batch_size, s, self.kv_lora_rank), dtype),
                        k_rope=jnp.zeros((batch_size, s, self.rope_dim), dtype),
                        pos=jnp.full((batch_size, s), -1, jnp.int32),
                        length=jnp.zeros((), jnp.int32), window=self.window,
                        n_sinks=self.n_sinks)

    # ------------------------------------------------------------------ projections

    def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> q_nope [B, T, H, N], rotated q_rope [B, T, H, P]."""
        b, t, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q = q.reshape(b, t, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = jnp.split(q, [self.nope_dim], axis=-1)
        if not self.rope_dim:           # NoPE (qk_rope_head_dim 0): positions enter nowhere
            return q_nope, q_rope
        return q_nope, apply_rope(q_rope, positions, self.rope_theta)

    def _latents(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> normalized c_kv [B, T, R], rotated shared k_rope [B, T, P]."""
        c_kv, k_rope = jnp.split(self.wkv_a(x), [self.kv_lora_rank], axis=-1)
        if self.rope_dim:
            k_rope = apply_rope(k_rope[:, :, None, :], positions, self.rope_theta)[:, :, 0]
        return self.kv_norm(c_kv), k_rope

    # ------------------------------------------------------------------ the two forms

    def _expanded(self, q_nope, q_rope, c_kv, k_rope, mask, scale):
        """Per-head keys and values from the latents, then softmax attention -> [B, T, H, V]."""
        k, v = expand_latents(c_kv, k_rope, self.wkv_b[...], nope_dim=self.nope_dim)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        return softmax_attention(q, k, v, mask, scale)

    def _absorbed(self, q_nope, q_rope, c_kv, k_rope, mask, scale):
        """W_uk folded into the query, W_uv into the output: MQA over the latents."""
        w = self.wkv_b[...].astype(q_nope.dtype)
        w_uk, w_uv = w[..., :self.nope_dim], w[..., self.nope_dim:]
        # q~_i = q_nope_i W_uk_i^T, accumulated in float32 and rounded once to the compute dtype.
        q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk,
                           preferred_element_type=jnp.float32).astype(q_nope.dtype)
        q = jnp.concatenate([q_lat, q_rope], axis=-1)                  # [B, T, H, R + P]
        o_lat = softmax_attention(q, *latent_keys(c_kv, k_rope), mask, scale)  # [B, T, H, R]
        return jnp.einsum("bthr,rhv->bthv", o_lat, w_uv, preferred_element_type=jnp.float32
                          ).astype(q_nope.dtype)

    def _sharded(self, q_nope, q_rope, c_kv, k_rope, segment_ids, scale, shards):
        """Time sharded over the mesh's sequence axis (pallas_kernels/context_parallel): the
        latents travel, R + P numbers a token, and each shard up-projects its own heads' keys
        and values from them (expanded form), or attends over them as MQA (absorbed form,
        absorb: always) -> [B, T, H, V]."""
        from pallas_kernels.context_parallel.attention import sharded_attention

        common = dict(window=self.window, n_sinks=self.n_sinks, scale=scale,
                      segment_ids=segment_ids, shards=shards)
        if self.absorb != "always":
            return sharded_attention(
                jnp.concatenate([q_nope, q_rope], axis=-1), c_kv, k_rope, **common,
                expand=functools.partial(expand_latents, nope_dim=self.nope_dim),
                weights=self.wkv_b[...])
        w = self.wkv_b[...].astype(q_nope.dtype)
        w_uk, w_uv = w[..., :self.nope_dim], w[..., self.nope_dim:]
        q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk,
                           preferred_element_type=jnp.float32).astype(q_nope.dtype)
        o_lat = sharded_attention(jnp.concatenate([q_lat, q_rope], axis=-1), c_kv, k_rope,
                                  **common, expand=latent_keys)
        return jnp.einsum("bthr,rhv->bthv", o_lat, w_uv, preferred_element_type=jnp.float32
                          ).astype(q_nope.dtype)

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: MLACache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, MLACache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): a query sees
        its own document only (window and sinks in in-document positions); `positions`
        should be in-document positions (RoPE), as the LM passes them."""
        b, t, _ = x.shape
        refuse_segments_with_cache("mla", segment_ids, cache)
        q_nope, q_rope = self._queries(x, positions)
        c_kv, k_rope = self._latents(x, positions)
        # The scale uses the full query-key width N + P (V2 Sec. 2.1.3), in both forms.
        scale = (self.nope_dim + self.rope_dim) ** -0.5
        shards = sequence_shards()
        if cache is None and shards is not None:
            o = self._sharded(q_nope, q_rope, c_kv, k_rope, segment_ids, scale, shards)
            return self.out(o.reshape(b, t, self.n_heads * self.v_dim)), None
        if cache is None:
            c_all, r_all, k_pos = c_kv, k_rope, positions
        else:
            # The cached latents play the keys' part (layers/attention.cached_keys).
            seen, k_pos, cache = cached_keys(cache, positions, what="an MLA cache", c_kv=c_kv,
                                             k_rope=k_rope)
            c_all, r_all = seen["c_kv"], seen["k_rope"]
        mask = (attention_mask(positions, k_pos, self.window, self.n_sinks)
                if segment_ids is None else packed_visibility(segment_ids, self.window,
                                                              self.n_sinks))
        # Absorbed for decode: a step reads S x (R + P) cached values, where the expanded form
        # would first up-project all S latents to H x (N + V). With many queries (training,
        # prefill) the up-projection is shared, and the expanded products are N + P and V
        # wide per head instead of R + P and R (N, V < R in DeepSeek's settings).
        absorbed = self.absorb == "always" or (self.absorb == "decode" and cache is not None
                                               and t == 1)
        form = self._absorbed if absorbed else self._expanded
        o = form(q_nope, q_rope, c_all, r_all, mask, scale)
        return self.out(o.reshape(b, t, self.n_heads * self.v_dim)), cache
