"""Titans neural long-term memory as a token mixer (the memory layer of MAL), with a functional
core that the MAC and MAG variants build on.

Shape legend:
  B batch, T new tokens, D model width, H heads, K key / query / value head dim, E hidden width
  of the MLP memory, L memory depth (L_M), P persistent tokens (N_p).

Titans (Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to Memorize at Test Time",
arXiv:2501.00663). Per head, the memory M is an MLP K -> E -> ... -> K of depth L (L = 1: a
matrix memory) trained online on ||M(k_t) - v_t||^2 with momentum and forgetting (eqs. 12-15,
pallas_kernels/titans):

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; x_t),   M_t = (1 - alpha_t) M_{t-1} + S_t,
    y_t = M_t*(q_t)

with gradients taken at the start t' of each chunk of `chunk_size` tokens, chunks counted from
the first (persistent) token. Read rule: token t reads M_t, the memory after its own update.

Layer (Sec. 4.4): q, k, v are linear maps of x, each through a short causal depthwise conv and
SiLU; q and k are L2-normalised per head. The gates are data-dependent per head and token,
theta = theta_max * sigmoid(x W_theta + b), eta = sigmoid(x W_eta + b), alpha =
sigmoid(x W_alpha + b) (the paper leaves their form open). The memory output is RMS-normalised
per head (over K), gated by SiLU(x W_g) ("normalization and gating with a linear layer before
the final output projection") and projected back to D.

grad_clip (default 1; not in the paper) caps each token's gradient norm before it enters the
momentum (pallas_kernels/titans/reference.py says why): without it a trained MAG model's MLP
memory diverged to inf inside one 68-token sequence at training step 296 (the run's loss turned
NaN), even at theta_max = 0.01.

theta_max (not fixed by the paper) is small on purpose: a chunk applies the sum of its b
gradients, all taken at the same weights, and momentum stretches that sum by up to
1 / (1 - eta), so even a matrix memory with unit keys is only safe for theta <~ (1 - eta) / b
when keys repeat; an MLP memory's curvature grows with its weights and has no such bound. On the
MAL / MQAR config (b = 16) theta_max = 1 diverged to inf in the first forward pass, 0.1 by
training step ~100; 0.01 and 0.03 trained 300 steps cleanly.

The memory's initial weights M_0 are
parameters (the outer loop learns them), one set per head; the hidden layers start at
normal(1 / sqrt(fan_in)), the last layer at zero, so M_0 predicts 0 like an empty matrix memory
(an all-zero MLP would have zero gradients and never learn).

Persistent memory (Sec. 3.3): P learnable tokens in the model's input space (after the block's
norm, so initialised at unit scale) are processed as the first P tokens of every sequence: they
pass through the projections, convs and memory like any token, their outputs are dropped, and
the real tokens then start from the memory (and conv tails) they left. In training the layer
prepends them; a decode cache starts after them (init_cache runs them), so both see the same.

Functional core (what MAC / MAG reuse; every function is pure given the module's params):
  qkv(x, conv=None) -> (q, k, v, theta, eta, alpha), conv: projections, convs, norms, gates;
      q, k, v [B, T, H, K] in the compute dtype, gates [B, T, H] float32; conv is the tuple of
      the three ConvCaches (None in training).
  initial_state(batch_size) -> TitansState: M_0 broadcast to [B, H, ...], zero momentum,
      offset 0 (the state before any token, persistent ones included).
  memorize(q, k, v, theta, eta, alpha, state=None) -> (o [B, T, H, K], new state or None):
      runs the memory over a sequence from `state` (None: initial_state, and no state is
      returned: the training path); T == 1 with a state is the single-token decode step.
  retrieve(q, memory=None) -> o [B, T, H, K] float32: M*(q) without update, with any weights
      (a TitansState.memory, or M_0 when None).
  readout(o, x) -> y [B, T, D]: per-head norm, output gate, output projection.

Packed documents (segment_ids, cache-free call): each document starts from the state and conv
tails the persistent tokens leave (init_cache), its convs read that tail instead of the
previous document, and its memory chunks count from its own start (the op lays documents out
chunk-aligned; pallas_kernels/titans/xla.titans_memory_packed_xla), so it computes what it
computes alone.

Cache: TitansState (memory, momentum, chunk-start weights, position in the chunk; float32) and
the three conv tails (float32); its size does not depend on max_len.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes, refuse_segments_with_cache
from layers.checks import head_errors, min_errors
from layers.conv import ConvCache, ShortConv
from layers.delta_rule import l2_normalize
from layers.norm import RMSNorm
from layers.projections import output_projection, projection
from pallas_kernels.backends import TitansBackend
from pallas_kernels.context_parallel import sequence_shards
from pallas_kernels.titans import TitansState, memory_read, titans_memory, titans_step


@dataclasses.dataclass(frozen=True)
class TitansArgs:
    n_heads: int | None = None      # None: model.n_heads
    head_dim: int | None = None     # K (= value dim); None: model.d_model // n_heads
    memory_depth: int = 2           # L_M: 1 = matrix memory; >= 2 an MLP with SiLU
    memory_expand: float = 2.0      # hidden width E = int(K * memory_expand) (L_M >= 2)
    n_persistent: int = 0           # N_p learnable tokens processed before every sequence
    conv_width: int = 4             # short causal conv on q, k and v
    chunk_size: int = 16            # b: gradients at the chunk-start weights (part of the rule)
    theta_max: float = 0.01         # theta = theta_max * sigmoid(.): the inner learning-rate cap
    grad_clip: float | None = 1.0   # per-token gradient norm cap (pallas_kernels/titans); None off
    backend: TitansBackend = "auto"    # pallas_kernels/backends.py


@struct.dataclass
class TitansCache(CacheBytes):
    """state: TitansState (float32 memory, momentum and chunk-start weights, each a tuple of L
    arrays [B, H, in, out], and offset [] int32); q_conv/k_conv/v_conv: the convs' input tails
    [B, W - 1, H*K] float32."""

    state: TitansState
    q_conv: ConvCache
    k_conv: ConvCache
    v_conv: ConvCache


# Gate biases at init (the paper gives none): theta = theta_max / 2, eta = 0.5, and alpha =
# sigmoid(-4) ~ 0.018, i.e. the memory forgets on a scale of ~50 tokens until trained.
GATE_BIAS = (0.0, 0.0, -4.0)


class TitansMemory(nnx.Module):
    """Titans long-term memory mixer: `y, cache = layer(x, positions=pos, cache=cache)`,
    x [B, T, D] -> y [B, T, D]. Positions are unused: order enters through the memory updates
    and the causal convs; the chunk schedule is tracked by the cache (TitansState.offset)."""

    Args = TitansArgs

    def __init__(self, cfg, args: TitansArgs, *, rngs: nnx.Rngs):
        self.n_heads = h = args.n_heads or cfg.n_heads
        self.head_dim = kd = args.head_dim or cfg.d_model // h
        self.chunk_size = args.chunk_size
        self.theta_max = args.theta_max
        self.grad_clip = args.grad_clip
        self.backend = args.backend
        self.n_persistent = args.n_persistent
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        d = cfg.d_model
        proj = functools.partial(projection, cfg, d, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj = proj(h * kd), proj(h * kd), proj(h * kd)
        conv = dict(dtype=self.dtype, rngs=rngs)
        self.q_conv = ShortConv(h * kd, args.conv_width, **conv)
        self.k_conv = ShortConv(h * kd, args.conv_width, **conv)
        self.v_conv = ShortConv(h * kd, args.conv_width, **conv)
        # theta, eta, alpha logits for every head from one map: [D, 3 H] plus a bias per gate.
        self.gate_proj = proj(3 * h, dtype=jnp.float32)
        self.gate_bias = nnx.Param(jnp.repeat(jnp.asarray(GATE_BIAS, jnp.float32), h))
        self.g_proj = proj(h * kd)
        self.o_norm = RMSNorm(kd, eps=cfg.norm_eps)
        self.out = output_projection(cfg, h * kd, rngs=rngs)
        # M_0: one MLP per head, K -> E -> ... -> K.
        hidden = int(kd * args.memory_expand)
        dims = [kd] + [hidden] * (args.memory_depth - 1) + [kd]
        keys = jax.random.split(rngs.params(), args.memory_depth)
        self.memory0 = nnx.List([
            nnx.Param(jnp.zeros((h, a, b), jnp.float32) if i == args.memory_depth - 1 else
                      jax.random.normal(keys[i], (h, a, b), jnp.float32) / math.sqrt(a))
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
        self.persistent = (nnx.Param(jax.random.normal(rngs.params(), (args.n_persistent, d),
                                                       jnp.float32))
                           if args.n_persistent else None)

    @staticmethod
    def check_config(cfg, args: TitansArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        # An explicit 0 is an error here, not "use model.n_heads" (null is that).
        n_heads = cfg.n_heads if args.n_heads is None else args.n_heads
        errs = head_errors(p, n_heads, head_dim=args.head_dim, width=cfg.d_model, null_ok=True,
                           hint=f" (or set {p}.head_dim)")
        if args.memory_depth < 1:
            errs.append(f"{p}.memory_depth must be >= 1 (1 = matrix memory), "
                        f"got {args.memory_depth}")
        elif args.memory_depth > 1 and n_heads > 0:
            kd = args.head_dim or cfg.d_model // n_heads
            if kd >= 1 and int(kd * args.memory_expand) < 1:
                errs.append(f"{p}.memory_expand={args.memory_expand} gives a hidden width < 1 "
                            f"(head dim {kd})")
        errs += min_errors(p, args, "n_persistent", low=0)
        errs += min_errors(p, args, "conv_width", "chunk_size")
        if not args.theta_max > 0:
            errs.append(f"{p}.theta_max must be > 0, got {args.theta_max}")
        if args.grad_clip is not None and not args.grad_clip > 0:
            errs.append(f"{p}.grad_clip must be > 0 or null, got {args.grad_clip}")
        return errs

    # ------------------------------------------------------------------ functional core

    def qkv(self, x: jax.Array, conv: tuple | None = None, *, segment_ids=None,
            document_conv: tuple | None = None):
        """x [B, T, D] -> ((q, k, v [B, T, H, K] compute dtype, theta, eta, alpha [B, T, H]
        float32), conv caches or None). segment_ids: packed documents (no conv caches), each
        document's convs starting from the tails document_conv (three ConvCaches; None:
        zeros)."""
        b, t, _ = x.shape
        h, kd = self.n_heads, self.head_dim
        conv = (None,) * 3 if conv is None else conv
        tails = (None,) * 3 if document_conv is None else tuple(c.tail for c in document_conv)
        seg = lambda i: dict(segment_ids=segment_ids, document_tail=tails[i])  # noqa: E731
        q, qc = self.q_conv(self.q_proj(x), conv[0], **seg(0))
        k, kc = self.k_conv(self.k_proj(x), conv[1], **seg(1))
        v, vc = self.v_conv(self.v_proj(x), conv[2], **seg(2))
        q = l2_normalize(jax.nn.silu(q).reshape(b, t, h, kd), self.eps).astype(self.dtype)
        k = l2_normalize(jax.nn.silu(k).reshape(b, t, h, kd), self.eps).astype(self.dtype)
        v = jax.nn.silu(v).reshape(b, t, h, kd)
        logits = self.gate_proj(x.astype(jnp.float32)) + self.gate_bias[...]
        z_theta, z_eta, z_alpha = jnp.split(logits, 3, axis=-1)             # [B, T, H] each
        gates = (self.theta_max * jax.nn.sigmoid(z_theta), jax.nn.sigmoid(z_eta),
                 jax.nn.sigmoid(z_alpha))
        new_conv = None if conv[0] is None else (qc, kc, vc)
        return (q, k, v, *gates), new_conv

    def _memory0(self, batch_size: int) -> tuple:
        return tuple(jnp.broadcast_to(w[...], (batch_size, *w.shape)) for w in self.memory0)

    def initial_state(self, batch_size: int) -> TitansState:
        """The state before any token: M_0 for every sequence, zero momentum, offset 0."""
        mem = self._memory0(batch_size)
        return TitansState(mem, tuple(jnp.zeros_like(w) for w in mem), mem,
                           jnp.zeros((), jnp.int32))

    def memorize(self, q, k, v, theta, eta, alpha, state: TitansState | None = None):
        """Writes a sequence into the memory and reads every token after its own write.

        Returns (o [B, T, H, K] compute dtype, the state after the last token, or None when
        `state` is None: training starts from M_0 and keeps no state)."""
        if state is not None and q.shape[1] == 1:
            # Single-token decode: the chunked rule's own step (the reference's body).
            o, state = titans_step(state, q[:, 0], k[:, 0], v[:, 0], theta[:, 0], eta[:, 0],
                                   alpha[:, 0], chunk_size=self.chunk_size,
                                   grad_clip=self.grad_clip)
            return o[:, None].astype(self.dtype), state
        if state is None:
            kwargs = dict(memory0=self._memory0(q.shape[0]))
        else:
            kwargs = dict(memory0=state.memory, momentum0=state.momentum,
                          chunk_start0=state.chunk_start, chunk_offset=state.offset)
        return titans_memory(q, k, v, theta, eta, alpha, chunk_size=self.chunk_size,
                             output_final_state=state is not None, backend=self.backend,
                             grad_clip=self.grad_clip,
                             **kwargs)

    def retrieve(self, q: jax.Array, memory: tuple | None = None) -> jax.Array:
        """M*(q): q [B, T, H, K] -> [B, T, H, K] float32, a forward pass without update
        (eq. 15), with `memory` (e.g. TitansState.memory) or M_0 when None."""
        memory = self._memory0(q.shape[0]) if memory is None else memory
        return memory_read(memory, q.astype(jnp.float32))

    def readout(self, o: jax.Array, x: jax.Array) -> jax.Array:
        """o [B, T, H, K] memory output, x [B, T, D] -> y [B, T, D]."""
        b, t, _ = x.shape
        o = self.o_norm(o.astype(self.dtype))                              # per head, over K
        gate = jax.nn.silu(self.g_proj(x).astype(jnp.float32))
        o = (o.astype(jnp.float32) * gate.reshape(o.shape)).astype(self.dtype)
        return self.out(o.reshape(b, t, -1))

    # ------------------------------------------------------------------ mixer contract

    def _prepend_persistent(self, x: jax.Array) -> jax.Array:
        p = jnp.broadcast_to(self.persistent[...], (x.shape[0], *self.persistent.shape))
        return jnp.concatenate([p.astype(x.dtype), x], axis=1)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> TitansCache:
        """The cache after the persistent tokens (computed from the current params: make a new
        cache after changing them). max_len is unused: the memory has a fixed size."""
        del max_len, dtype   # conv tails are float32 whatever the cache dtype
        cache = TitansCache(state=self.initial_state(batch_size),
                            q_conv=self.q_conv.init_cache(batch_size, jnp.float32),
                            k_conv=self.k_conv.init_cache(batch_size, jnp.float32),
                            v_conv=self.v_conv.init_cache(batch_size, jnp.float32))
        if self.persistent is not None:
            x = self._prepend_persistent(jnp.zeros((batch_size, 0, self.persistent.shape[1]),
                                                   self.dtype))
            _, cache = self._mix(x, cache)
        # Own buffers for every leaf: initial_state shares the M_0 arrays between `memory` and
        # `chunk_start`, and a decode loop that donates the cache cannot donate one buffer twice.
        return jax.tree.map(jnp.array, cache)

    def _mix(self, x, cache):
        conv = None if cache is None else (cache.q_conv, cache.k_conv, cache.v_conv)
        (q, k, v, theta, eta, alpha), conv = self.qkv(x, conv)
        o, state = self.memorize(q, k, v, theta, eta, alpha,
                                 None if cache is None else cache.state)
        if cache is not None:
            cache = cache.replace(state=state, q_conv=conv[0], k_conv=conv[1], v_conv=conv[2])
        return o, cache

    def packed_memory(self, x: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Packed documents, x [B, T, D] -> memory outputs o [B, T, H, K] (0 at padding): every
        document starts from what the persistent tokens leave (init_cache: the memory state
        and the conv tails), as it does alone, with its chunks counted from its own start."""
        start = self.init_cache(x.shape[0], 0)
        (q, k, v, theta, eta, alpha), _ = self.qkv(
            x, segment_ids=segment_ids, document_conv=(start.q_conv, start.k_conv,
                                                       start.v_conv))
        st = start.state
        o, _ = titans_memory(q, k, v, theta, eta, alpha, memory0=st.memory,
                             momentum0=st.momentum, chunk_start0=st.chunk_start,
                             chunk_offset=self.n_persistent % self.chunk_size,
                             chunk_size=self.chunk_size, backend=self.backend,
                             grad_clip=self.grad_clip, segment_ids=segment_ids)
        return o

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: TitansCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, TitansCache | None]:
        """segment_ids: optional [B, T] packed-document ids (cache-free call; packed_memory)."""
        del positions
        refuse_segments_with_cache("TitansMemory", segment_ids, cache)
        if segment_ids is not None:
            return self.readout(self.packed_memory(x, segment_ids), x), None
        t = x.shape[1]
        if cache is None and self.persistent is not None and sequence_shards() is not None:
            # Time sharded over the mesh's sequence axis: P tokens prepended to it would not
            # split into its pieces. The row as one document computes the same: it starts from
            # the state and conv tails the persistent tokens leave.
            ones = jnp.ones(x.shape[:2], jnp.int32)
            return self.readout(self.packed_memory(x, ones), x), None
        if cache is None and self.persistent is not None:
            # Training: the persistent tokens open every sequence; their outputs are dropped.
            o, _ = self._mix(self._prepend_persistent(x), None)
            return self.readout(o[:, -t:], x), None
        o, cache = self._mix(x, cache)
        return self.readout(o, x), cache
