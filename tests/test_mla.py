"""MLA: the expanded form against a plain per-head reference (values and gradients), the
absorbed form against the expanded one on the same weights, decode parity in every setting and
dtype, the latent cache's size, config errors, and the shipped configs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ConfigError
from layers.mla import MLA, MLAArgs
from layers.rope import apply_rope
from models import build_model
from models.config_check import load_config
from pallas_kernels.attention import attention_reference
from tests.parity import assert_decode_parity, decode_paths, relative_error

# Small widths with V != N + P, so a mix-up of the value and query-key widths cannot pass.
DIMS = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
SETTINGS = {
    "plain": MLAArgs(**DIMS),
    "q_lora": MLAArgs(q_lora_rank=12, **DIMS),
    "window": MLAArgs(window=5, **DIMS),
    "window_sinks": MLAArgs(window=5, n_sinks=2, **DIMS),
    "nope": MLAArgs(**{**DIMS, "qk_rope_head_dim": 0}),    # Kimi Linear's MLA: no RoPE
}


def _model_cfg(dtype="float32"):
    return load_config(None, ["model.d_model=32", "model.n_heads=4", "model.max_len=64",
                              "model.vocab_size=64", f"model.dtype={dtype}"]).model


@functools.cache
def _mixer(name: str, dtype: str = "float32", absorb: str = "decode", n_heads=None):
    args = dataclasses.replace(SETTINGS[name], absorb=absorb, n_heads=n_heads)
    return MLA(_model_cfg(dtype), args, rngs=nnx.Rngs(0))


def _rms(x, scale, eps=1e-6):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _reference(m: MLA, x):
    """MLA written out from the equations (V2 eqs. 9-19) with the module's parameters: per-head
    q, k, v, then the plain attention definition. float32."""
    b, t, _ = x.shape
    h, r, n, p, v = m.n_heads, m.kv_lora_rank, m.nope_dim, m.rope_dim, m.v_dim
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    if m.q_lora_rank:
        c_q = _rms(x @ m.wq_a.kernel[...], m.q_norm.scale[...])
        q = c_q @ m.wq_b.kernel[...]
    else:
        q = x @ m.wq.kernel[...]
    q = q.reshape(b, t, h, n + p)
    q = jnp.concatenate([q[..., :n], apply_rope(q[..., n:], pos)], axis=-1)
    kv_a = x @ m.wkv_a.kernel[...]
    c_kv = _rms(kv_a[..., :r], m.kv_norm.scale[...])
    k_rope = apply_rope(kv_a[:, :, None, r:], pos)                      # [B, T, 1, P]
    w = m.wkv_b[...]
    k = jnp.stack([jnp.concatenate([c_kv @ w[:, i, :n], k_rope[:, :, 0]], axis=-1)
                   for i in range(h)], axis=2)
    vals = jnp.stack([c_kv @ w[:, i, n:] for i in range(h)], axis=2)
    o = attention_reference(q, k, vals, window=m.window, n_sinks=m.n_sinks,
                            scale=(n + p) ** -0.5)
    return o.reshape(b, t, h * v) @ m.out.kernel[...]


def _forward(m: MLA, x):
    pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return m(x, positions=pos)[0]


@pytest.mark.parametrize("name", ["plain", "q_lora", "window_sinks"])
def test_expanded_matches_reference(name):
    m = _mixer(name, absorb="never")
    x = jax.random.normal(jax.random.key(0), (2, 13, 32))
    ct = jax.random.normal(jax.random.key(1), (2, 13, 32))

    @functools.partial(jax.jit, static_argnums=0)
    def value_and_grad_x(f, x):   # outputs, and gradients of x through a random cotangent
        y, vjp = jax.vjp(functools.partial(f, m), x)
        return y, vjp(ct)[0]

    y, gx = value_and_grad_x(_forward, x)
    y_ref, gx_ref = value_and_grad_x(_reference, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["q_lora", "window_sinks"])
def test_absorbed_equals_expanded(name):
    # Same seed, same parameter creation order: the two modules hold identical weights.
    expanded, absorbed = _mixer(name, absorb="never"), _mixer(name, absorb="always")
    for a, e in zip(jax.tree.leaves(nnx.state(absorbed, nnx.Param)),
                    jax.tree.leaves(nnx.state(expanded, nnx.Param))):
        np.testing.assert_array_equal(a, e)
    x = jax.random.normal(jax.random.key(2), (2, 14, 32))
    # Full forward, prefill + single steps and chunked prefill through the cache (chunk 7 is
    # larger than the windowed ring of 5 + 2 slots), each absorbed vs expanded.
    paths_e = decode_paths(expanded, x, prefill=7, chunk=7, max_len=32, cache_dtype=jnp.float32)
    paths_a = decode_paths(absorbed, x, prefill=7, chunk=7, max_len=32, cache_dtype=jnp.float32)
    for a, e in zip(paths_a, paths_e):
        assert relative_error(a, e) < 1e-5
    # Gradients through the absorbed form (training with absorb="always") agree too.
    ct = jax.random.normal(jax.random.key(3), x.shape)
    def grad_x(m):
        return jax.jit(jax.grad(lambda x: jnp.sum(_forward(m, x) * ct)))(x)

    np.testing.assert_allclose(grad_x(absorbed), grad_x(expanded), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_decode_parity(name, dtype):
    # absorb="decode": the full forward and the chunks run expanded, the single steps absorbed.
    mixer = _mixer(name, "float32" if dtype == jnp.float32 else "bfloat16")
    x = jax.random.normal(jax.random.key(1), (2, 23, 32)).astype(dtype)
    # Prefill longer than the window, chunks (9) larger than the ring (5 or 7 slots).
    assert_decode_parity(mixer, x, prefill=11, chunk=9, max_len=32, dtype=dtype)


def test_bf16_stays_close_to_float32():
    # The bf16 parity tolerance is honest only if bf16 itself tracks float32 at that level.
    m32, m16 = _mixer("window_sinks", "float32"), _mixer("window_sinks", "bfloat16")
    x = jax.random.normal(jax.random.key(3), (2, 16, 32))
    full32 = np.asarray(jax.jit(functools.partial(_forward, m32))(x))
    full16, step16, _ = decode_paths(m16, x.astype(jnp.bfloat16), prefill=4, chunk=16,
                                     max_len=32, cache_dtype=jnp.bfloat16)
    assert relative_error(full16, full32) < 3e-2
    assert relative_error(step16, full32) < 3e-2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_cache_bytes_per_token_are_the_latent_width(dtype):
    r, p, item = DIMS["kv_lora_rank"], DIMS["qk_rope_head_dim"], jnp.dtype(dtype).itemsize
    for name, slots in [("plain", 1024), ("window_sinks", 5 + 2)]:
        sizes = set()
        for n_heads in (2, 8):
            # Abstract modules (shapes only): the cache's layout needs no initialized weights.
            args = dataclasses.replace(SETTINGS[name], n_heads=n_heads)
            mixer = nnx.eval_shape(lambda a=args: MLA(_model_cfg(), a, rngs=nnx.Rngs(0)))
            assert mixer.wkv_b.shape[1] == n_heads
            cache = mixer.init_cache(1, 1024, dtype)
            # c_kv + k_rope: (R + P) values per token per layer, whatever the number of heads.
            assert cache.bytes_per_token == (r + p) * item
            # nbytes adds the int32 slot positions (4 bytes a slot) and the int32 length.
            assert cache.nbytes == slots * (r + p) * item + slots * 4 + 4
            sizes.add(cache.nbytes)
        assert len(sizes) == 1
    # A window's ring does not grow with max_len.
    windowed = _mixer("window_sinks")
    assert windowed.init_cache(1, 64, dtype).nbytes == windowed.init_cache(1, 16384, dtype).nbytes


def test_full_cache_rejects_a_chunk_longer_than_itself():
    m = _mixer("plain")
    with pytest.raises(ValueError, match="do not fit an MLA cache of 4 slots"):
        m(jnp.zeros((1, 6, 32)), positions=jnp.arange(6)[None],
          cache=m.init_cache(1, 4, jnp.float32))


@pytest.mark.parametrize("override,pattern", [
    ("model.mixer_args.mla.qk_rope_head_dim=5",
     r"model.mixer_args.mla.qk_rope_head_dim must be even \(RoPE rotates pairs\), got 5"),
    ("model.mixer_args.mla.kv_lora_rank=0", r"model.mixer_args.mla.kv_lora_rank must be > 0"),
    ("model.mixer_args.mla.v_head_dim=-2", r"model.mixer_args.mla.v_head_dim must be > 0"),
    ("model.mixer_args.mla.qk_rope_head_dim=-2",
     r"model.mixer_args.mla.qk_rope_head_dim must be >= 0 \(0: no RoPE"),
    ("model.mixer_args.mla.q_lora_rank=-1", r"model.mixer_args.mla.q_lora_rank must be >= 0"),
    ("model.mixer_args.mla.window=300",
     r"model.mixer_args.mla.window=300 is larger than model.max_len=256"),
    ("model.mixer_args.mla.window=0", r"model.mixer_args.mla.window must be > 0 or null"),
    ("model.mixer_args.mla.n_sinks=2", r"model.mixer_args.mla.n_sinks=2 needs a window"),
    ("model.mixer_args.mla.absorb=sometimes",
     r"model.mixer_args.mla.absorb: expected one of 'decode', 'always', 'never'"),
    ("model.mixer_args.mla.kv_rank=8",
     r"unknown config key 'model.mixer_args.mla.kv_rank'; did you mean"),
])
def test_config_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("configs/mla.yaml", [override])


def test_absorb_mode_is_checked_when_built_directly():
    with pytest.raises(ValueError, match="absorb must be one of 'decode', 'always', 'never'"):
        MLA(_model_cfg(), MLAArgs(absorb="sometimes"), rngs=nnx.Rngs(0))


def test_configs_build_and_run():
    cfg = load_config("configs/mla.yaml", ["model.mixer_args.mla.q_lora_rank=16"]).model
    args = cfg.args_for("mla")
    assert cfg.layer_mixers() == ("mla", "mla") and args.q_lora_rank == 16
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    graphdef, state = nnx.split(model)
    call = jax.jit(lambda st, tok, c: nnx.merge(graphdef, st)(tok, cache=c))
    full, _ = call(state, tokens, None)
    assert full.shape == (2, 12, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(full)))
    # Through the model's cache: prefill 11 tokens, then one (absorbed) step.
    cache = model.init_cache(2, 32)
    _, cache = call(state, tokens[:, :11], cache)
    last, cache = call(state, tokens[:, 11:], cache)
    assert relative_error(np.asarray(last), np.asarray(full[:, 11:])) < 2e-2   # bf16 model
    layer = cache.layers[0]
    assert cache.nbytes == 2 * layer.nbytes
    assert layer.bytes_per_token == (args.kv_lora_rank + args.qk_rope_head_dim) * 2
    hybrid = load_config("configs/hybrid_gdn_mla.yaml").model
    assert hybrid.layer_mixers() == ("gated_deltanet",) * 3 + ("mla",)


def test_nope_mla_ignores_positions():
    """qk_rope_head_dim 0 (Kimi Linear's MLA): positions enter nowhere, so spreading them
    apart (which changes every relative distance RoPE sees) changes nothing, where the RoPE
    setting's output moves."""
    x = jax.random.normal(jax.random.key(5), (2, 12, 32))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    moved = {}
    for name in ("nope", "plain"):
        mixer = _mixer(name)
        moved[name] = float(jnp.max(jnp.abs(mixer(x, positions=pos)[0]
                                            - mixer(x, positions=3 * pos)[0])))
    # At init the scores are small, so RoPE's effect is too (measured 4.9e-5); NoPE's is 0.
    assert moved["nope"] == 0.0 and moved["plain"] > 1e-5, moved
