"""Attention kernels on CPU (Pallas interpret mode) against reference.py: the flash kernel's
values and gradients, its block skipping (exact block ranges, and NaN poison in skipped blocks),
splash through its interpreter, and the dispatcher's backends and errors.

Shapes are tiny (T <= 80, Dh 16 / 32, blocks of 16) so the interpreter stays fast."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import attention, attention_reference
from pallas_kernels.attention.flash import flash_attention, key_blocks, query_blocks
from pallas_kernels.attention.reference import visibility
from pallas_kernels.attention.splash import make_mask, splash_attention
from pallas_kernels.backends import interpret_kernels, kernel_interpret
from tests.parity import relative_error

# float32: the kernel differs from the reference only by summation order (measured ~1e-6).
# bfloat16 (8 mantissa bits, eps 2^-8 ~ 3.9e-3): inputs are the same bf16 values in both, but
# the kernel rounds P (and dS) to bf16 before its matmuls and rounds o / dq / dk / dv to bf16;
# measured 2e-3 .. 5e-3 against the float32 reference, the same as the XLA path in bf16.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}

# (T, H, Hkv, Dh, window, n_sinks, block_q, block_k)
CASES = {
    "full_gqa_odd_t": (37, 4, 2, 16, None, 0, 16, 16),
    "window_sinks_gqa": (70, 4, 2, 32, 16, 3, 16, 16),
    "window_mqa_bk32": (70, 2, 1, 16, 24, 0, 16, 32),
    "window_over_t_sinks": (37, 2, 2, 16, 100, 2, 16, 16),
}


def _inputs(t, h, hkv, dh, dtype, seed=0, b=2):
    kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, h, dh)).astype(dtype)
    k = jax.random.normal(kk, (b, t, hkv, dh)).astype(dtype)
    v = jax.random.normal(kv, (b, t, hkv, dh)).astype(dtype)
    w = jax.random.normal(kw, (b, t, h, dh))      # weights of the loss sum(o * w)
    return q, k, v, w


@functools.cache
def _fns(fn, **kw):
    """Jitted forward and (dq, dk, dv) of sum(o * w) for one attention function and setting."""
    fwd = jax.jit(lambda q, k, v: fn(q, k, v, **kw))
    loss = lambda q, k, v, w: jnp.sum(fn(q, k, v, **kw).astype(jnp.float32) * w)
    return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _flash(window, n_sinks, bq, bk):
    return _fns(flash_attention, window=window, n_sinks=n_sinks, block_q=bq, block_k=bk,
                interpret=kernel_interpret("flash"))


def _reference(window, n_sinks):
    return _fns(attention_reference, window=window, n_sinks=n_sinks)


def _check_against_reference(fns, q, k, v, w, window, n_sinks, tol):
    fwd, grad = fns
    ref_fwd, ref_grad = _reference(window, n_sinks)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]   # same (possibly bf16-rounded) values
    out = fwd(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert relative_error(np.asarray(out, np.float32), np.asarray(ref_fwd(*f32))) < tol
    for name, g, r in zip("qkv", grad(q, k, v, w), ref_grad(*f32, w)):
        assert g.dtype == q.dtype, name
        err = relative_error(np.asarray(g, np.float32), np.asarray(r))
        assert err < tol, (f"d{name}", err)


@pytest.mark.parametrize("case", CASES)
def test_flash_matches_reference_f32(case):
    t, h, hkv, dh, window, n_sinks, bq, bk = CASES[case]
    q, k, v, w = _inputs(t, h, hkv, dh, jnp.float32, seed=t + h)
    _check_against_reference(_flash(window, n_sinks, bq, bk), q, k, v, w, window, n_sinks,
                             TOL[jnp.float32])


@pytest.mark.parametrize("case", ["full_gqa_odd_t", "window_sinks_gqa"])
def test_flash_matches_reference_bf16(case):
    t, h, hkv, dh, window, n_sinks, bq, bk = CASES[case]
    q, k, v, w = _inputs(t, h, hkv, dh, jnp.bfloat16, seed=t + h)
    _check_against_reference(_flash(window, n_sinks, bq, bk), q, k, v, w, window, n_sinks,
                             TOL[jnp.bfloat16])


# --------------------------------------------------------------------------- block skipping


@pytest.mark.parametrize("window,n_sinks,bq,bk", [(None, 0, 16, 16), (16, 0, 16, 16),
                                                  (20, 3, 16, 16), (40, 17, 16, 32),
                                                  (7, 1, 32, 16), (500, 5, 16, 16)])
def test_block_ranges_are_exactly_the_visible_blocks(window, n_sinks, bq, bk):
    # The kernels' loop bounds visit every block holding a visible key and no other block.
    t = 160
    vis = visibility(t, window, n_sinks)
    nq, nk = t // bq, t // bk
    blocks = vis.reshape(nq, bq, nk, bk).any(axis=(1, 3))       # [NQ, NK]
    kw = dict(block_q=bq, block_k=bk, window=window, n_sinks=n_sinks)
    for qi in range(nq):
        n_sink, lo, hi = (int(x) for x in key_blocks(qi, n_k_blocks=nk, **kw))
        visited = list(range(n_sink)) + list(range(lo, hi))
        assert visited == list(np.flatnonzero(blocks[qi])), qi
    for kj in range(nk):
        lo, hi = (int(x) for x in query_blocks(kj, n_q_blocks=nq, **kw))
        assert list(range(lo, hi)) == list(np.flatnonzero(blocks[:, kj])), kj


def test_key_blocks_bounded_by_window_not_length():
    bq = bk = 64
    window, n_sinks = 256, 4
    bound = -(-n_sinks // bk) + -(-(bq + window - 1) // bk) + 1
    for t in (4096, 1 << 20):
        nk = t // bk
        for qi in (0, 3, 10, nk // 2, nk - 1):
            n_sink, lo, hi = (int(x) for x in key_blocks(qi, n_k_blocks=nk, block_q=bq,
                                                         block_k=bk, window=window,
                                                         n_sinks=n_sinks))
            assert n_sink + hi - lo <= bound


@pytest.mark.parametrize("n_sinks", [0, 3])
def test_flash_never_reads_skipped_blocks(n_sinks):
    # NaN in every key/value block that the last query block should skip (and in q / dO rows
    # that key block 1's dK/dV program should skip): those outputs stay finite and bit-equal
    # to a clean run, so the kernels did not even load the poisoned blocks.
    t, h, hkv, dh, window, b16 = 64, 2, 1, 16, 16, 16
    q, k, v, w = _inputs(t, h, hkv, dh, jnp.float32, seed=7, b=1)
    fwd, _ = _flash(window, n_sinks, b16, b16)
    skipped = [0, 1] if n_sinks == 0 else [1]            # key blocks query block 3 skips
    kp, vp = k, v
    for blk in skipped:
        rows = slice(blk * b16, (blk + 1) * b16)
        kp, vp = kp.at[:, rows].set(jnp.nan), vp.at[:, rows].set(jnp.nan)
    clean, poisoned = fwd(q, k, v)[:, 48:], fwd(q, kp, vp)[:, 48:]
    assert np.isfinite(np.asarray(poisoned)).all()
    np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))

    def dkv(q, cot):
        _, vjp = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, window=window, n_sinks=n_sinks, block_q=b16, block_k=b16,
            interpret=kernel_interpret("flash")), q, k, v)
        _, dk, dv = vjp(cot)
        return dk[:, 16:32], dv[:, 16:32]                 # key block 1

    # Key block 1 is seen by query blocks 1 and 2 only (window 16; it holds no sink).
    qp, wp = q, w
    for blk in (0, 3):
        rows = slice(blk * b16, (blk + 1) * b16)
        qp, wp = qp.at[:, rows].set(jnp.nan), wp.at[:, rows].set(jnp.nan)
    dkv = jax.jit(dkv)
    for a, c in zip(dkv(qp, wp), dkv(q, w)):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


# --------------------------------------------------------------------------------- splash


@pytest.mark.parametrize("window,n_sinks", [(None, 0), (16, 3), (5, 0), (200, 2)])
def test_splash_mask_matches_definition(window, n_sinks):
    t = 96
    mask = make_mask(t, window, n_sinks)
    np.testing.assert_array_equal(mask[0:t, 0:t], visibility(t, window, n_sinks))
    np.testing.assert_array_equal(mask[32:64, 16:48], visibility(t, window, n_sinks)[32:64, 16:48])


@pytest.mark.parametrize("h,hkv,window,n_sinks", [(4, 2, 16, 3), (2, 1, None, 0)])
def test_splash_interpret_matches_reference(h, hkv, window, n_sinks):
    # Splash (a Mosaic TPU kernel) runs in the Pallas interpreter on CPU in this jax version;
    # T = 37 is padded to one 128 block. GQA via make_splash_mha, MQA via make_splash_mqa.
    q, k, v, w = _inputs(37, h, hkv, 16, jnp.float32, seed=h + hkv, b=1)
    fns = _fns(splash_attention, window=window, n_sinks=n_sinks,
               interpret=kernel_interpret("splash"))
    _check_against_reference(fns, q, k, v, w, window, n_sinks, TOL[jnp.float32])


# ----------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("backend", ["xla", "reference", "auto", "flash"])
def test_dispatcher_backends(backend):
    t, h, hkv, dh, window, n_sinks = 37, 4, 2, 16, 8, 2
    q, k, v, _ = _inputs(t, h, hkv, dh, jnp.float32, seed=3, b=1)
    out = attention(q, k, v, window=window, n_sinks=n_sinks, backend=backend)
    ref = attention_reference(q, k, v, window=window, n_sinks=n_sinks)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(np.asarray(out), np.asarray(ref)) < TOL[jnp.float32]


def test_dispatcher_xla_gradients_and_bf16():
    q, k, v, w = _inputs(21, 4, 1, 16, jnp.float32, seed=5, b=2)
    xla = _fns(attention, window=6, n_sinks=1, backend="xla")
    _check_against_reference(xla, q, k, v, w, 6, 1, TOL[jnp.float32])
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    _check_against_reference(xla, *bf, w, 6, 1, TOL[jnp.bfloat16])


def test_dispatcher_errors():
    q, k, v, _ = _inputs(8, 4, 2, 16, jnp.float32, b=1)
    with pytest.raises(ValueError, match="unknown backend 'triton'.*'xla'.*'flash'.*'splash'"):
        attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match="k and v shapes differ"):
        attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="matching q"):
        attention(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match=r"\[B, T, H, Dh\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="window must be > 0"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="n_sinks must be >= 0"):
        attention(q, k, v, window=4, n_sinks=-1)
    with pytest.raises(ValueError, match="needs a window"):
        attention(q, k, v, n_sinks=2)
    if jax.default_backend() == "cpu":
        for backend in ("flash", "splash"):
            with interpret_kernels(False), pytest.raises(ValueError, match="interpret_kernels"):
                attention(q, k, v, backend=backend)


def test_attention_layer_routes_no_cache_path_through_dispatcher():
    """AttentionArgs.backend "auto" resolves to "xla" on CPU and takes the layer's own masked
    path; the dispatcher's XLA path (taken with segment_ids) gives the same output exactly for
    one document; a GPU kernel on CPU is a clear error at the first call."""
    from flax import nnx

    from layers.attention import Attention, AttentionArgs
    from tests.test_attention import _model_cfg

    cfg = _model_cfg()
    x = jax.random.normal(jax.random.key(3), (2, 21, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(21), (2, 21))
    one_document = jnp.ones((2, 21), jnp.int32)
    outs = {}
    for backend in ("xla", "auto"):
        args = AttentionArgs(n_kv_heads=2, window=6, n_sinks=2, backend=backend)
        layer = Attention(cfg, args, rngs=nnx.Rngs(0))
        outs[backend] = layer(x, positions=pos)[0]
        outs[backend, "dispatcher"] = layer(x, positions=pos, segment_ids=one_document)[0]
    np.testing.assert_array_equal(outs["auto"], outs["xla"])
    np.testing.assert_array_equal(outs["auto", "dispatcher"], outs["xla"])
    np.testing.assert_array_equal(outs["xla", "dispatcher"], outs["xla"])
    layer = Attention(cfg, AttentionArgs(backend="flash"), rngs=nnx.Rngs(0))
    with interpret_kernels(False), pytest.raises(ValueError, match="'flash' is a GPU kernel"):
        layer(x, positions=pos)
