"""CCA / CCGQA: against a token-by-token reference of the paper's steps (values and gradients),
decode parity in every setting and both dtypes, the cache's size against MHA, config errors,
and the shipped configs."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.attention import Attention, AttentionArgs
from layers.cache import tree_nbytes
from layers.cca import CCA, CCAArgs
from models import build_model
from models.config_check import load_config
from tests.parity import assert_decode_parity, relative_error

# T = 17 below; per setting a (prefill, chunk) pair: prefills shorter than the conv tail
# P = 2 (W - 1), chunks not dividing T, chunks longer than the window's ring.
SETTINGS = {
    "cca": (CCAArgs(n_heads=4), (1, 3)),
    "cca_c4_w3": (CCAArgs(n_heads=2, compression=4, conv_width=3), (2, 5)),
    "cca_w1_window_norope": (CCAArgs(n_heads=4, conv_width=1, window=5, rope=False), (4, 7)),
    "ccgqa": (CCAArgs(n_heads=4, n_kv_heads=2), (3, 4)),
    "ccgqa_mqa_w3_window": (CCAArgs(n_heads=4, n_kv_heads=1, conv_width=3, window=6), (5, 9)),
}


def _model_cfg(dtype="float32", d_model=32):
    return load_config(None, [f"model.d_model={d_model}", "model.n_heads=4", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


@functools.cache
def _mixer(name: str, dtype: str = "float32", seed: int = 0) -> CCA:
    mixer = CCA(_model_cfg(dtype), SETTINGS[name][0], rngs=nnx.Rngs(seed))
    # Non-zero conv biases and temperatures, so the reference checks where they enter.
    for p in (mixer.conv1_bias, mixer.conv2_bias, mixer.log_temp):
        p[...] = 0.3 * jax.random.normal(jax.random.key(seed + p[...].size), p[...].shape)
    return mixer


def _rope(a: np.ndarray, s: int, theta: float) -> np.ndarray:
    """RoPE (rotate-half layout, RoFormer eq. 34) of a [..., Dh] at position s."""
    half = a.shape[-1] // 2
    angle = s * theta ** (-np.arange(0, a.shape[-1], 2) / a.shape[-1])
    a1, a2 = a[..., :half], a[..., half:]
    return np.concatenate([a1 * np.cos(angle) - a2 * np.sin(angle),
                           a2 * np.cos(angle) + a1 * np.sin(angle)], -1)


def cca_reference(layer: CCA, params: dict, x: np.ndarray) -> np.ndarray:
    """The paper's steps token by token in float64 numpy, with explicit loops over time (conv
    taps, value shift, the keys each query sees) and over heads (q-k mean, temperature).

    layer: for its settings only; params: nnx.to_pure_dict of its state; x [B, T, D] at
    positions 0..T-1 -> y [B, T, D]."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    h, hkv, dh, w = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.width
    g, vh, e = h // hkv, hkv * dh // 2, (h + hkv) * dh
    b, t, _ = x.shape
    x, wqkv = f64(x), f64(params["qkv"]["kernel"])
    wq, wk = wqkv[:, :h * dh], wqkv[:, h * dh:e]
    wv1, wv2 = wqkv[:, e:e + vh], wqkv[:, e + vh:]
    k1, b1 = f64(params["conv1_kernel"]), f64(params["conv1_bias"])
    k2, b2 = f64(params["conv2_kernel"]), f64(params["conv2_bias"]).reshape(h + hkv, dh)
    temp = np.exp(f64(params["log_temp"]))

    # Step 1 at every time, u_s = [q0_s ; k0_s], and u_s = 0 for s < 0 (list index s + P).
    pad = 2 * (w - 1)
    u = [np.zeros((b, e))] * pad + [x[:, s] @ wqkv[:, :e] for s in range(t)]
    # Step 2: the depthwise conv at every time the grouped one reads (from 1 - W on), ...
    mid = {s: sum(k1[i] * u[pad + s - w + 1 + i] for i in range(w)) + b1
           for s in range(1 - w, t)}

    def conv(s):                                # ... then a Dh x Dh mix inside each head
        taps = [mid[s - w + 1 + i].reshape(b, h + hkv, dh) for i in range(w)]
        return b2 + sum(np.einsum("bji,jio->bjo", taps[i], k2[i]) for i in range(w))

    def unit(a):                                # to norm sqrt(Dh)
        return a * math.sqrt(dh) / np.sqrt(np.sum(a * a, -1, keepdims=True) + layer.eps)

    def rope(a, s):
        return _rope(a, s, layer.rope_theta) if layer.use_rope else a

    qs, ks, vs = [], [], []
    for s in range(t):
        c = conv(s)
        q0 = (x[:, s] @ wq).reshape(b, h, dh)
        k0 = (x[:, s] @ wk).reshape(b, hkv, dh)
        m = [(q0[:, j] + k0[:, j // g]) / 2 for j in range(h)]           # step 3
        qs.append([rope(unit(c[:, j] + m[j]), s) for j in range(h)])
        ks.append([rope(unit(c[:, h + r] + sum(m[r * g:(r + 1) * g]) / g) * temp[r], s)
                   for r in range(hkv)])
        prev = x[:, s - 1] @ wv2 if s > 0 else np.zeros((b, vh))          # step 4
        vs.append((np.concatenate([x[:, s] @ wv1, prev], -1)).reshape(b, hkv, dh))
    out = np.zeros((b, t, h * dh))
    for s in range(t):                                                   # step 5
        seen = [r for r in range(s + 1) if layer.window is None or s - r < layer.window]
        for j in range(h):
            logits = np.stack([np.sum(qs[s][j] * ks[r][j // g], -1) for r in seen], -1)
            logits = logits / math.sqrt(dh)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[:, s, j * dh:(j + 1) * dh] = sum(p[:, i:i + 1] * vs[r][:, j // g]
                                                 for i, r in enumerate(seen))
    return out @ f64(params["out"]["kernel"])                            # step 6


# Conv widths 1, 2, 3; full and windowed; with and without RoPE; G = 1 and G = 4 (the other
# settings run through the same code and are held to the decode parity below).
@pytest.mark.parametrize("name", ["cca", "cca_w1_window_norope", "ccgqa_mqa_w3_window"])
def test_matches_reference_values_and_gradients(name):
    layer = _mixer(name)
    graphdef, state = nnx.split(layer)
    params = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.key(2), (2, 9, 32))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    fwd = lambda st, x: nnx.merge(graphdef, st)(x, positions=pos)[0]  # noqa: E731
    y = np.asarray(jax.jit(fwd)(state, x))
    assert relative_error(y, cca_reference(layer, params, np.asarray(x))) < 1e-5

    # Gradients: the layer's (float32, autodiff) against central differences of the float64
    # reference along random directions, for every parameter and for x.
    ct = np.asarray(jax.random.normal(jax.random.key(7), y.shape), np.float64)
    g_state, g_x = jax.jit(jax.grad(lambda st, x: jnp.sum(fwd(st, x) * ct), (0, 1)))(state, x)
    leaves, tree = jax.tree.flatten((params, np.asarray(x)))
    grads = jax.tree.leaves((nnx.to_pure_dict(g_state), g_x))
    assert len(leaves) == len(grads) == 8   # qkv, out, 2 conv kernels, 2 biases, temp; x
    loss = lambda ls: np.sum(ct * cca_reference(layer, *jax.tree.unflatten(tree, ls)))  # noqa
    rng, eps = np.random.default_rng(0), 1e-6
    for i, grad in enumerate(grads):
        grad = np.asarray(grad, np.float64)
        d = rng.standard_normal(grad.shape)
        shifted = [[np.asarray(a, np.float64) + (sign * eps * d if j == i else 0)
                    for j, a in enumerate(leaves)] for sign in (1, -1)]
        numeric = (loss(shifted[0]) - loss(shifted[1])) / (2 * eps)
        scale = np.sum(np.abs(grad * d))
        assert scale > 0, i
        assert abs(np.sum(grad * d) - numeric) < 1e-4 * scale, (i, np.sum(grad * d), numeric)


def test_value_shift_and_causality():
    # Changing token 6 changes nothing before it; through the value shift and the conv it
    # reaches token 7 even when token 7 attends to nothing but itself (window 1).
    cfg = _model_cfg()
    layer = CCA(cfg, CCAArgs(n_heads=4, window=1), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 9, 32))
    x2 = x.at[:, 6].add(1.0)
    call = jax.jit(lambda x: layer(x, positions=jnp.arange(9)[None])[0])
    y, y2 = call(x), call(x2)
    np.testing.assert_array_equal(y[:, :6], y2[:, :6])
    assert not np.allclose(y[:, 7], y2[:, 7])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_decode_parity(name, dtype):
    mixer = _mixer(name, "float32" if dtype == jnp.float32 else "bfloat16")
    x = jax.random.normal(jax.random.key(1), (2, 17, 32)).astype(dtype)
    prefill, chunk = SETTINGS[name][1]
    assert_decode_parity(mixer, x, prefill=prefill, chunk=chunk, max_len=24, dtype=dtype)


def _abstract_cache(layer_cls, args, max_len: int, d_model: int = 64):
    """(layer, cache) as shapes only (jax.eval_shape): nothing is initialised or allocated."""
    cfg = _model_cfg("bfloat16", d_model=d_model)
    layer = nnx.eval_shape(lambda: layer_cls(cfg, args, rngs=nnx.Rngs(0)))
    return layer, jax.eval_shape(lambda: layer.init_cache(2, max_len, jnp.bfloat16))


@pytest.mark.parametrize("args, factor", [(CCAArgs(), 2), (CCAArgs(compression=4), 4),
                                          (CCAArgs(n_kv_heads=2), 4),
                                          (CCAArgs(n_kv_heads=1, compression=4), 16)])
def test_kv_cache_shrinks_by_the_compression_against_mha(args, factor):
    # d_model 64, 4 heads: MHA caches 4 x 16 per token for k and for v; CCA 4 x (16 / C),
    # CCGQA Hkv x (16 / C). Slot positions and the length are the same bookkeeping in both.
    _, mha = _abstract_cache(Attention, AttentionArgs(), 4096)
    layer, cache = _abstract_cache(CCA, args, 4096)
    assert tree_nbytes((cache.kv.k, cache.kv.v)) * factor == tree_nbytes((mha.k, mha.v))
    assert tree_nbytes((cache.kv.pos, cache.kv.length)) == tree_nbytes((mha.pos, mha.length))
    # What decode adds besides the KV cache: the conv tail 2 (W - 1) x E and one value half,
    # batch 2, 2 bytes each.
    h, hkv, dh = layer.n_heads, layer.n_kv_heads, layer.head_dim
    extra = cache.nbytes - cache.kv.nbytes
    assert extra == 2 * (2 * (layer.width - 1) * (h + hkv) * dh + hkv * dh // 2) * 2


@pytest.mark.parametrize("args", [CCAArgs(), CCAArgs(n_kv_heads=1, conv_width=3, window=64)])
def test_non_kv_cache_bytes_do_not_grow_with_length(args):
    (_, small), (_, large) = (_abstract_cache(CCA, args, n) for n in (1024, 16384))
    assert small.nbytes - small.kv.nbytes == large.nbytes - large.kv.nbytes > 0
    if args.window is None:
        assert large.kv.nbytes == 16 * small.kv.nbytes - 15 * 4   # all but the length grow
    else:
        assert small.nbytes == large.nbytes   # the window's ring: everything is constant


def test_full_cache_rejects_a_chunk_longer_than_itself():
    layer = _mixer("cca")
    call = jax.jit(lambda x, c: layer(x, positions=jnp.arange(6)[None], cache=c))
    with pytest.raises(ValueError, match="do not fit"):
        call(jnp.zeros((1, 6, 32)), layer.init_cache(1, 4, jnp.float32))


@pytest.mark.parametrize("overrides, message", [
    ("model.mixer_args.cca.compression=3",
     r"model.mixer_args.cca.compression=3 does not divide model.d_model=64"),
    ("model.mixer_args.cca.compression=0", r"model.mixer_args.cca.compression must be >= 1"),
    ("model.mixer_args.cca.n_heads=3", r"model.mixer_args.cca.n_heads=3 does not divide the "
                                       r"latent width model.d_model / "
                                       r"model.mixer_args.cca.compression = 32"),
    ("model.mixer_args.cca.compression=16",
     r"model.mixer_args.cca: RoPE needs an even head dim, got .* = 1"),
    ("model.mixer_args.cca.compression=64 model.mixer_args.cca.n_heads=1 "
     "model.mixer_args.cca.rope=false", r"the value shift halves .* = 1, which must be even"),
    ("model.mixer_args.cca.conv_width=0", r"model.mixer_args.cca.conv_width must be >= 1"),
    ("model.mixer_args.cca.window=0", r"model.mixer_args.cca.window must be > 0"),
    ("model.mixer_args.cca.window=4096", r"window=4096 is larger than model.max_len"),
    ("model.mixer_args.cca.compresion=2", r"did you mean 'model.mixer_args.cca.compression'"),
    ("model.mixers=[ccgqa] model.mixer_args.ccgqa.n_kv_heads=3",
     r"model.mixer_args.ccgqa.n_kv_heads=3 must divide n_heads=4"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.mixers=[cca]"] + overrides.split())


@pytest.mark.parametrize("path, n_kv", [("configs/cca.yaml", 4), ("configs/ccgqa.yaml", 2)])
def test_configs_build_and_run(path, n_kv):
    cfg = load_config(path)
    model = build_model(cfg.model)
    mixers = [blk.mixer for blk in model.blocks]
    assert all(isinstance(m, CCA) and m.n_kv_heads == n_kv and m.head_dim == 8 for m in mixers)
    graphdef, state = nnx.split(model)
    logits, _ = jax.jit(lambda st, tok: nnx.merge(graphdef, st)(tok))(
        state, jnp.zeros((2, 12), jnp.int32))
    assert logits.shape == (2, 12, cfg.model.vocab_size)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_bf16_stays_close_to_float32():
    # The bf16 parity tolerance (2e-2) is honest only if bf16 itself tracks float32 at that level.
    m32, m16 = _mixer("ccgqa", "float32"), _mixer("ccgqa", "bfloat16")
    x = jax.random.normal(jax.random.key(3), (2, 17, 32))
    pos = jnp.broadcast_to(jnp.arange(17), (2, 17))
    y32 = np.asarray(jax.jit(lambda x: m32(x, positions=pos)[0])(x))
    y16 = np.asarray(jax.jit(lambda x: m16(x, positions=pos)[0])(x.astype(jnp.bfloat16)),
                     np.float32)
    assert relative_error(y16, y32) < 3e-2


def test_params_shrink_by_the_compression():
    # W_q, W_k, W_v and W_o are D x D / C each for CCA (vs D x D for MHA), plus small convs.
    cfg = _model_cfg("float32", d_model=64)
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa
    mha = count(Attention(cfg, AttentionArgs(), rngs=nnx.Rngs(0)))
    layer = CCA(cfg, CCAArgs(compression=4), rngs=nnx.Rngs(0))
    conv = layer.conv1_kernel.size + layer.conv1_bias.size + layer.conv2_kernel.size + \
        layer.conv2_bias.size + layer.log_temp.size
    assert count(layer) - conv == mha // 4
