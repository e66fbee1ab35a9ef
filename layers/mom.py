"""Mixture-of-Memories (MoM): M gated-delta-rule memories; a router sends each token to k of them.

Shape legend:
  B batch, T new tokens, D model width, H heads, K key (and query) head dim, V value head dim,
  M routed memories, Mt = M (+ 1 with the shared memory) memory states, A = k (+ 1) memories
  each token writes to and reads from, L the op's chunk length, S packed-stream length,
  N = S / L stream chunks.

Du et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories", arXiv:2502.13685.
Router: p_t = softmax(x_t W_r) over the M memories; the top-k indices are kept and their weights
renormalised, w_t^m = p_t^m / sum_{j in topk} p_t^j. Each memory m has its own key, value, beta
and decay projections and a Gated DeltaNet state (layers/delta_net.py):

    S_t^m = exp(g_t^m) S_{t-1}^m + beta_t^m k_t^m (v_t^m - exp(g_t^m) S_{t-1}^m^T k_t^m)^T

but only at the tokens routed to it: a memory skips every other token, with no write and no
decay (the paper's memories see their bucket of tokens as their own sequence). The query
projection is shared. The optional shared memory sees every token. Output (section "Linear
Recurrent Memory Module" and "Shared Memory"):

    o_t = sum_{m in topk(t)} w_t^m (scale q_t)^T S_t^m  +  (scale q_t)^T S_t^shared,

then, as in Gated DeltaNet, an RMSNorm per head, the output gate SiLU(x W_g) and W_o.
Router balance loss (Switch Transformer form, as the paper): M * sum_m f_m P_m, f_m the share of
the top-k (token, memory) assignments sent to m (sum_m f_m = 1) and P_m the mean router
probability of m, over all B*T tokens; it is 1 when balanced. (Mixtral-style code counts f_m per
token, summing to k: k times this.) `aux_loss(x)` returns it times `balance_loss_weight`; the LM
adds it to the training loss and the loop logs it.

Dispatch (how the M recurrences are run over T tokens; the three paths agree):
  - masked (the reference): every memory runs the chunked op over every token, with beta = 0
    and g = 0 where a token is not routed to it (so S passes unchanged, exactly). Work and
    per-memory projections grow with Mt * T.
  - packed (the fast path; the paper's varlen sort, with static shapes): per batch row the
    (token, memory) assignments are sorted by memory, in time order inside a memory
    (MoE-style: rank = cumulative count), and the buckets laid end to end in one stream of
    S <= T*A + Mt*(L + 2K) slots. Each bucket starts on a chunk boundary and its block ends
    with a reset slot (g = -1e4 at the last position of a chunk: exp underflows to exactly 0,
    so the next bucket starts from a zero state; at a chunk's last position the huge gate enters
    no in-chunk decay difference of the other tokens, so their gates keep full float32
    precision). Chunk alignment also means each chunk belongs to one memory, so the per-memory
    projections are one einsum with per-chunk gathered weights. A cached state enters a bucket
    as K write slots (k = e_i, beta = 1, v = row i of S: after a zero state the delta rule sets
    row i exactly), and the final state leaves as K read slots (q = e_i reads row i); both only
    when prefilling from a cache. One op call over [B, S]; the outputs are gathered back per
    assignment and mixed. Work: T*A + Mt*L slots (+ 2 Mt K with a cache), i.e. it grows with k
    and only by one chunk per memory with M. Cost of the static shapes: per-chunk gathered
    weights (B * N * D * H(K+V) values; a grouped-matmul kernel would avoid materialising them)
    and a scan over (A T + Mt L) / L chunks per row instead of T / L.
  - auto: whichever has fewer op slots for this call's static shape (packed for long T).
  A cached single-token step updates only the A routed states (gathered, stepped, scattered).

Deviation from the paper: the short causal conv. The paper convolves each memory's keys and
values over its own bucket; here one depthwise conv runs over the full sequence on x (before the
per-memory projections: k^m = SiLU(conv(x) W_k^m), v^m likewise), shared by all memories. That
keeps the masked reference an ordinary masked op (no per-bucket conv) and the cache one conv
tail, and costs D conv channels instead of Mt * H(K+V). The query keeps Gated DeltaNet's own
conv; beta and the decay read x, as in Gated DeltaNet.

Packed documents (segment_ids [B, T], cache-free call; pallas_kernels/segments.py): the two convs
zero their taps across document starts, and every memory restarts from zero at each start,
also when the start's own token is routed elsewhere (a document alone starts every memory from
zero). The masked path hands the ids to the op; the packed path gives each stream slot its
token's id (pad and reset slots 0), so each document is one run inside each memory's block.
The balance loss counts real tokens only.

Cache: states [B, Mt, H, K, V] float32 (index M is the shared memory), and the conv tails of
q and x; its size does not depend on max_len.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes, refuse_segments_with_cache
from layers.conv import ConvCache, ShortConv
from layers.delta_net import DeltaNet
from layers.delta_rule import decay_init, l2_normalize, log_decay, recurrent_step
from layers.norm import RMSNorm
from layers.projections import output_projection, projection
from pallas_kernels.backends import LinearBackend
from pallas_kernels.gated_delta_rule import gated_delta_rule

# Log decay of a reset slot: exp(-1e4) is exactly 0 in float32 (and in its gradient), while the
# value stays finite, so no inf - inf appears in the op's in-chunk decay differences.
RESET_LOG_DECAY = -1e4


@dataclasses.dataclass(frozen=True)
class MoMArgs:
    num_memories: int = 4           # M routed memories
    top_k: int = 2                  # memories each token is routed to
    shared_memory: bool = True      # one more memory that every token updates and reads
    n_heads: int | None = None      # None: model.n_heads
    head_dim: int | None = None     # key dim K; None: model.d_model // n_heads
    expand_v: float = 1.0           # value dim V = int(K * expand_v)
    conv_width: int = 4             # short causal convs (on q, and on x before the k/v proj)
    chunk_size: int = 64            # chunk length of the chunkwise-parallel op
    dispatch: Literal["auto", "packed", "masked"] = "auto"
    balance_loss_weight: float = 0.01
    backend: LinearBackend = "auto"    # pallas_kernels/backends.py


@struct.dataclass
class MoMCache(CacheBytes):
    """states: [B, Mt, H, K, V] float32 (memory M is the shared one); q_conv: [B, W - 1, H*K]
    and x_conv: [B, W - 1, D] conv tails (cache dtype)."""

    states: jax.Array
    q_conv: ConvCache
    x_conv: ConvCache


class Dispatch(NamedTuple):
    """Where every assignment sits in the packed stream (all int32)."""

    slot: jax.Array        # [B, T*A] stream slot of assignment a = t*A + j
    token: jax.Array       # [B, S] token at each slot; -1 at pseudo, pad and reset slots
    chunk_mem: jax.Array   # [B, N] the memory each stream chunk belongs to
    start: jax.Array       # [B, Mt] first slot of each memory's block
    count: jax.Array       # [B, Mt] tokens routed to each memory
    end: jax.Array         # [B, Mt] one past each block's last slot (the reset slot)


def packed_length(t: int, a: int, n_mem: int, chunk: int, extra: int) -> int:
    """S, the static stream length: enough for any routing. Block m takes
    ceil((n_m + extra + 1) / L) chunks and sum_m n_m = T*A, so the total is at most
    (T*A + Mt*(extra + L)) / L chunks."""
    return (t * a + n_mem * (extra + chunk)) // chunk * chunk


def plan_dispatch(idx: jax.Array, n_mem: int, chunk: int, pre: int, post: int) -> Dispatch:
    """Lays the assignments idx [B, T, A] (memory ids, distinct within a token) out by memory.

    Block of memory m: `pre` write slots, its n_m tokens in time order, `post` read slots, padding,
    and a reset slot, rounded up to whole chunks of length `chunk`.
    """
    b, t, a = idx.shape
    mem = idx.reshape(b, t * a)
    onehot = jax.nn.one_hot(mem, n_mem, dtype=jnp.int32)             # [B, TA, Mt]
    rank = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # place in its bucket
    count = onehot.sum(axis=1)                                       # [B, Mt]
    size = -(-(count + pre + post + 1) // chunk) * chunk
    end = jnp.cumsum(size, axis=1)
    start = end - size
    s = packed_length(t, a, n_mem, chunk, pre + post)
    bi = jnp.arange(b)[:, None]
    slot = jnp.take_along_axis(start, mem, axis=1) + pre + rank
    token = jnp.full((b, s), -1, jnp.int32).at[bi, slot].set(jnp.arange(t * a) // a)
    first = jnp.arange(0, s, chunk)
    # Trailing chunks past the last block are all padding; any memory id does for them.
    chunk_mem = jnp.minimum(jnp.sum(end[:, None, :] <= first[None, :, None], axis=-1), n_mem - 1)
    return Dispatch(slot, token, chunk_mem, start, count, end)


class MoM(nnx.Module):
    """Mixture-of-Memories mixer. `y, cache = layer(x, positions=pos, cache=cache)`:
    x [B, T, D] -> y [B, T, D]; positions are unused (order enters through the recurrences)."""

    Args = MoMArgs

    def __init__(self, cfg, args: MoMArgs, *, rngs: nnx.Rngs):
        self.n_heads = h = args.n_heads or cfg.n_heads
        self.key_dim = kd = args.head_dim or cfg.d_model // h
        self.value_dim = vd = int(kd * args.expand_v)
        self.num_memories = m = args.num_memories
        self.top_k = args.top_k
        self.shared = args.shared_memory
        self.n_states = mt = m + int(args.shared_memory)
        self.chunk_size = args.chunk_size
        self.dispatch = args.dispatch
        self.balance_loss_weight = args.balance_loss_weight
        self.backend = args.backend
        self.precision = cfg.precision
        self.eps = cfg.norm_eps
        self.dtype = jnp.dtype(cfg.dtype)
        d = cfg.d_model
        init = nnx.initializers.normal(cfg.init_std)
        self.q_proj = projection(cfg, d, h * kd, rngs=rngs)
        self.q_conv = ShortConv(h * kd, args.conv_width, dtype=self.dtype, rngs=rngs)
        self.x_conv = ShortConv(d, args.conv_width, dtype=self.dtype, rngs=rngs)
        self.router = nnx.Param(init(rngs.params(), (d, m), jnp.float32))
        # Per memory (the shared one last): k and v from conv(x), beta and decay from x.
        self.w_kv = nnx.Param(init(rngs.params(), (mt, d, h * (kd + vd)), jnp.float32))
        self.w_ba = nnx.Param(init(rngs.params(), (mt, d, 2 * h), jnp.float32))
        a_log, dt_bias = decay_init(rngs.params(), (mt, h))
        self.A_log, self.dt_bias = nnx.Param(a_log), nnx.Param(dt_bias)
        self.g_proj = projection(cfg, d, h * vd, rngs=rngs)
        self.o_norm = RMSNorm(vd, eps=cfg.norm_eps)
        self.out = output_projection(cfg, h * vd, rngs=rngs)

    @staticmethod
    def check_config(cfg, args: MoMArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine)."""
        p = f"model.mixer_args.{name}"
        errs = []
        if args.num_memories < 1:
            errs.append(f"{p}.num_memories must be >= 1, got {args.num_memories}")
        elif not 1 <= args.top_k <= args.num_memories:
            errs.append(f"{p}.top_k={args.top_k} must be in [1, num_memories="
                        f"{args.num_memories}]")
        if args.balance_loss_weight < 0:
            errs.append(f"{p}.balance_loss_weight must be >= 0, got {args.balance_loss_weight}")
        # Heads, head dim, value dim, conv width and chunk size: the same rules as Gated DeltaNet.
        return errs + DeltaNet.check_config(cfg, args, name)

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> MoMCache:
        del max_len   # fixed-size memories
        shape = (batch_size, self.n_states, self.n_heads, self.key_dim, self.value_dim)
        return MoMCache(states=jnp.zeros(shape, jnp.float32),
                        q_conv=self.q_conv.init_cache(batch_size, dtype),
                        x_conv=self.x_conv.init_cache(batch_size, dtype))

    # ------------------------------------------------------------------------------ router

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> (idx [B, T, A] int32, w [B, T, A] float32, probs [B, T, M] float32).

        idx/w: the top-k memories and their renormalised weights, then (shared memory on)
        memory M with weight 1.
        """
        logits = jnp.einsum("btd,dm->btm", x.astype(jnp.float32), self.router[...],
                            precision=jax.lax.Precision.HIGHEST)
        probs = jax.nn.softmax(logits, axis=-1)
        top, idx = jax.lax.top_k(probs, self.top_k)
        w = top / jnp.sum(top, axis=-1, keepdims=True)
        if self.shared:
            idx = jnp.concatenate([idx, jnp.full(idx.shape[:2] + (1,), self.num_memories,
                                                 idx.dtype)], axis=-1)
            w = jnp.concatenate([w, jnp.ones(w.shape[:2] + (1,), w.dtype)], axis=-1)
        return idx.astype(jnp.int32), w, probs

    def balance_loss(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """M * sum_m f_m P_m over all B*T tokens (float32 scalar; 1 when perfectly balanced),
        or over the real tokens of packed rows (segment_ids != 0: padding routes nothing).
        Gradients reach the router through P only (f counts discrete choices)."""
        idx, _, probs = self.route(x)
        chosen = jax.nn.one_hot(idx[..., :self.top_k], self.num_memories, dtype=jnp.float32)
        real = (jnp.ones(x.shape[:2], jnp.float32) if segment_ids is None
                else (segment_ids != 0).astype(jnp.float32))[..., None]
        # Mean over real tokens; max(., 1) keeps an all-padding batch at 0 instead of 0 / 0.
        n = jnp.maximum(jnp.sum(real), 1.0)
        f = jnp.sum(jnp.sum(chosen, axis=-2) * real, axis=(0, 1)) / (n * self.top_k)
        p = jnp.sum(jnp.where(real > 0, probs, 0.0), axis=(0, 1)) / n
        return self.num_memories * jnp.sum(f * p)

    def aux_loss(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """The term this layer adds to the training loss: balance_loss_weight * balance loss.
        x is the layer's input (the one __call__ gets), segment_ids its packed-document ids."""
        if self.balance_loss_weight == 0:
            return jnp.zeros((), jnp.float32)
        return self.balance_loss_weight * self.balance_loss(x, segment_ids)

    # ------------------------------------------------------------------------- memories

    def _weights(self, mem: jax.Array | None = None):
        """Per-memory parameters (all Mt, or gathered at the int array `mem`)."""
        p = (self.w_kv[...].astype(self.dtype), self.w_ba[...].astype(self.dtype),
             self.A_log[...], self.dt_bias[...])
        return p if mem is None else tuple(z[mem] for z in p)

    def _features(self, xc, x, w_kv, w_ba, a_log, dt_bias):
        """xc, x [..., L, D] with weights w_kv [..., D, H(K+V)], w_ba [..., D, 2H],
        a_log / dt_bias [..., H] (leading dims broadcast) -> the op's float32 inputs
        k [..., L, H, K] (L2-normalised), v [..., L, H, V], beta, g [..., L, H]."""
        h, kd, vd = self.n_heads, self.key_dim, self.value_dim
        kv = jnp.einsum("...ld,...de->...le", xc.astype(self.dtype), w_kv)
        k = kv[..., :h * kd].reshape(*kv.shape[:-1], h, kd)
        k = l2_normalize(jax.nn.silu(k), self.eps).astype(self.dtype).astype(jnp.float32)
        v = jax.nn.silu(kv[..., h * kd:]).reshape(*kv.shape[:-1], h, vd).astype(jnp.float32)
        ba = jnp.einsum("...ld,...de->...le", x.astype(self.dtype), w_ba).astype(jnp.float32)
        beta = jax.nn.sigmoid(ba[..., :h])
        # Mamba2 decay as in Gated DeltaNet, per memory: -exp(A_log) softplus(x W_a + dt_bias).
        g = log_decay(ba[..., h:], a_log[..., None, :], dt_bias[..., None, :])
        return k, v, beta, g

    def _op(self, q, k, v, g, beta, initial_state=None, segment_ids=None):
        # q arrives scaled (scale = 1 here) so that read slots return state rows exactly.
        return gated_delta_rule(q, k, v, g, beta, scale=1.0, initial_state=initial_state,
                                output_final_state=initial_state is not None,
                                chunk_size=self.chunk_size, backend=self.backend,
                                precision=self.precision, segment_ids=segment_ids)

    def _masked(self, q, xc, x, idx, w, states, segment_ids=None):
        """Reference path: every memory over every token, update masked. -> (o [B, T, H, V]
        float32, final states or None)."""
        b, t, a = idx.shape
        mt, h, kd, vd = self.n_states, self.n_heads, self.key_dim, self.value_dim
        k, v, beta, g = self._features(xc[:, None], x[:, None], *self._weights())  # [B,Mt,T,..]
        onehot = jax.nn.one_hot(idx, mt, dtype=jnp.float32)                   # [B, T, A, Mt]
        routed = jnp.sum(onehot, axis=2).transpose(0, 2, 1)[..., None] > 0     # [B, Mt, T, 1]
        beta, g = jnp.where(routed, beta, 0.0), jnp.where(routed, g, 0.0)     # skip: no write,
        flat = lambda z: z.reshape(b * mt, t, *z.shape[3:])                    # no decay
        qm = jnp.broadcast_to(q[:, None], (b, mt, t, h, kd))
        init = None if states is None else states.reshape(b * mt, h, kd, vd)
        # Packed documents: each memory's recurrence restarts at every document start, also
        # where that start's token is routed elsewhere (the op resets on the ids, not on beta).
        seg = None if segment_ids is None else jnp.repeat(segment_ids, mt, axis=0)
        o, fin = self._op(flat(qm), flat(k), flat(v), flat(g), flat(beta), init, seg)
        y = jnp.einsum("btam,btmhv->bthv", onehot * w[..., None],
                       o.reshape(b, mt, t, h, vd).transpose(0, 2, 1, 3, 4),
                       precision=jax.lax.Precision.HIGHEST)
        return y, None if fin is None else fin.reshape(b, mt, h, kd, vd)

    def _packed(self, q, xc, x, idx, w, states, segment_ids=None):
        """Fast path: the buckets packed into one stream per row (module docstring)."""
        b, t, a = idx.shape
        mt, h, kd, vd, c = self.n_states, self.n_heads, self.key_dim, self.value_dim, \
            self.chunk_size
        pre = post = 0 if states is None else kd
        plan = plan_dispatch(idx, mt, c, pre, post)
        s = plan.token.shape[1]
        real = plan.token >= 0                                            # [B, S]
        bi = jnp.arange(b)[:, None]
        tok = jnp.maximum(plan.token, 0)
        gather = lambda z: jnp.where(real.reshape(b, s, *(1,) * (z.ndim - 2)), z[bi, tok], 0)
        chunks = lambda z: z.reshape(b, s // c, c, *z.shape[2:])
        k, v, beta, g = self._features(chunks(gather(xc)), chunks(gather(x)),
                                       *self._weights(plan.chunk_mem))  # [B, N, L, H, ...]
        k, v, beta, g = (z.reshape(b, s, *z.shape[3:]) for z in (k, v, beta, g))
        on = lambda z: jnp.where(real.reshape(b, s, *(1,) * (z.ndim - 2)), z, 0.0)
        k, v, beta, g, qs = on(k), on(v), on(beta), on(g), gather(q)     # zero off the tokens
        g = g.at[bi, plan.end - 1].set(RESET_LOG_DECAY)                    # block ends: S -> 0
        if states is not None:
            bi3 = bi[..., None]
            eye = jnp.broadcast_to(jnp.eye(kd)[:, None, :], (kd, h, kd))  # slot i: e_i per head
            write = plan.start[..., None] + jnp.arange(kd)                # [B, Mt, K]
            read = write + pre + plan.count[..., None]
            k = k.at[bi3, write].set(eye)
            v = v.at[bi3, write].set(states.transpose(0, 1, 3, 2, 4))    # row i of each S0
            beta = beta.at[bi3, write].set(1.0)
            qs = qs.at[bi3, read].set(eye)
        seg = None
        if segment_ids is not None:
            # Each slot carries its token's document id; pad and reset slots are padding (0).
            # A block's tokens keep time order, so a document is one run in its block, and
            # the op restarts the memory at each (the previous run, or the reset slot, differs).
            seg = jnp.where(real, segment_ids[bi, tok], 0)
        o, _ = self._op(qs, k, v, g, beta, segment_ids=seg)               # [B, S, H, V]
        y = jnp.einsum("bta,btahv->bthv", w, o[bi, plan.slot].reshape(b, t, a, h, vd),
                       precision=jax.lax.Precision.HIGHEST)
        if states is None:
            return y, None
        return y, o[bi[..., None], read].transpose(0, 1, 3, 2, 4)        # [B, Mt, H, K, V]

    def _step(self, q, xc, x, idx, w, states):
        """One cached token: only its A memories are read, stepped and written back."""
        b, _, a = idx.shape
        h, kd, vd = self.n_heads, self.key_dim, self.value_dim
        idx, w = idx[:, 0], w[:, 0]                                       # [B, A]
        k, v, beta, g = self._features(xc[:, None], x[:, None], *self._weights(idx))
        bi = jnp.arange(b)[:, None]
        flat = lambda z: z[:, :, 0].reshape(b * a, *z.shape[3:])           # [B*A, H, ...]
        qa = jnp.broadcast_to(q[:, :1], (b, a, h, kd)).reshape(b * a, h, kd)
        o, new = recurrent_step(states[bi, idx].reshape(b * a, h, kd, vd), qa, flat(k),
                                flat(v), flat(beta), flat(g), 1.0)
        states = states.at[bi, idx].set(new.reshape(b, a, h, kd, vd))
        y = jnp.einsum("ba,bahv->bhv", w, o.reshape(b, a, h, vd),
                       precision=jax.lax.Precision.HIGHEST)
        return y[:, None], states

    def uses_packed(self, t: int, cached: bool, dispatch: str | None = None) -> bool:
        """Whether a T-token call takes the packed path (static: shapes only)."""
        dispatch = dispatch or self.dispatch
        if dispatch != "auto":
            return dispatch == "packed"
        a, c = self.top_k + int(self.shared), self.chunk_size
        packed = packed_length(t, a, self.n_states, c, 2 * self.key_dim if cached else 0)
        return packed < self.n_states * (-(-t // c) * c)

    def __call__(self, x: jax.Array, *, positions: jax.Array, cache: MoMCache | None = None,
                 segment_ids: jax.Array | None = None, dispatch: str | None = None
                 ) -> tuple[jax.Array, MoMCache | None]:
        """`dispatch` overrides args.dispatch for this call (tests compare the paths).
        segment_ids: optional [B, T] packed-document ids (cache-free call): the convs and every
        memory restart at each document; padding outputs 0."""
        del positions
        refuse_segments_with_cache("MoM", segment_ids, cache)
        b, t, _ = x.shape
        h, kd, vd = self.n_heads, self.key_dim, self.value_dim
        seg = dict(segment_ids=segment_ids)
        q, qc = self.q_conv(self.q_proj(x), None if cache is None else cache.q_conv, **seg)
        q = l2_normalize(jax.nn.silu(q).reshape(b, t, h, kd), self.eps).astype(self.dtype)
        q = q.astype(jnp.float32) * kd ** -0.5
        xc, xcc = self.x_conv(x, None if cache is None else cache.x_conv, **seg)
        idx, w, _ = self.route(x)
        states = None if cache is None else cache.states
        if cache is not None and t == 1:
            o, states = self._step(q, xc, x, idx, w, states)
        elif self.uses_packed(t, cache is not None, dispatch):
            o, states = self._packed(q, xc, x, idx, w, states, segment_ids)
        else:
            o, states = self._masked(q, xc, x, idx, w, states, segment_ids)

        o = self.o_norm(o.astype(self.dtype))                          # per head, over V
        gate = jax.nn.silu(self.g_proj(x).astype(jnp.float32)).reshape(b, t, h, vd)
        o = (o.astype(jnp.float32) * gate).astype(self.dtype)
        y = self.out(o.reshape(b, t, h * vd))
        if cache is not None:
            cache = cache.replace(states=states, q_conv=qc, x_conv=xcc)
        return y, cache
