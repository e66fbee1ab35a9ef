"""NSA's Pallas kernels (pallas_kernels/nsa/selected.py: triton.py for the GPU, mosaic.py for the
TPU) in the Pallas interpreters against the reference: values, blocks and every input's
gradient, on packed rows with NaN-poisoned padding and documents that start off the block
grid (so blocks straddle key tiles); and the backward's work list against its definition.
Lowering for cuda / tpu at 16k and 64k is in tests/test_lowering.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.backends import interpret_kernels
from pallas_kernels.nsa import nsa
from pallas_kernels.nsa.selected import tile_pairs
from tests.parity import packed_segment_ids, relative_error

B, T, HQ, H, K, V = 2, 37, 6, 2, 8, 16
GEO = dict(cmp_block=4, cmp_stride=2, block_size=4, block_count=4, window=5)
DOCS = [[9, 20, 8], [16, 18]]           # row 1: 3 tokens of padding at the end


def segments():
    return jnp.asarray(packed_segment_ids(DOCS, T))


def inputs(seed, dtype):
    ks = jax.random.split(jax.random.key(seed), 9)
    c = (T - GEO["cmp_block"]) // GEO["cmp_stride"] + 1
    q = jax.random.normal(ks[0], (B, T, HQ, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V))
    gates = [jax.nn.sigmoid(jax.random.normal(ks[3 + i], (B, T, HQ))) for i in range(3)]
    k_cmp = jax.random.normal(ks[6], (B, c, H, K))
    v_cmp = jax.random.normal(ks[7], (B, c, H, V))
    ct = jax.random.normal(ks[8], (B, T, HQ, V))
    cast = lambda x: x.astype(dtype)  # noqa: E731
    return [cast(q), cast(k), cast(v), *gates, cast(k_cmp), cast(v_cmp)], ct


@functools.partial(jax.jit, static_argnames=("backend",))
def value_and_grads(args, ct, seg, *, backend):
    def loss(q, k, v, gc, gs, gw, kc, vc):
        o, blocks = nsa(q, k, v, gc, gs, gw, k_cmp=kc, v_cmp=vc, segment_ids=seg,
                        backend=backend, query_chunk=16, return_block_indices=True, **GEO)
        return jnp.sum(o.astype(jnp.float32) * ct), (o, blocks)

    (_, (o, blocks)), grads = jax.value_and_grad(loss, argnums=tuple(range(8)),
                                                 has_aux=True)(*args)
    return o, blocks, grads


NAMES = ["q", "k", "v", "g_cmp", "g_slc", "g_swa", "k_cmp", "v_cmp"]


@pytest.mark.parametrize("driver", ["gpu", "tpu"])
def test_kernels_equal_the_reference_on_packed_rows(driver):
    """float32: summation order only (2e-6 values, 1e-5 gradients). Padding is NaN in q, k,
    v: the kernels must leave it out of every output and gradient."""
    args, ct = inputs(0, jnp.float32)
    seg = segments()
    pad = (seg == 0)[..., None, None]
    args[:3] = [jnp.where(pad, jnp.nan, x) for x in args[:3]]
    want_o, want_blocks, want = value_and_grads(args, ct, seg, backend="reference")
    # conftest runs every test inside interpret_kernels(): the kernels run in the interpreter.
    got_o, got_blocks, got = value_and_grads(args, ct, seg, backend=f"pallas_{driver}")
    np.testing.assert_array_equal(np.asarray(got_blocks), np.asarray(want_blocks))
    assert np.isfinite(np.asarray(got_o)).all()
    assert relative_error(np.asarray(got_o), np.asarray(want_o)) < 2e-6
    for name, a, b in zip(NAMES, got, want):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all() and np.abs(b).max() > 0, name
        assert relative_error(a, b) < 1e-5, name


def test_gpu_kernels_in_bf16():
    """bf16 operands (the kernels multiply probabilities and values in bf16, the reference in
    float32): 2e-2 relative, the XLA form's bf16 tolerance in tests/test_op_nsa.py (measured:
    values 0.4%, gradients up to 0.9%, as the XLA form's; bf16's epsilon is 0.4%)."""
    args, ct = inputs(1, jnp.bfloat16)
    seg = jnp.ones((B, T), jnp.int32)
    want_o, want_blocks, want = value_and_grads(args, ct, seg, backend="reference")
    got_o, got_blocks, got = value_and_grads(args, ct, seg, backend="pallas_gpu")
    np.testing.assert_array_equal(np.asarray(got_blocks), np.asarray(want_blocks))
    assert relative_error(np.asarray(got_o, np.float32), np.asarray(want_o, np.float32)) < 2e-2
    for name, a, b in zip(NAMES, got, want):
        assert relative_error(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 2e-2, name


def test_kernels_are_refused_off_their_platform():
    """Outside the interpreter a TPU kernel on this CPU (or a GPU) is one clear error."""
    args, _ = inputs(0, jnp.float32)
    with interpret_kernels(False), pytest.raises(ValueError,
                                                 match="'pallas_tpu' is a TPU kernel and this"):
        nsa(*args[:6], backend="pallas_tpu", **GEO)


@pytest.mark.parametrize("tile", [4, 16])
def test_tile_pairs_list_every_block_under_each_tile_it_overlaps(tile):
    """Random block starts (aligned and not, some unused): tile j's entries are exactly the
    (query, first key) pairs whose keys [first, first + l') meet [j TS, (j + 1) TS)."""
    rng = np.random.default_rng(3)
    bs, n, t, b, h = 4, 3, 29, 2, 2
    n_tiles = -(-(t + tile) // tile)
    starts = rng.integers(-1, t, size=(b, t, h, n)).astype(np.int32)
    starts[starts < -1] = -1
    offsets, pair_t, pair_start = (np.asarray(x) for x in tile_pairs(
        jnp.asarray(starts), bs, tile, n_tiles))
    for r in range(b):
        for hh in range(h):
            assert offsets[r, hh, 0] == 0
            for j in range(n_tiles):
                lo, hi = offsets[r, hh, j], offsets[r, hh, j + 1]
                got = sorted(zip(pair_t[r, hh, lo:hi], pair_start[r, hh, lo:hi]))
                want = sorted((q, s) for q in range(t) for s in starts[r, q, hh]
                              if s >= 0 and s < (j + 1) * tile and s + bs > j * tile)
                assert got == want, (r, hh, j)
