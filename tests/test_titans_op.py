"""Titans memory op: chunked XLA form == token-by-token reference (values, final state and
gradients of every input, memory depth 1 and 2, chunk sizes 1 / 16 / 64, T not a multiple),
b = 1 == the paper's fully sequential rule written out here, chained calls == one pass (also
from mid-chunk offsets, static and traced), padding leaves the state alone, no NaN under
saturated gates, argument errors.

Shapes: B batch, T time, H heads, K key dim, V value dim, E hidden width of the MLP memory.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.titans import TitansState, memory_read, titans_memory

B, H, K, V, E = 2, 2, 4, 3, 6


def _inputs(t, depth, seed=0, b=B):
    ks = jax.random.split(jax.random.key(seed), 12)
    n = jax.random.normal
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q, k = unit(n(ks[0], (b, t, H, K))), unit(n(ks[1], (b, t, H, K)))
    v = n(ks[2], (b, t, H, V))
    # Gates in the ranges the layer produces; theta kept moderate so the MLP memory stays
    # bounded (a diverging memory amplifies rounding and says nothing about the two paths).
    theta = 0.3 * jax.nn.sigmoid(n(ks[3], (b, t, H)))
    eta = jax.nn.sigmoid(n(ks[4], (b, t, H)) + 1.0)
    alpha = jax.nn.sigmoid(n(ks[5], (b, t, H)) - 2.0)
    dims = [K] + [E] * (depth - 1) + [V]
    mem = tuple(n(ks[6 + i], (b, H, dims[i], dims[i + 1])) / np.sqrt(dims[i])
                for i in range(depth))
    mom = tuple(0.1 * n(ks[9 + i], (b, H, dims[i], dims[i + 1])) for i in range(depth))
    return (q, k, v, theta, eta, alpha), mem, mom


def _close(a, b, rtol=1e-5):
    """max |a - b| <= rtol * max |b| (+ a tiny floor for all-zero leaves)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.max(np.abs(a - b))
    assert err <= rtol * np.max(np.abs(b)) + 1e-7, (err, np.max(np.abs(b)))


@functools.cache
def _value_and_grads(backend, chunk_size, grad_clip=None):
    """jit of (inputs, mem, mom, cotangents) -> (o, final state, grads of every input)."""
    def loss(args, mem, mom, cts):
        o, st = titans_memory(*args, memory0=mem, momentum0=mom, chunk_size=chunk_size,
                              output_final_state=True, backend=backend, grad_clip=grad_clip)
        ct_o, ct_m, ct_s = cts
        total = jnp.sum(o * ct_o)
        total += sum(jnp.sum(a * c) for a, c in zip(st.memory, ct_m))
        total += sum(jnp.sum(a * c) for a, c in zip(st.momentum, ct_s))
        return total, (o, st)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk_size,grad_clip", [(1, None), (16, None), (64, None), (16, 0.5)])
def test_xla_matches_reference(depth, chunk_size, grad_clip):
    t = 70                                   # not a multiple of 16 or 64: padded last chunk
    args, mem, mom = _inputs(t, depth)
    ks = jax.random.split(jax.random.key(9), 3)
    cts = (jax.random.normal(ks[0], (B, t, H, V)),
           tuple(jax.random.normal(ks[1], m.shape) for m in mem),
           tuple(jax.random.normal(ks[2], m.shape) for m in mom))
    g_ref, (o_ref, s_ref) = _value_and_grads("reference", chunk_size, grad_clip)(
        args, mem, mom, cts)
    g_xla, (o_xla, s_xla) = _value_and_grads("xla", chunk_size, grad_clip)(args, mem, mom, cts)
    if grad_clip is not None:     # the clip must bind, or this case tests nothing new
        _, (o_free, _) = _value_and_grads("reference", chunk_size)(args, mem, mom, cts)
        assert np.max(np.abs(o_free - o_ref)) > 0.1 * np.max(np.abs(o_ref))
    _close(o_xla, o_ref)
    assert int(s_xla.offset) == int(s_ref.offset) == t % chunk_size
    for a, r in zip(jax.tree.leaves(s_xla[:3]), jax.tree.leaves(s_ref[:3])):
        _close(a, r)
    # Gradients of q, k, v, theta, eta, alpha, memory0 and momentum0.
    leaves_x, leaves_r = jax.tree.leaves(g_xla), jax.tree.leaves(g_ref)
    assert len(leaves_x) == len(leaves_r) == 6 + 2 * depth
    for a, r in zip(leaves_x, leaves_r):
        assert np.all(np.isfinite(np.asarray(a)))
        _close(a, r)


def test_grad_clip_bounds_the_memory_growth():
    """Each token's clipped gradient has norm <= c, so (eta <= 1) |S_t| <= theta_max c t and
    |M_T| <= |M_0| + theta_max c T (T + 1) / 2 (Frobenius norm over all layers, per row and
    head). With a far too large theta the unclipped memory blows past that bound."""
    t, clip, theta_max = 48, 1.0, 5.0
    args, mem, _ = _inputs(t, 2, seed=3)
    args = (*args[:3], theta_max * jax.nn.sigmoid(args[3]), *args[4:])
    run = lambda c: titans_memory(*args, memory0=mem, chunk_size=16, output_final_state=True,
                                  grad_clip=c)[1].memory
    norm = lambda ws: np.sqrt(sum(np.sum(np.asarray(w, np.float64) ** 2, axis=(-2, -1))
                                  for w in ws))                             # [B, H]
    bound = norm(mem) + theta_max * clip * t * (t + 1) / 2
    assert np.all(norm(run(clip)) <= bound)
    free = norm(run(None))
    assert not np.all(np.isfinite(free) & (free <= bound))


def _paper_sequential(args, mem, mom):
    """The paper's rule (eqs. 12-15) as a plain loop over tokens, batch and heads:
    g = grad ||M_{t-1}(k_t) - v_t||^2, S = eta S - theta g, M = (1 - alpha) M + S, y = M(q)."""
    q, k, v, theta, eta, alpha = (np.asarray(a, np.float64) for a in args)
    depth = len(mem)

    def apply(ws, x):
        for i, w in enumerate(ws):
            x = x @ w
            if i < depth - 1:
                x = x / (1 + np.exp(-x))           # silu
        return x

    def loss(ws, kt, vt):                           # for jax.grad (depth 2)
        x = kt
        for i, w in enumerate(ws):
            x = x @ w
            if i < depth - 1:
                x = jax.nn.silu(x)
        return jnp.sum((x - vt) ** 2)

    b, t, h = theta.shape
    out = np.zeros(v.shape)
    for bi in range(b):
        for hi in range(h):
            ws = [np.asarray(m[bi, hi], np.float64) for m in mem]
            ss = [np.asarray(s[bi, hi], np.float64) for s in mom]
            for ti in range(t):
                kt, vt = k[bi, ti, hi], v[bi, ti, hi]
                if depth == 1:                      # closed form: 2 k (k W - v)^T
                    grads = [2 * np.outer(kt, kt @ ws[0] - vt)]
                else:
                    grads = [np.asarray(g, np.float64) for g in jax.grad(loss)(
                        [jnp.asarray(w, jnp.float32) for w in ws],
                        jnp.asarray(kt, jnp.float32), jnp.asarray(vt, jnp.float32))]
                ss = [eta[bi, ti, hi] * s - theta[bi, ti, hi] * g for s, g in zip(ss, grads)]
                ws = [(1 - alpha[bi, ti, hi]) * w + s for w, s in zip(ws, ss)]
                out[bi, ti, hi] = apply(ws, q[bi, ti, hi])
    return out


@pytest.mark.parametrize("depth", [1, 2])
def test_chunk_size_one_is_the_papers_sequential_rule(depth):
    args, mem, mom = _inputs(9, depth, seed=3, b=1)
    want = _paper_sequential(args, mem, mom)
    for backend in ("reference", "xla"):
        o, _ = titans_memory(*args, memory0=mem, momentum0=mom, chunk_size=1, backend=backend)
        _close(o, want, rtol=2e-5)   # the loop's grads for depth 2 are float32 jax.grad


@functools.cache
def _piece(backend, chunk_size, static_offset=None):
    """A jitted call from a carried state; chunk_offset traced (as in a decode cache) unless
    static_offset is given."""
    def run(args, memory, momentum, chunk_start, offset):
        return titans_memory(*args, memory0=memory, momentum0=momentum,
                             chunk_start0=chunk_start,
                             chunk_offset=offset if static_offset is None else static_offset,
                             chunk_size=chunk_size, output_final_state=True, backend=backend)
    return jax.jit(run)


@pytest.mark.parametrize("depth", [1, 2])
def test_one_pass_equals_chained_calls(depth):
    t = 48
    args, mem, mom = _inputs(t, depth, seed=5)
    o_full, s_full = _piece("xla", 16, 0)(args, mem, mom, mem, 0)
    # 48 == 3 x 16 (aligned), and 10 + 20 + 18 (calls starting mid-chunk, offsets traced as in
    # the decode cache; for depth 2 also static offsets and the reference).
    modes = [((16, 16, 16), "xla", False), ((10, 20, 18), "xla", False)]
    if depth == 2:
        modes += [((10, 20, 18), "xla", True), ((10, 20, 18), "reference", False)]
    for pieces, backend, static in modes:
        st = TitansState(mem, mom, mem, jnp.zeros((), jnp.int32))
        outs, start = [], 0
        for size in pieces:
            fn = _piece(backend, 16, int(st.offset) if static else None)
            o, st = fn(tuple(a[:, start:start + size] for a in args), st.memory, st.momentum,
                       st.chunk_start, st.offset)
            outs.append(o)
            start += size
        _close(jnp.concatenate(outs, axis=1), o_full)
        assert int(st.offset) == 0
        for a, r in zip(jax.tree.leaves(st[:3]), jax.tree.leaves(s_full[:3])):
            _close(a, r)


def test_padding_leaves_the_final_state_alone():
    # 20 tokens in chunks of 16: 12 padded steps after the last token must not move M or S,
    # even with a large momentum (theta = 0, alpha = 0, eta = 1 alone would: M += S).
    args, mem, mom = _inputs(20, 2, seed=7)
    mom = tuple(10.0 * m for m in mom)
    _, s_ref = titans_memory(*args, memory0=mem, momentum0=mom, chunk_size=16,
                             output_final_state=True, backend="reference")
    _, s_xla = titans_memory(*args, memory0=mem, momentum0=mom, chunk_size=16,
                             output_final_state=True, backend="xla")
    _, s_16 = titans_memory(*(a[:, :16] for a in args), memory0=mem, momentum0=mom,
                            chunk_size=16, output_final_state=True, backend="xla")
    assert int(s_xla.offset) == 4
    for a, r in zip(jax.tree.leaves(s_xla[:3]), jax.tree.leaves(s_ref[:3])):
        _close(a, r)
    for a, r in zip(s_xla.chunk_start, s_16.memory):   # the open chunk started after token 16
        _close(a, r)


@pytest.mark.parametrize("depth", [1, 2])
def test_no_nan_under_saturated_gates(depth):
    # Long T, alpha = 1 and eta = 0 exactly on every third token (saturated float32 sigmoids)
    # and alpha = 0.999 elsewhere: the decay products underflow within a chunk of 64. Values
    # and gradients must stay finite and the xla form must still equal the reference. (theta
    # stays moderate: with theta = 1 an MLP memory itself diverges, in both backends.)
    t = 512
    args, mem, _ = _inputs(t, depth, seed=11, b=1)
    q, k, v, theta, eta, alpha = args
    strong = (jnp.arange(t) % 3 == 0)[None, :, None]
    alpha = jnp.where(strong, 1.0, jnp.full_like(alpha, 0.999))
    args = (q, k, v, theta, jnp.where(strong, 0.0, eta), alpha)

    def loss(args, mem, backend):
        o, st = titans_memory(*args, memory0=mem, chunk_size=64, output_final_state=True,
                              backend=backend)
        return jnp.sum(o ** 2) + sum(jnp.sum(m ** 2) for m in st.memory), o

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (value, o), grads = grad(args, mem, "xla")
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    o_ref, _ = titans_memory(*args, memory0=mem, chunk_size=64, backend="reference")
    _close(o, o_ref, rtol=1e-4)


def test_memory_read_is_the_forward_pass():
    _, mem, _ = _inputs(1, 2)
    x = jax.random.normal(jax.random.key(1), (B, 5, H, K))
    want = jnp.einsum("bthe,bhev->bthv", jax.nn.silu(jnp.einsum("bthk,bhke->bthe", x, mem[0])),
                      mem[1])
    _close(memory_read(mem, x), want)


@pytest.mark.parametrize("change,pattern", [
    (dict(backend="pallas"), "unknown backend 'pallas'; choose one of 'auto', 'reference', 'xla'"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_offset=16), r"chunk_offset must be in \[0, chunk_size=16\)"),
    (dict(memory0=()), "memory0 must hold at least one weight matrix"),
    (dict(memory0=(jnp.zeros((B, H, K, V + 1)),)), "last layer outputs 4 features"),
    (dict(memory0=(jnp.zeros((B, H, K + 1, V)),)), r"memory0\[0\] must be \[B, H, in, out\]"),
    (dict(momentum0=(jnp.zeros((B, H, K, 1)),)), "momentum0 must match memory0's shapes"),
])
def test_argument_errors(change, pattern):
    args, mem, _ = _inputs(4, 1)
    kwargs = dict(memory0=mem, chunk_size=16) | change
    with pytest.raises(ValueError, match=pattern):
        titans_memory(*args, **kwargs)


def test_bad_gate_shape():
    (q, k, v, theta, eta, alpha), mem, _ = _inputs(4, 1)
    with pytest.raises(ValueError, match=r"eta must be \[B, T, H\]"):
        titans_memory(q, k, v, theta, eta[..., :1], alpha, memory0=mem)
