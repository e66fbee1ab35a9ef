"""Titans neural long-term memory, token by token: the readable definition of the chunked rule
that the parallel form (xla.py) is checked against.

Shape legend: B batch, T time, H heads, K key (and query) dim, V value dim, E hidden width of an
MLP memory, L memory depth (L_M in the paper), b the chunk size.
    q, k [B, T, H, K]; v [B, T, H, V]; theta, eta, alpha [B, T, H]; o [B, T, H, V].
    memory weights: a tuple of L arrays [B, H, in_l, out_l] (K -> E -> ... -> E -> V).

Titans (Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to Memorize at Test Time",
arXiv:2501.00663, Sec. 3.1). The memory M is an MLP of depth L >= 1 whose weights are trained
online, at test time, on the associative loss (eq. 12)

    l(M; x_t) = ||M(k_t) - v_t||^2                       (summed over V, no 1/2: the paper's loss)

with a momentary surprise, a momentum ("past surprise") and a forgetting gate (eqs. 13-14):

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; x_t)
    M_t = (1 - alpha_t) M_{t-1} + S_t
    y_t = M_t*(q_t)                                     (eq. 15: a forward pass, no update)

The memory is M(x) = W_L(silu(... silu(x W_1) ...)) in row-vector form, no biases, no residual:
L = 1 is exactly a matrix memory M(x) = x W [K, V] (so K and V may differ); hidden layers have
width E. Every gate is per token and per head.

Chunk rule (Sec. 3.2, "parallelizable training"): the sequence is cut into chunks of b tokens,
counted from the first token ever written (t' = t - t mod b in absolute positions), and every
gradient inside a chunk is taken at the chunk-start weights M_{t'} -- the weights before the
chunk's first token. Momentum and forgetting still run token by token. b = 1 is the paper's
fully sequential rule (gradient at M_{t-1}).

Surprise clipping (this codebase's addition; off when grad_clip is None): each token's gradient
is scaled to global norm (over all L layers) at most grad_clip before it enters the momentum,

    grad l  <-  grad l * min(1, grad_clip / ||grad l||),

i.e. theta_t shrinks for that token alone. Without it an MLP memory can diverge inside one
sequence: its step size grows with its own weights (the last layer's gradient scales with the
hidden activations), so once the weights grow, every step grows them faster; a trained MAG
needle model went from |M| ~ 1 to inf within 50 tokens (theta <= 0.01). The clip bounds every
update by theta * grad_clip, so the memory can grow at most linearly in the sequence length.
(Per-sample gradient clipping for the memory is also offered by open Titans implementations,
e.g. titans-pytorch's max_grad_norm.)

Read rule (this codebase's choice, shared by xla.py and the decode step): token t reads M_t, the
memory after its own update, exactly like the delta rule or linear attention read their state.
Within a chunk M_t differs from token to token (each token adds its own gradient term, and the
gates decay the rest), and xla.py reproduces it exactly. (A well-known open implementation
instead reads token t from the weights after the last complete chunk ending at or before t; we
do not, because it makes a token's read blind to up to b - 1 preceding tokens.)

State carried between calls (TitansState): the memory M, the momentum S, the chunk-start
weights M_{t'} of the chunk that holds the next token, and that token's offset t mod b in its
chunk. A call may start mid-chunk (prefill after a partial chunk, single decode steps): the
first tokens then take their gradients at the carried chunk-start weights, as the full pass
over the whole sequence would.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.precision import HIGHEST


class TitansState(NamedTuple):
    """The memory between calls; all float32 (offset int32, one value for the whole batch).

    memory: tuple of L arrays [B, H, in_l, out_l], the weights M_t after the last token.
    momentum: the same structure, S_t.
    chunk_start: the same structure, the weights at the start of the chunk holding the next
        token (where that token's gradient is taken).
    offset: [] int32, the next token's position in its chunk, in [0, b).
    """

    memory: tuple
    momentum: tuple
    chunk_start: tuple
    offset: jax.Array


def memory_read(weights, x: jax.Array) -> jax.Array:
    """M*(x): the memory's forward pass, without update (eq. 15).

    Args:
        weights: tuple of L arrays [B, H, in_l, out_l].
        x: [B, ..., H, K] queries (any number of middle axes, e.g. time), float32.

    Returns:
        [B, ..., H, V] float32.
    """
    for i, w in enumerate(weights):
        x = jnp.einsum("b...hi,bhio->b...ho", x, w, precision=HIGHEST)
        if i < len(weights) - 1:
            x = jax.nn.silu(x)
    return x


def associative_loss(weights, k: jax.Array, v: jax.Array) -> jax.Array:
    """sum over batch and heads of ||M(k) - v||^2 (eq. 12). k [B, H, K], v [B, H, V].

    The (b, h) terms depend on disjoint weight slices, so the gradient of this sum is the
    per-(b, h) gradient of each token's own loss.
    """
    return jnp.sum((memory_read(weights, k) - v) ** 2)


def _f32_tree(tree):
    return tuple(jnp.asarray(x, jnp.float32) for x in tree)


def initial_state(memory0, momentum0=None, chunk_start0=None, chunk_offset=0) -> TitansState:
    """A float32 TitansState from the op's arguments (momentum zeros, chunk_start = memory if
    not given)."""
    memory = _f32_tree(memory0)
    momentum = (tuple(jnp.zeros_like(w) for w in memory) if momentum0 is None
                else _f32_tree(momentum0))
    chunk_start = memory if chunk_start0 is None else _f32_tree(chunk_start0)
    return TitansState(memory, momentum, chunk_start, jnp.asarray(chunk_offset, jnp.int32))


def clip_scale(sq_norm: jax.Array, grad_clip: float | None) -> jax.Array | float:
    """min(1, grad_clip / sqrt(sq_norm)) from a squared gradient norm (1.0 when no clip).

    Written as grad_clip * rsqrt(max(sq_norm, grad_clip^2)): no sqrt of 0 (a padded token's
    gradient is exactly 0, and d sqrt / dx is inf there), and the max is constant below the
    threshold, so unclipped tokens carry no gradient through the scale.
    """
    if grad_clip is None:
        return 1.0
    return grad_clip * jax.lax.rsqrt(jnp.maximum(sq_norm, grad_clip ** 2))


def titans_step(state: TitansState, q, k, v, theta, eta, alpha, *, chunk_size: int,
                grad_clip: float | None = None) -> tuple[jax.Array, TitansState]:
    """One token of the chunked rule, in float32: the decode step and the reference's body.

    Args:
        state: the memory before the token.
        q, k: [B, H, K]; v: [B, H, V]; theta, eta, alpha: [B, H].
        chunk_size: b.
        grad_clip: per-token gradient norm cap (module docstring), None for none.

    Returns:
        (o [B, H, V] float32 = M_t*(q_t), the state after the token).
    """
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    q, k, v = f32(q), f32(k), f32(v)
    theta, eta, alpha = (f32(a)[..., None, None] for a in (theta, eta, alpha))
    # A new chunk starts here: its gradients are taken at the weights before its first token.
    starts = state.offset == 0
    grad_w = tuple(jnp.where(starts, m, g) for m, g in zip(state.memory, state.chunk_start))
    grads = jax.grad(associative_loss)(grad_w, k, v)
    if grad_clip is not None:      # one scale per (b, h): the norm over every layer's gradient
        scale = clip_scale(sum(jnp.sum(g ** 2, axis=(-2, -1)) for g in grads), grad_clip)
        grads = tuple(g * scale[..., None, None] for g in grads)
    momentum = tuple(eta * s - theta * g for s, g in zip(state.momentum, grads))     # eq. 14
    memory = tuple((1 - alpha) * m + s for m, s in zip(state.memory, momentum))      # eq. 13
    o = memory_read(memory, q)                                                       # eq. 15
    offset = (state.offset + 1) % chunk_size
    # Canonical form: chunk_start is always the next token's gradient weights.
    chunk_start = tuple(jnp.where(offset == 0, m, g) for m, g in zip(memory, grad_w))
    return o, TitansState(memory, momentum, chunk_start, offset)


def titans_memory_reference(q, k, v, theta, eta, alpha, *, memory0, momentum0=None,
                            chunk_start0=None, chunk_offset=0, chunk_size=16,
                            output_final_state=False, grad_clip=None):
    """Runs the chunked rule one token at a time (lax.scan over T), in float32.

    Args: as pallas_kernels.titans.titans_memory.

    Returns:
        (o [B, T, H, V] in q's dtype, final TitansState or None).
    """
    tm = lambda x: jnp.swapaxes(jnp.asarray(x, jnp.float32), 0, 1)   # time-major for the scan
    state = initial_state(memory0, momentum0, chunk_start0, chunk_offset)

    def step(st, xs):
        o, st = titans_step(st, *xs, chunk_size=chunk_size, grad_clip=grad_clip)
        return st, o

    state, o = jax.lax.scan(step, state, tuple(tm(x) for x in (q, k, v, theta, eta, alpha)))
    return jnp.swapaxes(o, 0, 1).astype(q.dtype), (state if output_final_state else None)


def titans_memory_packed_reference(q, k, v, theta, eta, alpha, *, memory0, segment_ids,
                                   momentum0=None, chunk_start0=None, chunk_offset=0,
                                   chunk_size=16, grad_clip=None):
    """Packed documents token by token: at each document start the state is reset to
    initial_state(memory0, momentum0, chunk_start0, chunk_offset), so every document runs the
    chunked rule from there, its chunks counted from its own start, as it would alone;
    padding steps change nothing and output 0. Rows run independently (vmap: each row keeps
    its own chunk offset).

    Args: as titans_memory_reference, plus segment_ids [B, T] int (0 = padding); the state
        arguments are every document's starting state.

    Returns:
        o [B, T, H, V] in q's dtype.
    """
    from pallas_kernels.segments import document_positions

    real = segment_ids != 0
    opens = real & (document_positions(segment_ids) == 0)

    def row(xs, start, opens, real):         # one row: xs [T, ...], start: [H, in, out] trees
        def one(tree):
            return None if tree is None else tuple(w[None] for w in tree)

        fresh = initial_state(*(one(tree) for tree in start), chunk_offset)

        def step(st, inputs):
            tok, opens_t, real_t = inputs
            st = jax.tree.map(lambda a, f: jnp.where(opens_t, f, a), st, fresh)
            o, new = titans_step(st, *(x[None] for x in tok), chunk_size=chunk_size,
                                 grad_clip=grad_clip)
            new = jax.tree.map(lambda n, a: jnp.where(real_t, n, a), new, st)
            return new, jnp.where(real_t, o[0], 0.0)

        _, o = jax.lax.scan(step, fresh, (xs, opens, real))
        return o

    xs = tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, theta, eta, alpha))
    f32 = lambda tree: None if tree is None else tuple(jnp.asarray(w, jnp.float32) for w in tree)
    o = jax.vmap(row)(xs, (f32(memory0), f32(momentum0), f32(chunk_start0)), opens, real)
    return o.astype(q.dtype)
