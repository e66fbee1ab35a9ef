"""Based linear attention and the short gated convolution: decode parity (float32, bf16), the
xla backend against the reference (values and gradients), the quadratic form against the
features (values and gradients, with packed documents), the Taylor feature map on its own,
constant-size caches, and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.based import Based, BasedArgs, taylor_feature_map, taylor_kernel_attention
from layers.gated_conv import GatedConv, GatedConvArgs
from models.config_check import load_config
from tests.parity import PARITY_TOL, assert_backends_agree, assert_decode_parity, relative_error

# chunk_size 8 < T = 20: the chunked op crosses chunk boundaries inside one call. SMALL's full
# forward (T <= quadratic_max_len) takes the quadratic form, FEATURES' the chunked op; cached
# calls take the features in both.
SMALL = BasedArgs(feature_dim=8, chunk_size=8)
FEATURES = dataclasses.replace(SMALL, quadratic_max_len=0)


def _model_cfg(dtype="float32", init_std=0.02):
    # init_std 0.2 where the kernel's shape matters: scores s = q.k / sqrt(Fd) are then O(1),
    # so the s^2 / 2 term is not lost next to 1 + s (at 0.02, |s| ~ 1e-3).
    cfg = load_config(None, ["model.d_model=32", "model.n_heads=2", "model.max_len=64",
                             "model.vocab_size=64", f"model.dtype={dtype}",
                             f"model.init_std={init_std}"])
    return cfg.model


def _x(dtype, t=20, seed=1):
    return jax.random.normal(jax.random.key(seed), (2, t, 32)).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("cls,args", [(Based, SMALL), (Based, FEATURES),
                                      (GatedConv, GatedConvArgs()),
                                      (GatedConv, GatedConvArgs(width=3, expand=2))],
                         ids=["based", "based_features", "conv", "conv_w3_e2"])
def test_decode_parity(cls, args, dtype):
    mixer = cls(_model_cfg(jnp.dtype(dtype).name, 0.2), args, rngs=nnx.Rngs(0))
    # Prefill inside the first op chunk (8) and across it; 7-token chunks do not divide T.
    for prefill, chunk in [(3, 7), (11, 7)]:
        assert_decode_parity(mixer, _x(dtype), prefill=prefill, chunk=chunk, max_len=32,
                             dtype=dtype)


def test_based_xla_matches_reference_with_gradients():
    cfg = _model_cfg()
    ref = Based(cfg, dataclasses.replace(FEATURES, backend="reference"), rngs=nnx.Rngs(0))
    xla = Based(cfg, dataclasses.replace(FEATURES, backend="xla"), rngs=nnx.Rngs(0))
    assert_backends_agree(ref, xla, _x(jnp.float32))


def _loss_and_grads(mixer, x, ct, segment_ids=None):
    graphdef, params = nnx.split(mixer)
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    f = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(
        x, positions=pos, segment_ids=segment_ids)[0].astype(jnp.float32) * ct)
    out = nnx.merge(graphdef, params)(x, positions=pos, segment_ids=segment_ids)[0]
    return out, jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)[1]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["one_doc", "packed"])
def test_quadratic_form_matches_features_with_gradients(dtype, packed):
    """The T x T kernel 1 + s + s^2 / 2 and the 73-wide features (Fd 8) through the chunked
    op are the same attention: outputs and every gradient agree, also over packed documents
    (3 documents and trailing padding, whose outputs are 0 on both paths)."""
    cfg = _model_cfg(jnp.dtype(dtype).name, 0.2)
    quad = Based(cfg, SMALL, rngs=nnx.Rngs(0))
    feat = Based(cfg, FEATURES, rngs=nnx.Rngs(0))
    x = _x(dtype)
    ct = jax.random.normal(jax.random.key(7), x.shape)
    seg = None
    if packed:
        seg = jnp.asarray([[1] * 7 + [2] * 9 + [3] * 2 + [0] * 2,
                           [1] * 3 + [2] * 15 + [0] * 2], jnp.int32)
    y_q, (gp_q, gx_q) = _loss_and_grads(quad, x, ct, seg)
    y_f, (gp_f, gx_f) = _loss_and_grads(feat, x, ct, seg)
    # bf16: both round the output (and the features path its features) to 8 mantissa bits.
    tol = PARITY_TOL[dtype]
    assert relative_error(np.asarray(y_q, np.float32), np.asarray(y_f, np.float32)) < tol
    if packed:
        assert np.all(np.asarray(y_q)[np.asarray(seg) == 0] == 0)
    grad_tol = 1e-4 if dtype == jnp.float32 else 3e-2
    assert relative_error(np.asarray(gx_q, np.float32), np.asarray(gx_f, np.float32)) < grad_tol
    for a, b in zip(jax.tree.leaves(gp_q), jax.tree.leaves(gp_f)):
        assert relative_error(np.asarray(a), np.asarray(b)) < grad_tol


def test_quadratic_form_runs_each_document_alone():
    """taylor_kernel_attention over packed rows == each document alone, outputs and input
    gradients; a document starts mid-row, and the trailing padding is poisoned with NaN (its
    outputs and gradients are 0, nothing else sees it)."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(3), 4)
    q, k = (jax.random.normal(key, (1, 20, 2, 4)) for key in (kq, kk))
    v = jax.random.normal(kv, (1, 20, 2, 3))
    ct = jax.random.normal(kc, (1, 20, 2, 3))
    lens = [5, 11]                                             # then 4 padding slots
    seg = jnp.asarray([[1] * 5 + [2] * 11 + [0] * 4], jnp.int32)
    pad = (seg == 0)[..., None, None]
    poison = lambda a: jnp.where(pad, jnp.nan, a)

    def loss(q, k, v, seg):
        return jnp.sum(taylor_kernel_attention(q, k, v, seg) * ct[:, :q.shape[1]])

    out = taylor_kernel_attention(poison(q), poison(k), poison(v), seg)
    grads = jax.grad(loss, argnums=(0, 1, 2))(poison(q), poison(k), poison(v), seg)
    assert np.all(np.asarray(out)[np.asarray(seg) == 0] == 0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        assert np.all(np.asarray(g)[np.asarray(seg) == 0] == 0)
    start = 0
    for n in lens:
        doc = slice(start, start + n)
        qd, kd, vd, ctd = q[:, doc], k[:, doc], v[:, doc], ct[:, doc]
        np.testing.assert_allclose(out[:, doc], taylor_kernel_attention(qd, kd, vd),
                                   rtol=1e-5, atol=1e-6)
        g_alone = jax.grad(lambda q, k, v, ct=ctd: jnp.sum(taylor_kernel_attention(q, k, v) * ct),
                           argnums=(0, 1, 2))(qd, kd, vd)
        for g, ga in zip(grads, g_alone):
            np.testing.assert_allclose(g[:, doc], ga, rtol=1e-5, atol=1e-6)
        start += n


def test_quadratic_form_is_taken_up_to_its_length_only():
    """Which form a call compiles to (the 73-wide features appear in the jaxpr or not)."""
    cfg = _model_cfg()
    x = _x(jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))

    def widths(args, cache=None):
        graphdef, params = nnx.split(Based(cfg, args, rngs=nnx.Rngs(0)))
        jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(x, positions=pos,
                                                                cache=cache)[0])(params)
        return {d for eq in jaxpr.jaxpr.eqns for v in eq.outvars for d in v.aval.shape}

    assert 73 not in widths(SMALL)                                  # T 20 <= 128
    assert 73 in widths(dataclasses.replace(SMALL, quadratic_max_len=19))
    assert 73 in widths(FEATURES)
    assert 73 in widths(SMALL, Based(cfg, SMALL, rngs=nnx.Rngs(0)).init_cache(2, 32))


@pytest.mark.parametrize("fd", [4, 16])
def test_taylor_feature_map_is_second_order_exp(fd):
    kq, kk = jax.random.split(jax.random.key(fd))
    q = jax.random.normal(kq, (50, fd))
    k = jax.random.normal(kk, (50, fd))
    phi_q, phi_k = taylor_feature_map(q), taylor_feature_map(k)
    assert phi_q.shape == (50, 1 + fd + fd * fd)
    dot = np.sum(np.asarray(phi_q, np.float64) * np.asarray(phi_k, np.float64), axis=-1)
    s = np.sum(np.asarray(q, np.float64) * np.asarray(k, np.float64), axis=-1) / np.sqrt(fd)
    np.testing.assert_allclose(dot, 1 + s + s * s / 2, rtol=1e-5, atol=1e-5)
    # 1 + s + s^2/2 >= 1/2: why the normalized attention's denominator stays positive.
    assert np.all(dot >= 0.5 - 1e-5)


def test_cache_bytes_do_not_depend_on_max_len():
    cfg = _model_cfg("bfloat16")
    for mixer in (Based(cfg, BasedArgs(), rngs=nnx.Rngs(0)),
                  GatedConv(cfg, GatedConvArgs(), rngs=nnx.Rngs(0))):
        small = mixer.init_cache(1, 1024, jnp.bfloat16).nbytes
        assert small == mixer.init_cache(1, 16384, jnp.bfloat16).nbytes
    # Based, float32 state: 2 heads x 273 features x (16 values + the normalizer) x 4 bytes.
    based = Based(cfg, BasedArgs(), rngs=nnx.Rngs(0))
    assert based.init_cache(1, 1024, jnp.bfloat16).nbytes == 2 * 273 * (16 + 1) * 4
    # Conv tail: 3 past inputs x 32 channels x 2 bytes (bf16).
    conv = GatedConv(cfg, GatedConvArgs(), rngs=nnx.Rngs(0))
    assert conv.init_cache(1, 1024, jnp.bfloat16).nbytes == 3 * 32 * 2


@pytest.mark.parametrize("override,match", [
    ("model.mixer_args.based.backend=triton", "'auto', 'reference', 'xla', 'pallas'"),
    ("model.mixer_args.based.backend=bogus", "model.mixer_args.based.backend"),
    ("model.mixer_args.based.feature_dim=0", "model.mixer_args.based.feature_dim must be > 0"),
    ("model.mixer_args.based.n_heads=3", "model.mixer_args.based.n_heads=3 does not divide"),
    ("model.mixer_args.based.chunk_size=0", "model.mixer_args.based.chunk_size must be > 0"),
    ("model.mixer_args.based.quadratic_max_len=-1",
     "model.mixer_args.based.quadratic_max_len must be >= 0"),
    ("model.mixer_args.conv.width=0", "model.mixer_args.conv.width must be >= 1"),
    ("model.mixer_args.conv.expand=0", "model.mixer_args.conv.expand must be >= 1"),
])
def test_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/based.yaml", [override])


def test_based_backend_outside_the_vocabulary_is_one_config_error():
    # The Args type (pallas_kernels/backends.LinearBackend) is what the config checks.
    with pytest.raises(ConfigError, match="model.mixer_args.based.backend: expected one of "
                                          "'auto', 'reference', 'xla', 'pallas', 'pallas_gpu', "
                                          "'pallas_tpu', got 'triton'"):
        load_config("configs/base.yaml", ["model.mixers=[based]",
                                          "model.mixer_args.based.backend=triton"])


