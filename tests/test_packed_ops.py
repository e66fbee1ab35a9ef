"""Packed documents (segment_ids) in every linear op and backend: a row holding several
documents gives each document exactly what it gets alone, in values, final state and input
gradients; padding is inert even when it holds NaN.

Shape legend: B batch, T time, H heads, K key dim, V value dim, C chunk size.

The rows (C = 8, T = 29): row 0 holds documents of 5, 11 and 6 tokens (starts at 5: inside a
chunk, and at 16: on a chunk boundary) and 7 padding tokens; row 1 holds 6 and 13 tokens (a
start at 6, inside a chunk) and 10 padding. Lengths are not multiples of C. The first document
of a row continues from initial_state; the others start from zero.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention
from pallas_kernels.delta_rule import delta_rule
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gla import gla, simple_gla
from pallas_kernels.kda import kda
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.segments import ChunkMasks, document_positions, document_starts
from tests.parity import relative_error
from tests.test_op_pallas import make_inputs as op_inputs

B, T, H, K, V, C = 2, 29, 2, 8, 4, 8
DOCS = [[5, 11, 6], [6, 13]]
# float32: the chunked forms sum in another order than the token scan (measured <= 3e-6 with
# the op tests' inputs); a document leaking into the next one is an O(1) error.
F32_TOL = 1e-4

OPS = {"gated_delta_rule": gated_delta_rule, "delta_rule": delta_rule, "gla": gla,
       "simple_gla": simple_gla, "kda": kda,
       "linear_attention": functools.partial(linear_attention, normalize=True)}


def segment_ids():
    seg = np.zeros((B, T), np.int32)
    for r, lens in enumerate(DOCS):
        ends = np.cumsum(lens)
        for i, (a, b) in enumerate(zip(ends - lens, ends, strict=True)):
            seg[r, a:b] = i + 1
    return jnp.asarray(seg)


def make_inputs(op, seed=0):
    """(inputs over [B, T], initial state), as the op tests make them (tests/test_op_pallas.py:
    gates in log space, positive features for normalized linear attention)."""
    return op_inputs(op, T, K, V, seed)


def poison_padding(args, seg):
    pad = seg == 0
    return tuple(jnp.where(pad.reshape(pad.shape + (1,) * (a.ndim - 2)), jnp.nan, a)
                 for a in args)


@functools.partial(jax.jit, static_argnames=("op", "backend", "packed", "state_loss"))
def run(args, s0, cts, seg, *, op, backend, packed, state_loss=True):
    """(o, final state) and the gradients in (args, s0) of sum(o * ct_o) + sum(S cos S) (the
    state term only with state_loss: a packed row's final state is its last document's)."""
    def loss(args, s0):
        kw = {} if backend == "reference" else dict(chunk_size=C)
        if packed:
            kw["segment_ids"] = seg
        o, s = OPS[op](*args, initial_state=s0, output_final_state=True, backend=backend, **kw)
        ct_o, ct_s = cts
        total = jnp.sum(o.astype(jnp.float32) * ct_o)
        if state_loss:
            total = total + sum(jnp.sum(a * jnp.cos(a)) for a in jax.tree.leaves(s))
        return total, (o, s)

    grads, out = jax.grad(loss, argnums=(0, 1), has_aux=True)(args, s0)
    return out, grads


def cotangent():
    return (jax.random.normal(jax.random.key(11), (B, T, H, V)), None)


@functools.cache
def alone(op):
    """Each document run by itself through the reference (first document from s0, the others
    from zero): per row, (outputs, grads) as lists over its documents."""
    args, s0 = make_inputs(op)
    ct = cotangent()
    rows = []
    for r, lens in enumerate(DOCS):
        start, docs = 0, []
        for i, n in enumerate(lens):
            piece = tuple(a[r:r + 1, start:start + n] for a in args)
            row = jax.tree.map(lambda x, r=r: x[r:r + 1], s0)
            init = row if i == 0 else jax.tree.map(jnp.zeros_like, row)
            docs.append(run(piece, init, (ct[0][r:r + 1, start:start + n], None), None,
                            op=op, backend="reference", packed=False,
                            state_loss=i == len(lens) - 1))
            start += n
        rows.append(docs)
    return rows


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_packed_row_equals_each_document_alone(op, backend):
    args, s0 = make_inputs(op)
    seg = segment_ids()
    (o, s), (g_args, g_s0) = run(poison_padding(args, seg), s0, cotangent(), seg, op=op,
                                 backend=backend, packed=True)
    for name, x in [("o", o), *[(f"grad {i}", a) for i, a in enumerate(g_args)]]:
        assert np.isfinite(np.asarray(x)).all(), f"{name} not finite"
    real = np.asarray(seg != 0)
    for i, ga in enumerate(g_args):   # padding gets no gradient
        assert not np.asarray(ga)[~real].any(), i
    for r, docs in enumerate(alone(op)):
        start = 0
        for i, ((o_doc, _), (g_doc, g_s0_doc)) in enumerate(docs):
            n = o_doc.shape[1]
            piece = slice(start, start + n)
            assert relative_error(o[r:r + 1, piece], o_doc) < F32_TOL, (r, i, "o")
            for j, (ga, gd) in enumerate(zip(g_args, g_doc, strict=True)):
                assert relative_error(ga[r:r + 1, piece], gd) < F32_TOL, (r, i, "grad", j)
            if i == 0:   # the initial state reaches the first document only
                for a, d in zip(jax.tree.leaves(g_s0), jax.tree.leaves(g_s0_doc), strict=True):
                    assert relative_error(a[r:r + 1], d) < F32_TOL, (r, "grad s0")
            start += n
        # Trailing padding is inert: the final state is the last document's.
        for a, d in zip(jax.tree.leaves(s), jax.tree.leaves(docs[-1][0][1]), strict=True):
            assert relative_error(a[r:r + 1], d) < F32_TOL, (r, "final state")


def test_one_document_per_row_changes_nothing():
    """segment_ids of all ones is the unpacked op (same numbers, no mask effect)."""
    args, s0 = make_inputs("gated_delta_rule")
    ones = jnp.ones((B, T), jnp.int32)
    packed = run(args, s0, cotangent(), ones, op="gated_delta_rule", backend="xla", packed=True)
    plain = run(args, s0, cotangent(), ones, op="gated_delta_rule", backend="xla", packed=False)
    for a, b in zip(jax.tree.leaves(packed), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_chunk_masks_and_starts():
    seg = segment_ids()
    starts = np.asarray(document_starts(seg))
    assert [list(np.flatnonzero(r)) for r in starts] == [[5, 16], [6]]   # not 0, not padding
    m = ChunkMasks(seg, C)
    # Row 0, chunk 0 (tokens 0-7, a start at 5): tokens 0-4 read the incoming state, 5-7 do
    # not; only 5-7 write the end-of-chunk state; the state does not carry over.
    assert list(np.asarray(m.reads[0, 0, 0, :, 0])) == [True] * 5 + [False] * 3
    assert list(np.asarray(m.writes[0, 0, 0, :, 0])) == [False] * 5 + [True] * 3
    assert not bool(m.keeps[0, 0, 0, 0]) and bool(m.keeps[0, 0, 1, 0])
    assert bool(m.same[0, 0, 0, 6, 5]) and not bool(m.same[0, 0, 0, 5, 4])


def test_bad_segment_ids_are_refused():
    args, _ = make_inputs("gla")
    with pytest.raises(ValueError, match=r"segment_ids must be an integer \[B, T\]"):
        gla(*args, segment_ids=jnp.ones((B, T + 1), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be an integer"):
        gla(*args, segment_ids=jnp.ones((B, T), jnp.float32))


# ------------------------------------------------------------------------- softmax attention


@functools.partial(jax.jit, static_argnames=("backend", "window", "n_sinks", "packed"))
def attend(q, k, v, ct, seg, *, backend, window, n_sinks, packed):
    def loss(q, k, v):
        o = attention(q, k, v, window=window, n_sinks=n_sinks, backend=backend,
                      segment_ids=seg if packed else None)
        return jnp.sum(o.astype(jnp.float32) * ct), o

    grads, o = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, grads


@pytest.mark.parametrize("backend,window,n_sinks", [
    ("reference", 4, 2), ("xla", None, 0), ("xla", 4, 2), ("splash", 4, 0), ("flash", None, 0),
    ("flash", 4, 0)])
def test_packed_attention_equals_each_document_alone(backend, window, n_sinks):
    """Each query sees only its own document; windows and sinks count in-document positions
    (sinks are every document's first tokens). GQA: 4 query heads on 2 kv heads."""
    ks = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(ks[0], (B, T, 4, 16))
    k, v = (jax.random.normal(kk, (B, T, 2, 16)) for kk in ks[1:3])
    ct = jax.random.normal(ks[3], (B, T, 4, 16))
    seg = segment_ids()
    pq, pk, pv = poison_padding((q, k, v), seg)
    o, grads = attend(pq, pk, pv, ct, seg, backend=backend, window=window, n_sinks=n_sinks,
                      packed=True)
    assert all(np.isfinite(np.asarray(x)).all() for x in (o, *grads))
    for r, lens in enumerate(DOCS):
        start = 0
        for n in lens:
            piece = slice(start, start + n)
            cut = lambda a, r=r, piece=piece: a[r:r + 1, piece]
            o_doc, g_doc = attend(cut(q), cut(k), cut(v), cut(ct), None, backend="reference",
                                  window=window, n_sinks=n_sinks, packed=False)
            assert relative_error(cut(o), o_doc) < F32_TOL, (r, start)
            for ga, gd in zip(grads, g_doc, strict=True):
                assert relative_error(cut(ga), gd) < F32_TOL, (r, start)
            start += n


def test_document_positions_restart():
    pos = np.asarray(document_positions(segment_ids()))
    assert list(pos[0, :8]) == [0, 1, 2, 3, 4, 0, 1, 2] and pos[0, 16] == 0 and pos[0, 22] == 0
    assert list(pos[1, 4:8]) == [4, 5, 0, 1]


@pytest.mark.parametrize("backend", ["flash", "splash"])
def test_kernels_refuse_segment_ids_with_sinks(backend):
    x = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match=f"backend '{backend}' does not take segment_ids with"):
        attention(x, x, x, window=4, n_sinks=2, backend=backend,
                  segment_ids=jnp.ones((1, 8), jnp.int32))
