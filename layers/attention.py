"""Softmax attention: MHA / GQA / MQA, causal, optional sliding window and attention sinks.

Shape legend:
  B batch, T new tokens, S cache slots, D model width,
  H query heads, G = H / Hkv query heads per key/value head, Hkv key/value heads, Dh head dim.

Token at position t attends to key position j when j <= t and either the layer has no window,
or t - j < window, or j < n_sinks (StreamingLLM, Xiao et al. 2023: the first tokens stay
visible). Keys are rotated (RoPE) before they are cached, as usual.

Caches:
  * full causal: a KV cache of max_len slots, slot j holds position j.
  * window: a ring buffer of n_sinks + window slots, so decode memory does not grow with length.
    Slots [0, n_sinks) hold the sink tokens; the token written at index j >= n_sinks goes to slot
    n_sinks + (j - n_sinks) % window. Each slot also stores the absolute position it holds
    (-1 = empty), so the mask is computed from positions alone and the same code serves
    training, prefill in chunks of any size, and single-token decode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes, refuse_segments_with_cache
from layers.checks import head_errors, rope_errors
from layers.projections import output_projection, projection
from layers.rope import apply_rope
from pallas_kernels.attention import attention as attention_op
from pallas_kernels.attention.xla import softmax_attention  # noqa: F401 (re-exported)
from pallas_kernels.backends import AttentionBackend, resolve_backend
from pallas_kernels.context_parallel import sequence_shards


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    n_heads: int | None = None      # None: model.n_heads
    n_kv_heads: int | None = None   # None: model.n_kv_heads
    window: int | None = None       # None: full causal attention
    n_sinks: int = 0
    rope: bool = True
    # Kernel of the no-cache (training / one-shot prefill) path, through the attention
    # dispatcher (pallas_kernels/attention): "xla" is the masked softmax below; "auto" per
    # platform (pallas_kernels/backends.py); "flash" (GPU) / "splash" (TPU) are Pallas kernels
    # that skip the blocks outside the window. Cached steps always take the XLA path (their
    # keys come from a ring). The kernels build the mask from token indices, i.e. they assume
    # positions = arange(T) (true for the LM's no-cache call).
    backend: AttentionBackend = "auto"


@struct.dataclass
class KVCache(CacheBytes):
    """k, v: [B, S, Hkv, Dh]; pos: [B, S] absolute position in each slot (-1 empty);
    length: [] int32, how many tokens have been written."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    length: jax.Array
    window: int | None = struct.field(pytree_node=False, default=None)
    n_sinks: int = struct.field(pytree_node=False, default=0)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None,
                   n_sinks: int) -> jax.Array:
    """[B, T] x [B, S] positions -> [B, T, S] bool: which keys each query may see."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    if window is not None:
        visible &= (q - k < window) | (k < n_sinks)
    return visible


def window_errors(prefix: str, window: int | None, n_sinks: int, max_len: int) -> list[str]:
    """Config problems of a window / sinks setting (shared by every windowed attention mixer)."""
    errs = []
    if window is not None:
        if window <= 0:
            errs.append(f"{prefix}.window must be > 0 or null, got {window}")
        elif window > max_len:
            errs.append(f"{prefix}.window={window} is larger than model.max_len={max_len}")
    if n_sinks < 0:
        errs.append(f"{prefix}.n_sinks must be >= 0, got {n_sinks}")
    elif n_sinks and window is None:
        errs.append(f"{prefix}.n_sinks={n_sinks} needs a window "
                    "(full attention already sees the first tokens)")
    return errs


def write_cache(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
    """Write T new tokens (k/v [B, T, Hkv, Dh], positions [B, T]) at index cache.length."""
    return write_slots(cache, positions, k=k, v=v)


def _write_at(cache, slot, t: int, new: dict):
    """The T tokens of `new` (field -> [B, T, ...]) into slots slot..slot+T-1 of every field."""
    upd = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        buf, x.astype(buf.dtype), slot, axis=1)
    return cache.replace(**{name: upd(getattr(cache, name), x) for name, x in new.items()},
                         length=cache.length + t)


def write_slots(cache, positions: jax.Array, **new: jax.Array):
    """Write T new tokens at index cache.length into the named per-slot fields of a cache.

    `cache` has `pos`, `length`, `window` and `n_sinks` like KVCache (MLACache does too);
    `new` maps field names to [B, T, ...] arrays, e.g. k=..., v=... for KVCache.
    """
    start, t = cache.length, positions.shape[1]
    if cache.window is None:
        return _write_at(cache, start, t, {**new, "pos": positions})
    if t == 1:
        # One token (a decode step): it goes to one slot, its index's own (sinks keep indices
        # < n_sinks, ring slot n_sinks + (j - n_sinks) mod window for the rest), written in
        # place like the full cache. write_ring_chunk rebuilds every slot of the ring (a
        # gather and a select over all of it) for each token.
        n_sinks, window = cache.n_sinks, cache.window
        slot = jnp.where(start < n_sinks, start, n_sinks + jnp.mod(start - n_sinks, window))
        return _write_at(cache, slot, 1, {**new, "pos": positions})
    return write_ring_chunk(cache, positions, **new)


def write_ring_chunk(cache, positions: jax.Array, **new: jax.Array):
    """write_slots for a ring cache (cache.window set), any T: every slot rebuilt."""
    start = cache.length
    t = positions.shape[1]
    new = {**new, "pos": positions}
    n_sinks, window = cache.n_sinks, cache.window
    # Ring buffer: slot s must hold the newest index j <= end that maps to it; take it from the
    # new chunk when j >= start, else keep the old slot.
    end = start + t - 1
    slots = jnp.arange(n_sinks + window)
    ring = slots - n_sinks
    j_ring = end - jnp.mod(end - n_sinks - ring, window)
    j = jnp.where(slots < n_sinks, slots, j_ring)
    take_new = (j >= start) & (j <= end) & ((slots < n_sinks) | (j >= n_sinks))
    src = jnp.clip(j - start, 0, t - 1)

    def select(buf, new):
        gathered = jnp.take(new, src, axis=1).astype(buf.dtype)
        m = take_new.reshape((1, -1) + (1,) * (buf.ndim - 2))
        return jnp.where(m, gathered, buf)

    return cache.replace(**{name: select(getattr(cache, name), x) for name, x in new.items()},
                         length=start + t)


def read_then_write(cache, positions: jax.Array, **new: jax.Array):
    """Keys for T new tokens over a cache: what the cache held before them plus the tokens
    themselves, then the tokens written (write_slots).

    Returns ({field: [B, S + T, ...] in the new arrays' dtypes}, key positions [B, S + T],
    the new cache). Needed for a chunk into a ring: a ring smaller than the chunk would
    otherwise drop keys that the chunk's early queries still need.
    """
    seen = {name: jnp.concatenate([getattr(cache, name).astype(x.dtype), x], axis=1)
            for name, x in new.items()}
    k_pos = jnp.concatenate([cache.pos, positions], axis=1)
    return seen, k_pos, write_slots(cache, positions, **new)


def write_then_read(cache, positions: jax.Array, **new: jax.Array):
    """The tokens written first (write_slots), then every slot of the cache as keys: same
    returns as read_then_write, with S slots. Right for a full cache (a slot for every token;
    empty slots have position -1 and are masked) and for one token into a ring (the slot it
    takes held index length - window, which its window no longer reaches). Concatenating
    instead would copy the whole cache every decode step (MHA at 16k tokens: 32 MiB per layer
    per token)."""
    cache = write_slots(cache, positions, **new)
    seen = {name: getattr(cache, name).astype(x.dtype) for name, x in new.items()}
    return seen, cache.pos, cache


def cached_keys(cache, positions: jax.Array, *, what: str = "a KV cache", **new: jax.Array):
    """What T new tokens attend over with a cache (write_then_read or read_then_write, see
    there), and the new cache. `what` names the cache in the error for a chunk that does not
    fit a full cache."""
    t = positions.shape[1]
    if cache.window is None and t > cache.pos.shape[1]:
        raise ValueError(f"{t} tokens do not fit {what} of {cache.pos.shape[1]} slots")
    if cache.window is None or t == 1:
        return write_then_read(cache, positions, **new)
    return read_then_write(cache, positions, **new)


def concat_keys(cache, positions: jax.Array, **new: jax.Array):
    """cached_keys' slower form for a ring: every call, one token too, attends over the ring
    plus the new tokens and then rebuilds every slot (write_ring_chunk). The same outputs and
    caches; the baseline that benchmarks/decode.py times (swa_concat) and tests compare the
    in-place step with (both swap it in for cached_keys)."""
    if cache.window is None:
        return cached_keys(cache, positions, **new)
    seen, k_pos, _ = read_then_write(cache, positions, **new)
    return seen, k_pos, write_ring_chunk(cache, positions, **new)


class Attention(nnx.Module):
    """Multi-head softmax attention with GQA, RoPE, optional window and sinks.

    `y, cache = attn(x, positions=pos, cache=cache)`: x [B, T, D], positions [B, T].
    """

    Args = AttentionArgs

    def __init__(self, cfg, args: AttentionArgs, *, rngs: nnx.Rngs):
        self.d_model = cfg.d_model
        self.n_heads = args.n_heads or cfg.n_heads
        self.n_kv_heads = args.n_kv_heads or (cfg.resolved_kv_heads if args.n_heads is None
                                              else self.n_heads)
        self.head_dim = cfg.resolved_head_dim
        self.window = args.window
        self.n_sinks = args.n_sinks
        self.backend = args.backend
        self.use_rope = args.rope
        self.rope_theta = cfg.rope_theta
        self.dtype = jnp.dtype(cfg.dtype)
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = projection(cfg, cfg.d_model, qkv_out, rngs=rngs)
        self.out = output_projection(cfg, self.n_heads * self.head_dim, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: AttentionArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        n_heads = args.n_heads or cfg.n_heads
        n_kv = args.n_kv_heads or (cfg.resolved_kv_heads if args.n_heads is None else n_heads)
        # Heads of its own split d_model, unless the model fixes head_dim.
        own_split = args.n_heads is not None and cfg.head_dim is None
        errs = head_errors(p, n_heads, n_kv_heads=n_kv,
                           width=cfg.d_model if own_split else None)
        if args.rope:
            errs += rope_errors(p, cfg.resolved_head_dim)
        errs += window_errors(p, args.window, args.n_sinks, cfg.max_len)
        return errs

    def cache_slots(self, max_len: int) -> int:
        # A ring keeps `window` slots even when max_len is shorter: a windowed layer can decode
        # past max_len, and it then needs the whole window.
        return max_len if self.window is None else self.n_sinks + self.window

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
        s = self.cache_slots(max_len)
        shape = (batch_size, s, self.n_kv_heads, self.head_dim)
        return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                       pos=jnp.full((batch_size, s), -1, jnp.int32),
                       length=jnp.zeros((), jnp.int32), window=self.window,
                       n_sinks=self.n_sinks)

    def project(self, x: jax.Array, positions: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] at RoPE positions [B, T] -> q [B, T, H, Dh], k, v [B, T, Hkv, Dh]
        (q and k rotated when the layer uses RoPE)."""
        b, t, _ = x.shape
        h, hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = jnp.split(self.qkv(x), [h * dh, (h + hkv) * dh], axis=-1)
        q, k, v = q.reshape(b, t, h, dh), k.reshape(b, t, hkv, dh), v.reshape(b, t, hkv, dh)
        if self.use_rope:
            q, k = apply_rope(q, positions, self.rope_theta), apply_rope(k, positions,
                                                                         self.rope_theta)
        return q, k, v

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: KVCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call): a query sees
        its own document only; `positions` should then be in-document positions (RoPE, window
        and sinks count them), as the LM passes them."""
        refuse_segments_with_cache("attention", segment_ids, cache)
        b, t, _ = x.shape
        dh = self.head_dim
        q, k, v = self.project(x, positions)
        if cache is None:
            keys, values, k_pos = k, v, positions
        else:
            kv, k_pos, cache = cached_keys(cache, positions, k=k, v=v)
            keys, values = kv["k"], kv["v"]
        # The op also when the time axis is sharded over the mesh's sequence axis: its
        # exchange (context_parallel) instead of the partitioner's gathers of the dense form.
        if cache is None and (resolve_backend("attention", self.backend) != "xla"
                              or segment_ids is not None or sequence_shards() is not None):
            o = attention_op(q, k, v, window=self.window, n_sinks=self.n_sinks,
                             scale=dh ** -0.5, backend=self.backend, segment_ids=segment_ids)
        else:
            mask = attention_mask(positions, k_pos, self.window, self.n_sinks)
            o = softmax_attention(q, keys, values, mask, dh ** -0.5)
        return self.out(o.reshape(b, t, -1)), cache
