"""Titans MAC (memory as a context) and MAG (memory as a gate) as token mixers, built on the
memory of layers/titans.py (its functional core: qkv, initial_state, memorize, retrieve,
readout).

Shape legend:
  B batch, T new tokens, D model width, C segment length (MAC), N segments, P persistent
  tokens, Ha attention heads, Hkv key/value heads, Dh attention head dim, H memory heads,
  K memory head dim, L memory depth.

Titans (Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to Memorize at Test Time",
arXiv:2501.00663). M_t below is the memory of layers/titans.py after t writes; phi(u) is its
input path on a stream u (projections, causal short convs, SiLU, L2 norms, and the gates theta,
eta, alpha); R(o, u) its readout (per-head RMSNorm, SiLU(u W_g) gate, projection to D).

MAC (Sec. 4.1). The sequence is cut into segments S_n of C tokens (counted from the first token).
For token i of segment n (local index i):

    q^x = phi_q(x)                         the memory's query path on x (conv across segments)
    h_i = R(M_{n-1}*(q^x_i), x_i)          retrieval from the memory after segments < n
    y_i = W_O Attn(q(x_i); [p_1..p_P || h_0..h_i || x_0..x_i])
    memory write with y: (q^y, k^y, v^y, theta, eta, alpha) = phi(y), a second stream
        through the same memory projections, with its own conv tails; the memory runs over the
        y tokens in order (its chunk schedule continues across segments)
    o_i = M_t*(q^y_i), t = token i's own write (the memory's read rule)
    out_i = W_G (RMSNorm(y_i) * sigmoid(RMSNorm(R(o_i, y_i))))

  Choices and deviations. (1) The attention sees h_j only for j <= i: h_j depends on token j
  through q^x, so the paper's full attention over h would let a query see later tokens. (2) The
  paper's output y_t (x) M*_t(y_t) reads the memory after the whole segment's write, which also
  leaks later tokens of the segment; each token reads after its own write instead. (3) h lives
  in the memory's head space; the memory's own readout R maps it to D, where the attention's
  key / value projections take it like an input token. (4) RoPE uses the positions of the
  paper's concatenated context S~: p_k at k, h_j at P + j, x_j at P + C + j (the same in every
  segment, so attention is translation invariant across segments). (5) The product (x) is the
  per-branch normalisation and sigmoid gate the paper describes for MAG, followed by an output
  projection W_G (GPT-2 scaled init) so the mixer output starts at the residual branch's scale.
  Persistent tokens p (learnable, in the normed input space) are attention context only; the
  memory does not process them (the paper prepends them to the attention's input).

MAG (Sec. 4.2), over x~ = [p_1..p_P || x]:

    y = SWA(x~)                            sliding window; the P persistent tokens are sinks
    m = R(M(phi(x~)))                      the MAL memory layer (layers/titans.TitansMemory)
    out = W_G (RMSNorm(y) * sigmoid(RMSNorm(m)))          per-branch norm, then the gate

  Both branches see the same P learnable tokens (TitansMemory's own persistent tokens): the
  attention as sink keys at positions 0..P-1 (real tokens at P + t), always visible whatever
  the window; the memory as its first P tokens (their outputs dropped). The outputs of both
  branches pass their own projection before the gate (they are the Attention and TitansMemory
  modules, unchanged); W_G is as in MAC.

Memory settings are TitansArgs' (same names), theta_max 0.01 by default as there (its docstring
says why larger rates diverge). MAC is the more exposed: attention outputs y are alike from
token to token, so a chunk's keys nearly repeat; on configs/titans_mac.yaml theta_max = 1 went
to NaN within 30 training steps, 0.1 trained 80 steps cleanly.

Packed documents (segment_ids, cache-free call). MAC: each document's segments and memory
chunks count from its own first token (TitansMAC.packed_forward lays the documents out
segment-aligned and restarts the memory and conv tails at each; an exact token-by-token path
covers rows that do not fit). MAG: the memory branch is TitansMemory's packed path (every
document after the persistent tokens), the attention branch masks so that each document sees
the persistent tokens and its own window (TitansMAG._prefixed_attention).

Decode. MACCache: the memory state (float32) after the last token, the memory weights at the
current segment's start (for h), the segment's keys / values and those of its h's (C slots
each: slot j holds local index j), the conv tails of the x and y streams, and the token count.
Its size depends on C, not on max_len. A call with a cache runs the one-token step over the
new tokens (a lax.scan), so prefill in chunks of any size follows the same segment grid and
memory chunk schedule as the full pass; the full pass is parallel within each segment (a
lax.scan over segments). MAGCache: the attention's ring (P sinks + window slots) and the
TitansCache; both are constant in max_len.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.attention import Attention, AttentionArgs, KVCache, softmax_attention
from layers.cache import CacheBytes, refuse_segments_with_cache
from layers.conv import ConvCache
from layers.norm import RMSNorm
from layers.projections import output_projection
from layers.titans import TitansArgs, TitansCache, TitansMemory
from layers.titans_mac_sharded import sharded_mac_forward
from pallas_kernels.backends import TitansBackend
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.masks import packed_visibility
from pallas_kernels.segments import document_layout, document_positions
from pallas_kernels.titans import TitansState


@dataclasses.dataclass(frozen=True)
class _MemorySettings:
    """The memory's settings, passed to layers/titans.TitansArgs (same names and meaning)."""

    n_heads: int | None = None      # memory heads; None: model.n_heads
    head_dim: int | None = None     # K; None: model.d_model // n_heads
    memory_depth: int = 2           # L_M: 1 = matrix memory; >= 2 an MLP with SiLU
    memory_expand: float = 2.0      # hidden width E = int(K * memory_expand)
    conv_width: int = 4             # short causal conv on the memory's q, k and v
    chunk_size: int = 16            # b: gradients at the chunk-start weights
    theta_max: float = 0.01         # inner learning-rate cap (larger diverges: titans.py)
    grad_clip: float | None = 1.0   # per-token gradient norm cap (titans.py); None: off
    backend: TitansBackend = "auto"    # pallas_kernels/backends.py


@dataclasses.dataclass(frozen=True)
class TitansMACArgs(_MemorySettings):
    segment_length: int = 32        # C: attention spans one segment; memory read per segment
    n_persistent: int = 4           # P learnable tokens at the front of every segment's context
    rope: bool = True               # RoPE at the positions of [persistent || h || segment]


@dataclasses.dataclass(frozen=True)
class TitansMAGArgs(_MemorySettings):
    window: int = 64                # sliding window of the attention branch
    n_persistent: int = 4           # P learnable tokens: attention sinks and memory prefix
    rope: bool = True


def _memory_args(args: _MemorySettings, n_persistent: int) -> TitansArgs:
    names = {f.name for f in dataclasses.fields(_MemorySettings)}
    return TitansArgs(n_persistent=n_persistent, **{n: getattr(args, n) for n in names})


class _OutputGate(nnx.Module):
    """out = W_G (RMSNorm(y) * sigmoid(RMSNorm(m))): y, m [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.dtype = jnp.dtype(cfg.dtype)
        self.y_norm = RMSNorm(d, eps=cfg.norm_eps)
        self.m_norm = RMSNorm(d, eps=cfg.norm_eps)
        self.out = output_projection(cfg, d, rngs=rngs)

    def __call__(self, y: jax.Array, m: jax.Array) -> jax.Array:
        gate = jax.nn.sigmoid(self.m_norm(m).astype(jnp.float32))
        return self.out((self.y_norm(y).astype(jnp.float32) * gate).astype(self.dtype))


def _unit_tokens(rngs: nnx.Rngs, n: int, d: int) -> nnx.Param | None:
    # Persistent tokens live in the block's normed input space, so they start at unit scale.
    return nnx.Param(jax.random.normal(rngs.params(), (n, d), jnp.float32)) if n else None


# ---------------------------------------------------------------------------------------- MAC


@struct.dataclass
class MACCache(CacheBytes):
    """k, v, hk, hv: [B, C, Hkv, Dh] keys (RoPE'd) and values of the current segment's tokens
    and of their retrieved tokens h, slot j = local index j (cache dtype); segment_memory: the
    memory weights at the segment start, a tuple of L arrays [B, H, in, out] float32; state:
    TitansState after the last token (float32); x_conv: the memory's query-conv tail on x;
    y_conv: its q/k/v conv tails on y (float32, [B, W - 1, H*K]); length: [] int32 tokens so
    far."""

    k: jax.Array
    v: jax.Array
    hk: jax.Array
    hv: jax.Array
    segment_memory: tuple
    state: TitansState
    x_conv: ConvCache
    y_conv: tuple
    length: jax.Array


class TitansMAC(nnx.Module):
    """Titans memory as a context: `y, cache = mac(x, positions=pos, cache=cache)`, x [B, T, D].

    Positions are unused: the segment grid counts from the first token (the cache's length in
    decode), and RoPE uses positions inside each segment's context."""

    Args = TitansMACArgs

    def __init__(self, cfg, args: TitansMACArgs, *, rngs: nnx.Rngs):
        self.segment_length = args.segment_length
        self.n_persistent = args.n_persistent
        self.memory = TitansMemory(cfg, _memory_args(args, 0), rngs=rngs)
        self.attn = Attention(cfg, AttentionArgs(rope=args.rope), rngs=rngs)
        self.gate = _OutputGate(cfg, rngs=rngs)
        self.persistent = _unit_tokens(rngs, args.n_persistent, cfg.d_model)

    @staticmethod
    def check_config(cfg, args: TitansMACArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        errs = []
        if args.segment_length <= 0:
            errs.append(f"{p}.segment_length must be > 0, got {args.segment_length}")
        elif args.segment_length > cfg.max_len:
            errs.append(f"{p}.segment_length={args.segment_length} is larger than "
                        f"model.max_len={cfg.max_len}")
        if args.n_persistent < 0:
            errs.append(f"{p}.n_persistent must be >= 0, got {args.n_persistent}")
        errs += TitansMemory.check_config(cfg, _memory_args(args, 0), name)
        errs += Attention.check_config(cfg, AttentionArgs(rope=args.rope), name)
        return errs

    # -------------------------------------------------------------------------- pieces

    def _persistent_kv(self, b: int, dtype):
        """Keys / values [B, P, Hkv, Dh] of the persistent tokens (RoPE positions 0..P-1);
        recomputed from the params on every call, so a cache never holds stale ones."""
        p = self.n_persistent
        w = jnp.zeros((0, self.attn.d_model), dtype) if p == 0 else self.persistent[...]
        tokens = jnp.broadcast_to(w.astype(dtype), (b, *w.shape))
        _, k, v = self.attn.project(tokens, jnp.broadcast_to(jnp.arange(p), (b, p)))
        return k, v

    def _memory_query(self, x: jax.Array, conv: ConvCache | None):
        """q^x [B, T, H, K]: the memory's query path on x. TitansMemory.qkv also computes k, v
        and the gates, unused here (dropped by XLA under jit); it takes three conv tails, so the
        query tail is passed for all three and only the query's new tail is kept."""
        (q, *_), new = self.memory.qkv(x, None if conv is None else (conv,) * 3)
        return q, None if new is None else new[0]

    def _retrieved_kv(self, qx, x, memory, pos):
        """h = R(M*(q^x), x) with `memory` (the weights at the segment start) -> its keys and
        values [B, T, Hkv, Dh] at RoPE positions pos [B, T]."""
        h = self.memory.readout(self.memory.retrieve(qx, memory), x)
        _, k, v = self.attn.project(h, pos)
        return k, v

    def _attend(self, q, keys, values, mask):
        """q [B, T, Ha, Dh] over keys / values [B, S, Hkv, Dh], mask [B, T, S] -> y [B, T, D]."""
        b, t = q.shape[:2]
        o = softmax_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask,
                              self.attn.head_dim ** -0.5)
        return self.attn.out(o.reshape(b, t, -1))

    def _write_and_gate(self, y, state: TitansState, conv: tuple):
        """Writes y [B, T, D] into the memory (read after each token's own write) and gates:
        -> (out [B, T, D], state, conv tails)."""
        (q, k, v, theta, eta, alpha), conv = self.memory.qkv(y, conv)
        o, state = self.memory.memorize(q, k, v, theta, eta, alpha, state)
        return self.gate(y, self.memory.readout(o, y)), state, conv

    def _init_conv(self, b: int) -> tuple:
        m = self.memory
        return tuple(c.init_cache(b, jnp.float32) for c in (m.q_conv, m.k_conv, m.v_conv))

    # -------------------------------------------------------------------------- contract

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> MACCache:
        """An empty cache; max_len is unused (attention spans one segment)."""
        del max_len
        a = self.attn
        shape = (batch_size, self.segment_length, a.n_kv_heads, a.head_dim)
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        # One buffer per leaf (initial_state shares M_0 between fields): generate.py donates
        # the cache, and a buffer donated twice is an error.
        state = jax.tree.map(jnp.array, self.memory.initial_state(batch_size))
        return MACCache(k=zeros(), v=zeros(), hk=zeros(), hv=zeros(),
                        segment_memory=jax.tree.map(jnp.array, state.memory), state=state,
                        x_conv=self.memory.q_conv.init_cache(batch_size, jnp.float32),
                        y_conv=self._init_conv(batch_size), length=jnp.zeros((), jnp.int32))

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: MACCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, MACCache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call; packed_forward)."""
        del positions
        refuse_segments_with_cache("TitansMAC", segment_ids, cache)
        shards = sequence_shards() if cache is None else None
        if shards is not None:
            # Time sharded over the mesh's sequence axis: the segment scan as a pipeline.
            return sharded_mac_forward(self, x, segment_ids, shards), None
        if segment_ids is not None:
            return self.packed_forward(x, segment_ids), None
        if cache is None:
            return self._forward(x), None
        return self._decode(x, cache)

    def _forward(self, x: jax.Array) -> jax.Array:
        """The full pass: a lax.scan over segments, parallel inside each."""
        b, t, d = x.shape
        c = self.segment_length
        n = -(-t // c)
        # Padding at the end only: everything is causal, so it changes no real output.
        xp = jnp.pad(x, ((0, 0), (0, n * c - t), (0, 0)))
        qx, _ = self._memory_query(xp, None)
        return self._segments(xp, qx)[:, :t]

    def _segments(self, xp: jax.Array, qx: jax.Array, opens: jax.Array | None = None,
                  start: tuple | None = None, capture: jax.Array | None = None):
        """xp [B, N*C, D] and its memory queries -> out [B, N*C, D], segment by segment; opens
        [B, N] bool (packed documents): the memory and the y-stream conv tails restart at the
        segments marked. start: (TitansState, y conv tails) before the first segment (None:
        the initial ones; the state's offset must be 0). capture: [B] int, also return, per
        row, the (state, conv tails) entering segment capture[b] (N: after the last), the
        state without its offset (0 at every segment start of this path)."""
        b, tp, d = xp.shape
        c, p = self.segment_length, self.n_persistent
        n = tp // c
        local = jnp.arange(n * c) % c
        q, k, v = self.attn.project(xp, jnp.broadcast_to(p + c + local, (b, n * c)))
        pk, pv = self._persistent_kv(b, xp.dtype)
        h_pos = jnp.broadcast_to(p + jnp.arange(c), (b, c))
        causal = jnp.tril(jnp.ones((c, c), bool))
        mask = jnp.concatenate([jnp.ones((c, p), bool), causal, causal], axis=1)
        mask = jnp.broadcast_to(mask, (b, c, p + 2 * c))
        fresh = (self.memory.initial_state(b), self._init_conv(b))
        kept_fields = ("memory", "momentum", "chunk_start")

        def captured(state, conv):
            return tuple(getattr(state, f) for f in kept_fields), conv

        def body(carry, seg):
            (state, conv), kept = carry
            x_s, qx_s, q_s, k_s, v_s, opens_s, index = seg
            if opens is not None:
                pick = lambda f, a: jnp.where(  # noqa: E731
                    opens_s.reshape((b,) + (1,) * (a.ndim - 1)), f, a)
                # The offset is one scalar for the batch; packed_forward only takes this path
                # when every segment starts a memory chunk, so it is 0 here in every row.
                state = state._replace(**{f: jax.tree.map(pick, getattr(fresh[0], f),
                                                          getattr(state, f))
                                          for f in ("memory", "momentum", "chunk_start")})
                conv = jax.tree.map(pick, fresh[1], conv)
            if capture is not None:
                here = capture == index                                           # [B]
                kept = jax.tree.map(lambda now, k: jnp.where(
                    here.reshape((b,) + (1,) * (k.ndim - 1)), now, k), captured(state, conv),
                    kept)
            hk, hv = self._retrieved_kv(qx_s, x_s, state.memory, h_pos)   # M_{n-1}
            y = self._attend(q_s, jnp.concatenate([pk, hk, k_s], axis=1),
                             jnp.concatenate([pv, hv, v_s], axis=1), mask)
            out, state, conv = self._write_and_gate(y, state, conv)
            return ((state, conv), kept), out

        segs = lambda a: jnp.moveaxis(a.reshape(b, n, c, *a.shape[2:]), 1, 0)  # noqa: E731
        flags = jnp.zeros((n, b), bool) if opens is None else opens.T
        first = fresh if start is None else start
        carry = (first, captured(*first))
        (last, kept), out = jax.lax.scan(body, carry, (*(segs(a) for a in (xp, qx, q, k, v)),
                                                       flags, jnp.arange(n)))
        out = jnp.moveaxis(out, 0, 1).reshape(b, n * c, d)
        if capture is None:
            return out
        after = (capture >= n).reshape(b)
        kept = jax.tree.map(lambda now, k: jnp.where(
            after.reshape((b,) + (1,) * (k.ndim - 1)), now, k), captured(*last), kept)
        return out, kept

    def packed_forward(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Packed documents, x [B, T, D] -> out [B, T, D] (0 at padding): each document runs as
        alone, its segments and memory chunks counted from its own first token.

        Fast path: the documents laid out segment-aligned (segments.document_layout, twice the
        row's segments of room), the memory query convs told the documents, and the segment
        scan restarting the memory at each document. When a row's documents need more
        segments than that, or segment_length is not a multiple of the memory's chunk_size
        (the batch-wide chunk offset would then differ between rows), the exact token-by-token
        form runs instead: the decode step per row, its cache reset at each document start
        (lax.cond; both are compiled)."""
        b, t, d = x.shape
        c = self.segment_length
        n = 2 * -(-t // c)
        lay = document_layout(segment_ids, c, n)
        real = segment_ids != 0
        bi = jnp.arange(b)[:, None]

        def fast(x):
            xb = jnp.zeros((b, n * c, d), x.dtype).at[bi, lay.slot].set(x, mode="drop")
            (qx, *_), _ = self.memory.qkv(xb, segment_ids=lay.segment_ids)
            out = self._segments(xb, qx, lay.opens)[bi, jnp.minimum(lay.slot, n * c - 1)]
            return jnp.where(real[..., None], out, 0).astype(x.dtype)

        def exact(x):
            fresh = self.init_cache(1, 0, dtype=x.dtype)
            opens = real & (document_positions(segment_ids) == 0)

            def row(x_r, opens_r, real_r):
                def step(cache, inputs):
                    x_t, opens_t, real_t = inputs
                    cache = jax.tree.map(lambda f, a: jnp.where(opens_t, f, a), fresh, cache)
                    y, new = self._decode(x_t[None, None], cache)
                    new = jax.tree.map(lambda a, o: jnp.where(real_t, a, o), new, cache)
                    return new, jnp.where(real_t, y[0, 0], 0).astype(x.dtype)

                return jax.lax.scan(step, fresh, (x_r, opens_r, real_r))[1]

            return jax.vmap(row)(x, opens, real)

        if c % self.memory.chunk_size:
            return exact(x)
        return jax.lax.cond(lay.fits, fast, exact, x)

    def _decode(self, x: jax.Array, cache: MACCache, qx: jax.Array | None = None
                ) -> tuple[jax.Array, MACCache]:
        """Prefill or decode: the one-token step over the new tokens, in order. qx: their
        memory queries when already computed (the cache's x conv tail is then left as is)."""
        b, t, _ = x.shape
        c, p = self.segment_length, self.n_persistent
        if qx is None:
            qx, x_conv = self._memory_query(x, cache.x_conv)
        else:
            x_conv = cache.x_conv
        local = (cache.length + jnp.arange(t)) % c
        q, k, v = self.attn.project(x, jnp.broadcast_to(p + c + local, (b, t)))
        pk, pv = self._persistent_kv(b, x.dtype)

        def step(cache: MACCache, tok):
            x_t, qx_t, q_t, k_t, v_t = (a[:, None] for a in tok)
            i = cache.length % c
            # A segment starts: h now reads the memory after the previous segment's last token.
            seg_mem = tuple(jnp.where(i == 0, m, s) for m, s in zip(cache.state.memory,
                                                                    cache.segment_memory))
            hk_t, hv_t = self._retrieved_kv(qx_t, x_t, seg_mem,
                                            jnp.full((b, 1), p + i, jnp.int32))
            put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                buf, new.astype(buf.dtype), i, axis=1)
            ks, vs, hks, hvs = (put(cache.k, k_t), put(cache.v, v_t), put(cache.hk, hk_t),
                                put(cache.hv, hv_t))
            # Slot j holds local index j; slots > i still hold the previous segment.
            seen = jnp.broadcast_to(jnp.arange(c) <= i, (b, 1, c))
            mask = jnp.concatenate([jnp.ones((b, 1, p), bool), seen, seen], axis=-1)
            y = self._attend(q_t, jnp.concatenate([pk, hks.astype(k_t.dtype),
                                                   ks.astype(k_t.dtype)], axis=1),
                             jnp.concatenate([pv, hvs.astype(v_t.dtype),
                                              vs.astype(v_t.dtype)], axis=1), mask)
            out, state, y_conv = self._write_and_gate(y, cache.state, cache.y_conv)
            cache = cache.replace(k=ks, v=vs, hk=hks, hv=hvs, segment_memory=seg_mem,
                                  state=state, y_conv=y_conv, length=cache.length + 1)
            return cache, out[:, 0]

        tm = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
        cache, out = jax.lax.scan(step, cache.replace(x_conv=x_conv),
                                  tuple(tm(a) for a in (x, qx, q, k, v)))
        return tm(out), cache


# ---------------------------------------------------------------------------------------- MAG


@struct.dataclass
class MAGCache(CacheBytes):
    """attn: the attention branch's ring (P sink slots + window; cache dtype); memory: the
    memory branch's TitansCache (float32 state and conv tails)."""

    attn: KVCache
    memory: TitansCache


class TitansMAG(nnx.Module):
    """Titans memory as a gate: `y, cache = mag(x, positions=pos, cache=cache)`, x [B, T, D],
    positions [B, T] (the attention branch's; the memory ignores them)."""

    Args = TitansMAGArgs

    def __init__(self, cfg, args: TitansMAGArgs, *, rngs: nnx.Rngs):
        self.n_persistent = args.n_persistent
        self.dtype = jnp.dtype(cfg.dtype)
        # The memory owns the persistent tokens; the attention keeps them as sinks.
        self.memory = TitansMemory(cfg, _memory_args(args, args.n_persistent), rngs=rngs)
        self.attn = Attention(cfg, AttentionArgs(window=args.window, n_sinks=args.n_persistent,
                                                 rope=args.rope), rngs=rngs)
        self.gate = _OutputGate(cfg, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: TitansMAGArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        errs = TitansMemory.check_config(cfg, _memory_args(args, args.n_persistent), name)
        if args.window <= 0:      # window_errors' message would offer null, which MAG lacks
            errs.append(f"model.mixer_args.{name}.window must be > 0, got {args.window}")
        attn = AttentionArgs(window=max(args.window, 1), n_sinks=max(args.n_persistent, 0),
                             rope=args.rope)
        return errs + Attention.check_config(cfg, attn, name)

    def _persistent(self, b: int, dtype) -> jax.Array:
        w = self.memory.persistent
        return jnp.broadcast_to(w[...].astype(dtype), (b, *w.shape))

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> MAGCache:
        """The caches after the persistent tokens (from the current params: make a new cache
        after changing them)."""
        p = self.n_persistent
        kv = self.attn.init_cache(batch_size, max_len, dtype)
        if p:
            pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (batch_size, p))
            _, kv = self.attn(self._persistent(batch_size, self.dtype), positions=pos, cache=kv)
        # One buffer per leaf: without persistent tokens TitansMemory.init_cache shares M_0
        # between the state's fields, and generate.py donates the cache (no buffer twice).
        memory = jax.tree.map(jnp.array, self.memory.init_cache(batch_size, max_len, dtype))
        return MAGCache(attn=kv, memory=memory)

    def _prefixed_attention(self, x: jax.Array, positions: jax.Array, segment_ids
                            ) -> jax.Array:
        """The attention branch over [p || x] computed beside x instead of over their
        concatenation: x's queries see the persistent tokens (RoPE positions 0..P-1, always
        visible) and their own document's tokens (positions P + their in-document positions,
        within the window), as over [p || document] alone. Used for packed documents (the
        attention op's sinks would be each document's own first tokens instead), and whenever
        the time axis is sharded over the mesh's sequence axis (P tokens prepended to it would
        not split into its pieces): then the window's halo exchange with p as prefix keys
        beside every piece (context_parallel/window.py); else an explicit [B, T, P + T] mask
        with the xla softmax."""
        a, p = self.attn, self.n_persistent
        b, t, _ = x.shape
        q, k, v = a.project(x, positions + p)
        _, p_k, p_v = a.project(self._persistent(b, x.dtype),
                                jnp.broadcast_to(jnp.arange(p, dtype=positions.dtype), (b, p)))
        scale = a.head_dim ** -0.5
        shards = sequence_shards()
        if shards is not None:
            from pallas_kernels.context_parallel.attention import sharded_attention

            o = sharded_attention(q, k, v, window=a.window, n_sinks=0, scale=scale,
                                  segment_ids=segment_ids, shards=shards,
                                  prefix=(p_k, p_v) if p else None)
        else:
            own = packed_visibility(segment_ids, a.window, 0)                 # [B, T, T]
            mask = jnp.concatenate([jnp.ones((b, t, p), bool), own], axis=-1)
            o = softmax_attention(q, jnp.concatenate([p_k, k], axis=1),
                                  jnp.concatenate([p_v, v], axis=1), mask, scale)
        return a.out(o.reshape(b, t, -1))

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: MAGCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, MAGCache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call; positions then
        in-document, as the LM passes them): both branches restart at every document."""
        p = self.n_persistent
        refuse_segments_with_cache("TitansMAG", segment_ids, cache)
        if segment_ids is not None or (cache is None and sequence_shards() is not None):
            m, _ = self.memory(x, positions=positions, segment_ids=segment_ids)
            return self.gate(self._prefixed_attention(x, positions, segment_ids), m), None
        if cache is None:
            m, _ = self.memory(x, positions=positions)     # prepends the persistent tokens
            z, pos = x, positions + p
            if p:
                b = x.shape[0]
                z = jnp.concatenate([self._persistent(b, x.dtype), x], axis=1)
                pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(p, dtype=pos.dtype),
                                                        (b, p)), pos], axis=1)
            y, _ = self.attn(z, positions=pos)
            return self.gate(y[:, p:], m), None
        m, mem_cache = self.memory(x, positions=positions, cache=cache.memory)
        y, kv = self.attn(x, positions=positions + p, cache=cache.attn)
        return self.gate(y, m), MAGCache(attn=kv, memory=mem_cache)
