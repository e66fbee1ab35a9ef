"""The nsa op (pallas_kernels/nsa): block selection against its definition written out query by
query, the reference against plain attention where NSA reduces to it, the XLA gathered form
against the reference (values, blocks, gradients, float32 and bf16), packed documents, cache
queries, and refusals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention.reference import attention_reference
from pallas_kernels.nsa import Geometry, compression_slots, nsa
from tests.parity import packed_segment_ids, relative_error

B, T, HQ, H, K = 2, 37, 4, 2, 8
# Small blocks so a 37-token row has many of each: compressed tokens of 4 keys every 2,
# blocks of 4, 3 blocks per query (the forced three fill them early on), window 4.
GEO = dict(cmp_block=4, cmp_stride=2, block_size=4, block_count=4, window=4)


def inputs(seed=0, t=T, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, t, HQ, K))
    k = jax.random.normal(ks[1], (B, t, H, K))
    v = jax.random.normal(ks[2], (B, t, H, K))
    gates = [jax.nn.sigmoid(jax.random.normal(ks[3 + i], (B, t, HQ))) for i in range(3)]
    return [x.astype(dtype) for x in (q, k, v)] + gates


GEO_ITEMS = tuple(GEO.items())


@functools.partial(jax.jit, static_argnames=("backend", "geo", "query_chunk"))
def run(q, k, v, gc, gs, gw, seg=None, *, backend, geo=GEO_ITEMS, query_chunk=16):
    return nsa(q, k, v, gc, gs, gw, segment_ids=seg, backend=backend, query_chunk=query_chunk,
               return_block_indices=True, **dict(geo))


def selection_by_definition(q, k, geo, doc_start=None):
    """Blocks per (row, query, kv head) from the paper's definitions, one query at a time in
    numpy: mean-pooled compressed tokens of the query's document, their softmax, each block's
    score = sum of probabilities x stride units shared, summed over the group; forced first /
    current / previous; then the best by score, ties to the lower block. Returns sets and the
    gap between the last kept and the first dropped score (near-ties are left out)."""
    g = Geometry(**geo)
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, t, hq, kd = q.shape
    h = k.shape[2]
    out = {}
    for r in range(b):
        for i in range(t):
            s0 = 0 if doc_start is None else doc_start[r][i]
            p = i - s0
            # compressed tokens of the document visible at i: keys [s0 + c d, s0 + c d + l)
            ends = [c for c in range(0, p + 1) if c * g.cmp_stride + g.cmp_block - 1 <= p]
            cur = p // g.block_size
            for hh in range(h):
                score = np.zeros(cur + 1)
                for gq in range(hq // h):
                    qi = q[r, i, hh * (hq // h) + gq]
                    kc = [k[r, s0 + c * g.cmp_stride: s0 + c * g.cmp_stride + g.cmp_block,
                            hh].mean(0) for c in ends]
                    if not kc:
                        continue
                    logits = np.array([qi @ x for x in kc]) * kd ** -0.5
                    probs = np.exp(logits - logits.max())
                    probs /= probs.sum()
                    for c, pc in zip(ends, probs):
                        lo, hi = c * g.cmp_stride, c * g.cmp_stride + g.cmp_block
                        for j in range(cur + 1):
                            shared = max(0, min(hi, (j + 1) * g.block_size)
                                         - max(lo, j * g.block_size))
                            score[j] += pc * shared / g.cmp_stride
                forced = {0, cur, max(cur - 1, 0)}
                rest = sorted((j for j in range(cur + 1) if j not in forced),
                              key=lambda j: (-score[j], j))
                keep = g.block_count - len(forced)
                chosen = forced | set(rest[:keep])
                gap = (score[rest[keep - 1]] - score[rest[keep]]
                       if 0 < keep < len(rest) else np.inf)
                out[r, i, hh] = (chosen, gap)
    return out


def test_selection_matches_the_definition_query_by_query():
    q, k, v, *gates = inputs(1)
    _, blocks = run(q, k, v, *gates, backend="xla")
    want = selection_by_definition(q, k, GEO)
    checked = 0
    for (r, i, hh), (chosen, gap) in want.items():
        got = [int(j) for j in np.asarray(blocks[r, i, hh]) if j >= 0]
        assert len(got) == len(set(got)) == min(GEO["block_count"], i // 4 + 1)
        if gap > 1e-6:
            assert set(got) == chosen, (r, i, hh, got, chosen)
            checked += 1
    assert checked > 0.9 * len(want)


def test_forced_blocks_come_first_and_ties_go_to_the_lower_block():
    q, k, v, *gates = inputs(2)
    # Zero queries: every compressed probability uniform, so blocks 1 .. cur - 2 score by the
    # stride units they share with visible tokens, with ties; the lower block must win them.
    _, blocks = run(jnp.zeros_like(q), k, v, *gates, backend="xla",
                    geo=tuple({**GEO, "block_count": 5}.items()))
    b = np.asarray(blocks)
    for i in range(16, T):             # block 4 on: blocks 1 .. cur - 2 tie, 2 places left
        cur = i // 4
        assert list(b[0, i, 0, :3]) == [0, cur - 1, cur]
        assert list(b[0, i, 0, 3:]) == [1, 2], (i, b[0, i, 0])


def test_reference_reduces_to_plain_attention():
    """With every block selected the selected branch is causal attention; with the window
    branch alone, sliding-window attention; with compressed tokens of one key every key, the
    compressed branch is causal attention too (written independently: attention_reference)."""
    q, k, v, *gates = inputs(3)
    ones, zeros = jnp.ones_like(gates[0]), jnp.zeros_like(gates[0])
    full = attention_reference(q, k, v)
    every = tuple({**GEO, "block_count": 10}.items())
    o, _ = run(q, k, v, zeros, ones, zeros, backend="reference", geo=every)
    assert relative_error(np.asarray(o), np.asarray(full)) < 1e-6
    o, _ = run(q, k, v, zeros, zeros, ones, backend="reference")
    windowed = attention_reference(q, k, v, window=GEO["window"])
    assert relative_error(np.asarray(o), np.asarray(windowed)) < 1e-6
    one_key = tuple({**GEO, "cmp_block": 1, "cmp_stride": 1}.items())
    o, _ = run(q, k, v, ones, zeros, zeros, backend="reference", geo=one_key)
    assert relative_error(np.asarray(o), np.asarray(full)) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_xla_equals_reference(dtype, tol):
    """Query chunks of 16 over 37 queries (a ragged last chunk). float32: summation order
    only; bf16: the XLA form multiplies probabilities and values in bf16 (the reference in
    float32)."""
    q, k, v, *gates = inputs(4, dtype=dtype)
    o_ref, b_ref = run(q, k, v, *gates, backend="reference")
    o_xla, b_xla = run(q, k, v, *gates, backend="xla")
    np.testing.assert_array_equal(np.asarray(b_xla), np.asarray(b_ref))
    assert relative_error(np.asarray(o_xla, np.float32), np.asarray(o_ref, np.float32)) < tol


def test_gradients_of_xla_equal_the_reference():
    q, k, v, *gates = inputs(5)
    kc = jax.random.normal(jax.random.key(9), (B, (T - 4) // 2 + 1, H, K))
    vc = jax.random.normal(jax.random.key(10), kc.shape)
    ct = jax.random.normal(jax.random.key(11), (B, T, HQ, K))

    def loss(backend):
        f = lambda *a, **kw: jnp.sum(  # noqa: E731
            nsa(*a, **kw, backend=backend, query_chunk=16, **GEO) * ct)
        return jax.jit(jax.grad(lambda q, k, v, gc, gs, gw, kc, vc: f(
            q, k, v, gc, gs, gw, k_cmp=kc, v_cmp=vc), argnums=tuple(range(8))))

    want = loss("reference")(q, k, v, *gates, kc, vc)
    got = loss("xla")(q, k, v, *gates, kc, vc)
    for name, a, b in zip(["q", "k", "v", "g_cmp", "g_slc", "g_swa", "k_cmp", "v_cmp"], got,
                          want):
        assert np.abs(np.asarray(b)).max() > 0, name
        assert relative_error(np.asarray(a), np.asarray(b)) < 1e-5, name


DOCS = [[9, 20, 8], [16, 21]]      # documents crossing query chunks and selection blocks


def packed_segments():
    return packed_segment_ids(DOCS, T)      # both rows exactly full (37 tokens)


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_packed_rows_equal_each_document_alone(backend):
    q, k, v, *gates = inputs(6)
    seg = packed_segments()
    seg[1, -3:] = 0                                                      # trailing padding
    poison = lambda x: jnp.where(jnp.asarray(seg == 0).reshape(                # noqa: E731
        (B, T) + (1,) * (x.ndim - 2)), jnp.nan, x)
    o, blocks = run(*(poison(x) for x in (q, k, v)), *gates, jnp.asarray(seg), backend=backend)
    o = np.asarray(o)
    assert np.isfinite(o).all() and (o[seg == 0] == 0).all()
    for r, lens in enumerate(DOCS):
        at = 0
        for n in lens:
            n_real = int((seg[r, at:at + n] > 0).sum())
            alone = [x[r:r + 1, at:at + n_real] for x in (q, k, v, *gates)]
            alone = [jnp.concatenate([x, x], axis=0) for x in alone]      # B = 2 rows
            o_doc, b_doc = nsa(*alone, backend=backend, query_chunk=16,
                               return_block_indices=True, **GEO)
            assert relative_error(o[r, at:at + n_real], np.asarray(o_doc[0])) < 1e-6
            np.testing.assert_array_equal(np.asarray(blocks[r, at:at + n_real]),
                                          np.asarray(b_doc[0]))
            at += n


def test_packed_gradients_equal_each_document_alone():
    q, k, v, *gates = inputs(7)
    seg = jnp.asarray(packed_segments())
    ct = jax.random.normal(jax.random.key(3), (B, T, HQ, K))
    grad = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(
        nsa(q, k, v, *gates, segment_ids=s, backend="xla", query_chunk=16, **GEO) * ct),
        argnums=(0, 1, 2)))
    packed = grad(q, k, v, seg)
    r, at, n = 1, 16, 21                     # the second document of row 1
    piece = lambda x: x[r:r + 1, at:at + n]  # noqa: E731
    alone = jax.grad(lambda q, k, v: jnp.sum(nsa(q, k, v, *(piece(g) for g in gates),
                                                 backend="xla", **GEO) * piece(ct)),
                     argnums=(0, 1, 2))(piece(q), piece(k), piece(v))
    for a, b in zip(packed, alone):
        assert relative_error(np.asarray(piece(a)), np.asarray(b)) < 1e-5


def test_cache_queries_equal_the_full_call():
    """Queries from q_start over a longer key buffer (a KV cache: later slots hold garbage)
    equal the same queries in the full call."""
    q, k, v, *gates = inputs(8)
    full, blocks = run(q, k, v, *gates, backend="xla")
    junk = jax.random.normal(jax.random.key(4), (B, 11, H, K)) * 100
    kk, vv = (jnp.concatenate([x, junk], axis=1) for x in (k, v))
    for start, n in [(0, 5), (20, 1), (30, 7)]:
        sl = lambda x, start=start, n=n: x[:, start:start + n]  # noqa: E731
        o, b = nsa(sl(q), kk, vv, *(sl(g) for g in gates), q_start=start, backend="xla",
                   return_block_indices=True, **GEO)
        assert relative_error(np.asarray(o), np.asarray(sl(full))) < 1e-6
        np.testing.assert_array_equal(np.asarray(b), np.asarray(sl(blocks)))


def test_queries_at_given_key_indices_equal_the_full_call():
    """q_index (a sequence shard's queries, any order, packed documents allowed): a shuffled
    subset of the queries equals the same queries of the full call, values and blocks, and
    padding queries give 0."""
    q, k, v, *gates = inputs(9)
    seg = packed_segments()
    seg[1, -3:] = 0                                                      # trailing padding
    seg = jnp.asarray(seg)
    full, blocks = run(q, k, v, *gates, seg, backend="xla")
    idx = np.random.default_rng(0).permutation(T - 1)[:16].tolist() + [T - 1]
    pick = lambda x: x[:, idx]  # noqa: E731
    q_index = jnp.broadcast_to(jnp.asarray(idx, jnp.int32), (B, len(idx)))
    o, b = nsa(pick(q), k, v, *(pick(g) for g in gates), segment_ids=seg, q_index=q_index,
               backend="xla", return_block_indices=True, **GEO)
    assert relative_error(np.asarray(o), np.asarray(pick(full))) < 1e-6
    np.testing.assert_array_equal(np.asarray(b), np.asarray(pick(blocks)))
    padding = np.asarray(pick(seg)) == 0
    assert padding.any() and np.all(np.asarray(o)[padding] == 0)
    with pytest.raises(ValueError, match="not both"):
        nsa(pick(q), k, v, *(pick(g) for g in gates), q_start=0, q_index=q_index, **GEO)


def test_compression_slots_of_packed_documents():
    """Each document gets its own compressed tokens, counted from its first token."""
    seg = jnp.asarray(packed_segments())
    slots = compression_slots(seg, B, T, Geometry(**GEO))
    # Row 0: documents of 9, 20, 8 tokens: tokens ending at in-document positions 3, 5, 7, ...
    want = [3, 5, 7] + [9 + p for p in range(3, 20, 2)] + [29 + p for p in (3, 5, 7)]
    got = [int(e) for e in np.asarray(slots.end[0]) if e < T]
    assert got == want
    assert list(np.asarray(slots.first[0, [0, 8, 9, 28, 29, 36]])) == [0, 0, 3, 3, 12, 12]


@pytest.mark.parametrize("kwargs,message", [
    (dict(cmp_block=6, cmp_stride=4), "cmp_stride=4 must divide cmp_block=6"),
    (dict(block_size=5), "cmp_stride=2 must divide block_size=5"),
    (dict(block_count=2), "block_count=2 must be >= 3"),
    (dict(window=0), "window must be >= 1"),
])
def test_bad_settings_are_one_clear_error(kwargs, message):
    q, k, v, *gates = inputs(0)
    with pytest.raises(ValueError, match=message):
        nsa(q, k, v, *gates, **{**GEO, **kwargs})


def test_bad_shapes_are_refused():
    q, k, v, *gates = inputs(0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        nsa(q[:, :, :3], k, v, gates[0][..., :3], gates[1][..., :3], gates[2][..., :3], **GEO)
    with pytest.raises(ValueError, match="need q_start"):
        nsa(q[:, :5], k, v, *(g[:, :5] for g in gates), **GEO)
    with pytest.raises(ValueError, match="both k_cmp and v_cmp"):
        nsa(q, k, v, *gates, k_cmp=k, **GEO)
