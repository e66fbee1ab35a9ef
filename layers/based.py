"""Based linear attention (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff"): normalized linear attention with a 2nd-order Taylor feature map.

Shape legend:
  B batch, T new tokens, D model width, H heads, Fd feature dim d' (q/k projection width per
  head), F = 1 + Fd + Fd^2 Taylor features, V value dim per head (D // H).

Per head (Sec. 3.2 / Eq. 2 of the paper):

    phi(x) = [1, x / d'^(1/4), vec(x x^T) / (sqrt(2) sqrt(d'))]              (F = 273 for d' 16)
    phi(q).phi(k) = 1 + s + s^2 / 2,  s = q.k / sqrt(d')   (Taylor expansion of exp(s) to 2nd order)
    y_i = phi(q_i)^T sum_{j<=i} phi(k_j) v_j^T / (phi(q_i)^T sum_{j<=i} phi(k_j) + eps)

No RoPE: the Taylor kernel already ranks keys by similarity, and Based leaves position to the
short convolutions and sliding-window attention it is interleaved with.

Why the normalizer is positive although phi(x) has signed entries: the denominator is
sum_{j<=i} phi(q_i).phi(k_j) = sum_j (1 + s_j + s_j^2 / 2) = sum_j ((s_j + 1)^2 + 1) / 2 >= i / 2,
so it never crosses zero (only the dot product, not each feature, has to be non-negative).

Decode state per head: S [F, V] and the key-feature sum z [F], float32, independent of length.

Two ways to compute a cache-free call, the same numbers (phi(q).phi(k) = 1 + s + s^2 / 2 is an
identity, tested in tests/test_based.py):
  * features: phi over F = 273 channels, then the chunked linear-attention op (any T; its cost
    grows with T, and its state is what decode carries);
  * quadratic (the "parallel form", as softmax attention is computed): the causal T x T kernel
    matrix 1 + s + s^2 / 2 from the Fd-wide scores, y = (K~ v) / (K~ 1 + eps). Per head it costs
    ~T^2 (Fd + V) against the features' ~T F (C + V) for chunk C (break-even near T ~ 700 at
    Fd 16, C 64), and it never materializes the 273-wide features or their outer products for
    the backward pass. `python benchmarks/based_forms.py` (one Based layer, d_model 64, 4 heads,
    batch 16, forward + backward, both forms side by side, 2-core CPU; benchmarks/results/
    based_forms_cpu.md): features / quadratic = 7.0x at T 32, 12x at 64, 10x at 128, 3.3x at
    256, 2.5x at 512 (float32; bf16 alike). Hence BasedArgs.quadratic_max_len = 512: the T^2
    scores stay small (16 x 4 x 512^2 float32 = 67 MB at that batch), longer calls take the
    features (a GPU or TPU may prefer a shorter cut: it is a config knob). Decode and
    cached prefill always use the features: their state is what decode carries.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes
from layers.checks import head_errors
from layers.projections import output_projection, projection
from pallas_kernels.backends import OwnLinearBackend
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.linear_attention import EPS, linear_attention
from pallas_kernels.masks import packed_visibility
from pallas_kernels.precision import HIGHEST
from pallas_kernels.segments import zero_padding


@dataclasses.dataclass(frozen=True)
class BasedArgs:
    n_heads: int | None = None      # None: model.n_heads
    feature_dim: int = 16           # d': q/k projection width per head (the paper's 16)
    chunk_size: int = 64            # chunk length of the "xla" (chunkwise) backend
    # Cache-free calls of at most this many tokens take the quadratic form (module docstring);
    # longer ones, and every call with a cache, the features and `backend`. 0: features always.
    quadratic_max_len: int = 512
    backend: OwnLinearBackend = "auto"    # pallas_kernels/backends.py


@struct.dataclass
class BasedCache(CacheBytes):
    """state: [B, H, F, V] float32, sum_j phi(k_j) v_j^T; z: [B, H, F] float32, sum_j phi(k_j)."""

    state: jax.Array
    z: jax.Array


def taylor_feature_map(x: jax.Array) -> jax.Array:
    """[..., Fd] -> [..., 1 + Fd + Fd^2]: phi(x) = [1, x', vec(x' x'^T) / sqrt(2)], x' = x Fd^-1/4.

    Computed in float32 (the square terms lose precision first) and returned in x's dtype, so
    that every path (full forward, chunked prefill, single-token step) sees the same features.
    """
    fd = x.shape[-1]
    x32 = x.astype(jnp.float32) * fd ** -0.25   # x'.y' = x.y / sqrt(d'), as in Eq. 2
    outer = (x32[..., :, None] * x32[..., None, :]).reshape(*x.shape[:-1], fd * fd)
    ones = jnp.ones((*x.shape[:-1], 1), jnp.float32)
    return jnp.concatenate([ones, x32, outer * 2 ** -0.5], axis=-1).astype(x.dtype)


def taylor_kernel_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                            segment_ids: jax.Array | None = None) -> jax.Array:
    """The quadratic form of a cache-free Based call (module docstring), in float32.

    q, k [B, T, H, Fd] projections (before the feature map), v [B, T, H, V] -> o [B, T, H, V]:
    o_i = sum_{j<=i} K~_ij v_j / (sum_{j<=i} K~_ij + EPS), K~_ij = 1 + s_ij + s_ij^2 / 2,
    s_ij = q_i.k_j / sqrt(Fd). With segment_ids [B, T] (0 = padding) j ranges over i's own
    document only and padding rows are 0, as the linear-attention op's features give them.
    With the time axis sharded (pallas_kernels/context_parallel) each shard's queries take the
    all-gathered keys and values, as softmax attention's all-gather form.
    """
    if segment_ids is not None:   # padding inputs may be anything (NaN too): zero them first,
        q, k, v = zero_padding(segment_ids, q, k, v)   # so no 0 * NaN reaches a sum or a grad
    shards = sequence_shards()
    if shards is not None:
        from pallas_kernels.context_parallel.attention import sharded_attention

        return sharded_attention(q, k, v, window=None, n_sinks=0, scale=None,
                                 segment_ids=segment_ids, shards=shards, core=taylor_kernel)
    t = q.shape[1]
    # Causal within each document (padding sees only padding, whose zeroed v gives o = 0).
    mask = (jnp.tril(jnp.ones((t, t), bool))[None] if segment_ids is None
            else packed_visibility(segment_ids, None, 0))                     # [B, T, T]
    return taylor_kernel(q, k, v, mask)


def taylor_kernel(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """taylor_kernel_attention's core: q [B, Tq, H, Fd] over k [B, S, H, Fd], v [B, S, H, V]
    under mask [B | 1, Tq, S] -> [B, Tq, H, V] float32."""
    fd = q.shape[-1]
    # float32, as taylor_feature_map computes the features: the square doubles a rounding
    # error, and the sums run over up to T terms. EPS is the op's, so both forms normalize alike.
    s = jnp.einsum("bihf,bjhf->bhij", q.astype(jnp.float32), k.astype(jnp.float32),
                   precision=HIGHEST) * fd ** -0.5
    kern = jnp.where(mask[:, None], 1.0 + s + 0.5 * s * s, 0.0)          # [B, H, Tq, S]
    num = jnp.einsum("bhij,bjhv->bihv", kern, v.astype(jnp.float32), precision=HIGHEST)
    den = jnp.sum(kern, axis=-1).transpose(0, 2, 1)[..., None]           # [B, Tq, H, 1]
    return num / (den + EPS)


class Based(nnx.Module):
    """Based linear attention mixer.

    `y, cache = based(x, positions=pos, cache=cache)`: x [B, T, D]; positions are unused
    (no RoPE) but accepted for the common mixer signature.
    """

    Args = BasedArgs

    def __init__(self, cfg, args: BasedArgs, *, rngs: nnx.Rngs):
        self.n_heads = args.n_heads or cfg.n_heads
        self.feature_dim = args.feature_dim
        self.n_features = 1 + args.feature_dim + args.feature_dim ** 2
        self.head_v = cfg.d_model // self.n_heads
        self.chunk_size = args.chunk_size
        self.quadratic_max_len = args.quadratic_max_len
        self.backend = args.backend
        self.precision = cfg.precision
        self.dtype = jnp.dtype(cfg.dtype)
        h, fd = self.n_heads, self.feature_dim
        self.qkv = projection(cfg, cfg.d_model, h * (2 * fd + self.head_v), rngs=rngs)
        self.out = output_projection(cfg, h * self.head_v, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: BasedArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        errs = head_errors(p, args.n_heads or cfg.n_heads, width=cfg.d_model)
        if args.feature_dim <= 0:
            errs.append(f"{p}.feature_dim must be > 0, got {args.feature_dim}")
        if args.chunk_size <= 0:
            errs.append(f"{p}.chunk_size must be > 0, got {args.chunk_size}")
        if args.quadratic_max_len < 0:
            errs.append(f"{p}.quadratic_max_len must be >= 0 (0: never), "
                        f"got {args.quadratic_max_len}")
        return errs

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> BasedCache:
        # The state is a running sum over all past tokens: float32 whatever `dtype` is, and its
        # size does not depend on max_len.
        del max_len, dtype
        shape = (batch_size, self.n_heads, self.n_features)
        return BasedCache(state=jnp.zeros((*shape, self.head_v), jnp.float32),
                          z=jnp.zeros(shape, jnp.float32))

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: BasedCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, BasedCache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): the state and
        its normalizer restart at every document start (pallas_kernels/segments.py)."""
        del positions
        b, t, _ = x.shape
        h, fd, dv = self.n_heads, self.feature_dim, self.head_v
        q, k, v = jnp.split(self.qkv(x), [h * fd, 2 * h * fd], axis=-1)
        if cache is None and t <= self.quadratic_max_len:
            o = taylor_kernel_attention(q.reshape(b, t, h, fd), k.reshape(b, t, h, fd),
                                        v.reshape(b, t, h, dv), segment_ids)
            return self.out(o.reshape(b, t, h * dv).astype(self.dtype)), None
        q = taylor_feature_map(q.reshape(b, t, h, fd))      # [B, T, H, F]
        k = taylor_feature_map(k.reshape(b, t, h, fd))
        v = v.reshape(b, t, h, dv)
        # scale=1: the 1/sqrt(d') temperature is already inside the feature map.
        op = dict(scale=1.0, normalize=True, chunk_size=self.chunk_size, backend=self.backend,
                  precision=self.precision)
        if cache is None:
            o, _ = linear_attention(q, k, v, segment_ids=segment_ids, **op)
        elif t == 1:
            o, cache = self._step(q[:, 0], k[:, 0], v[:, 0], cache)
            o = o[:, None]
        else:
            o, (s, z) = linear_attention(q, k, v, initial_state=(cache.state, cache.z),
                                         output_final_state=True, **op)
            cache = cache.replace(state=s, z=z)
        return self.out(o.reshape(b, t, h * dv).astype(self.dtype)), cache

    def _step(self, q, k, v, cache: BasedCache) -> tuple[jax.Array, BasedCache]:
        """One token (q, k [B, H, F], v [B, H, V]) on the cached state, in float32."""
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        s = cache.state + k[..., :, None] * v[..., None, :]
        z = cache.z + k
        num = jnp.einsum("bhf,bhfv->bhv", q, s, precision=HIGHEST)
        # Same EPS as the op, so the step and the chunked paths agree to rounding.
        o = num / (jnp.sum(q * z, axis=-1, keepdims=True) + EPS)
        return o.astype(self.dtype), cache.replace(state=s, z=z)
