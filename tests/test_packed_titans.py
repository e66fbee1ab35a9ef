"""Packed documents through Titans: the op (reference, xla, and xla's exact fallback when the
document-by-document layout lacks room), the document layout itself, and the Titans layers.

Shape legend: B batch, T time, H heads, K key dim, V value dim, E hidden width, C chunk size.
Rows as in tests/test_packed_ops.py: documents of 5, 11 and 6 tokens and 7 padding; 6 and 13
and 10 padding (T = 29, C = 8: starts inside a chunk and on a chunk boundary).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.segments import document_layout
from pallas_kernels.titans import titans_memory
from tests.test_packed_ops import DOCS, C, T, poison_padding, segment_ids
from tests.test_titans_op import _close, _inputs

# float32: the chunked form sums in another order than the token scan; measured <= 2e-6
# relative (values and gradients) on these inputs. A leak between documents is O(1).
RTOL = 1e-5


@functools.partial(jax.jit, static_argnames=("backend", "capacity"))
def run(args, mem, ct, seg, *, backend, capacity=None):
    """o and the gradients in (args, memory0) of sum(o * ct); seg None: one sequence per row."""
    def loss(args, mem):
        kw = {} if seg is None else dict(segment_ids=seg, chunk_capacity=capacity)
        o, _ = titans_memory(*args, memory0=mem, chunk_size=C, backend=backend, grad_clip=0.5,
                             **kw)
        return jnp.sum(o * ct), o

    grads, o = jax.grad(loss, argnums=(0, 1), has_aux=True)(args, mem)
    return o, grads


@pytest.mark.parametrize("backend,capacity", [("reference", None), ("xla", None),
                                              ("xla", 2)])     # 2 chunks: the exact fallback
def test_packed_titans_op_equals_each_document_alone(backend, capacity):
    args, mem, _ = _inputs(T, depth=2)
    ct = jax.random.normal(jax.random.key(3), args[2].shape)
    seg = segment_ids()
    if capacity is not None:
        assert not document_layout(seg, C, capacity).fits
    o, (g_args, g_mem) = run(poison_padding(args, seg), mem, ct, seg, backend=backend,
                             capacity=capacity)
    for x in (o, *g_args, *g_mem):
        assert np.isfinite(np.asarray(x)).all()
    real = np.asarray(seg != 0)
    assert not np.asarray(o)[~real].any()
    for g in g_args:                                      # padding gets no gradient
        assert not np.asarray(g)[~real].any()
    want_mem = [np.zeros_like(m) for m in mem]
    for r, lens in enumerate(DOCS):
        start = 0
        for n in lens:
            cut = lambda a, r=r, start=start, n=n: a[r:r + 1, start:start + n]  # noqa: E731
            o_doc, (g_doc, gm_doc) = run(tuple(cut(a) for a in args),
                                         tuple(m[r:r + 1] for m in mem), cut(ct), None,
                                         backend="reference")
            _close(cut(o), o_doc, RTOL)
            for got, want in zip(g_args, g_doc, strict=True):
                _close(cut(got), want, RTOL)
            for w, gm in zip(want_mem, gm_doc, strict=True):
                w[r] += np.asarray(gm[0])
            start += n
    for got, want in zip(g_mem, want_mem, strict=True):
        _close(got, want, RTOL)


def test_document_layout_starts_every_document_on_a_block():
    seg = segment_ids()
    lay = document_layout(seg, block=8, n_blocks=8, prefix=3)
    slot = np.asarray(lay.slot)
    buf = np.asarray(lay.segment_ids)
    for r, lens in enumerate(DOCS):
        start, first_block = 0, 0
        for d, n in enumerate(lens, start=1):
            want = first_block * 8 + 3 + np.arange(n)
            np.testing.assert_array_equal(slot[r, start:start + n], want)
            assert (buf[r, first_block * 8: first_block * 8 + 3] == 0).all()   # prefix: empty
            assert lay.opens[r, first_block] and buf[r, want].tolist() == [d] * n
            first_block += -(-(3 + n) // 8)
            start += n
        assert (slot[r, start:] == 8 * 8).all()                      # padding: dropped
        assert not np.asarray(lay.opens)[r, first_block:].any()
    assert lay.fits and not document_layout(seg, block=8, n_blocks=4, prefix=3).fits


def test_packed_titans_refuses_carried_state():
    args, mem, _ = _inputs(T, depth=1)
    with pytest.raises(ValueError, match="must be a Python int"):
        titans_memory(*args, memory0=mem, chunk_offset=jnp.int32(1), segment_ids=segment_ids())
    with pytest.raises(ValueError, match="go without output_final_state"):
        titans_memory(*args, memory0=mem, output_final_state=True, segment_ids=segment_ids())


@pytest.mark.parametrize("backend,capacity", [("reference", None), ("xla", None), ("xla", 3)])
def test_every_document_starts_from_the_given_state(backend, capacity):
    """With a starting state (momentum, chunk-start weights, a mid-chunk offset: what the
    persistent tokens leave), each packed document gets what it gets alone from that state."""
    args, mem, mom = _inputs(T, depth=2)
    start = tuple(0.9 * m for m in mem)
    seg = segment_ids()
    kw = dict(memory0=mem, momentum0=mom, chunk_start0=start, chunk_offset=3, chunk_size=C,
              grad_clip=0.5, backend=backend)
    o, _ = titans_memory(*args, segment_ids=seg, chunk_capacity=capacity, **kw)
    for r, lens in enumerate(DOCS):
        a = 0
        for n in lens:
            one = lambda tree, r=r: tuple(x[r:r + 1] for x in tree)  # noqa: E731
            o_doc, _ = titans_memory(*(x[r:r + 1, a:a + n] for x in args), **{
                **kw, "memory0": one(mem), "momentum0": one(mom), "chunk_start0": one(start),
                "backend": "reference"})
            _close(o[r:r + 1, a:a + n], o_doc, RTOL)
            a += n
