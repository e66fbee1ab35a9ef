"""The kernel libraries' backends (pallas_kernels/libraries) against our references on CPU:
values, final states and the gradients of every input, on plain rows and on packed rows with a
document starting mid-chunk, a document id reused after padding and NaN-poisoned padding.

What runs here: deltanet-tpu's Pallas TPU kernels in the Pallas interpreter; jax-linear-
attention's chunk-parallel JAX form (its Mosaic GPU kernels have no CPU interpreter; they are
lowered in tests/test_lowering.py); tokamax's XLA attention; "cudnn" as jax's XLA
dot_product_attention with the adapter's arguments. A library that is not installed is skipped
with the reason.

Shape legend: B batch, T time, H heads, K key dim, V value dim, Dh attention head dim.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import backends
from pallas_kernels.attention import attention
from pallas_kernels.backends import interpret_kernels, lowering_for
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gla import gla, simple_gla
from pallas_kernels.kda import kda

LINEAR_LIBRARIES = ("deltanet_tpu", "jla")
OPS = ("gated_delta_rule", "delta_rule", "gla", "simple_gla", "kda")
B, T, H, K, V = 2, 200, 2, 32, 16


def needs(backend: str) -> None:
    if not backends.library_installed(backend):
        module, package = backends.LIBRARY_MODULE[backend]
        pytest.skip(f"{package} is not installed (the dev extra installs it)")


def packed_rows() -> jax.Array:
    """Row 0: documents of 50 and 130 tokens (the second crosses the 64- and 128-token chunk
    boundaries mid-document), then 20 padding. Row 1: 10 padding, document 1 (90 tokens),
    10 padding, document 1 again (a new document: an id after padding opens one)."""
    row0 = [1] * 50 + [2] * 130 + [0] * 20
    row1 = [0] * 10 + [1] * 90 + [0] * 10 + [1] * 90
    return jnp.array([row0, row1], jnp.int32)


def linear_inputs(op: str, seed: int = 0):
    """(q, k, v, gate, beta, initial_state) for `op`; gate / beta None where it takes none."""
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    if op in ("gated_delta_rule", "delta_rule", "kda"):
        k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)      # the layers' L2-normalised keys
    v = jax.random.normal(ks[2], (B, T, H, V))
    gate_shape = (B, T, H, K) if op in ("gla", "kda") else (B, T, H)
    gate = None if op == "delta_rule" else -0.3 * jax.nn.softplus(
        jax.random.normal(ks[3], gate_shape))
    beta = (jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
            if op in ("gated_delta_rule", "delta_rule", "kda") else None)
    s0 = 0.5 * jax.random.normal(ks[5], (B, H, K, V))
    return q, k, v, gate, beta, s0


def call_op(op, backend, q, k, v, gate, beta, s0, segment_ids, **kw):
    common = dict(initial_state=s0, output_final_state=True, backend=backend,
                  segment_ids=segment_ids, **kw)
    if op in ("gated_delta_rule", "delta_rule"):
        return gated_delta_rule(q, k, v, gate, beta, **common)
    if op == "kda":
        return kda(q, k, v, gate, beta, **common)
    return (gla if op == "gla" else simple_gla)(q, k, v, gate, **common)


def poison_padding(segment_ids, *arrays):
    """The arrays with NaN at padding positions (segment id 0)."""
    pad = segment_ids == 0
    return tuple(None if a is None else
                 jnp.where(pad.reshape(pad.shape + (1,) * (a.ndim - 2)), jnp.nan, a)
                 for a in arrays)


@functools.cache
def loss_and_grads(op: str, backend: str, packed: bool):
    """jitted (inputs) -> (o, final state, gradients of a random projection of both in every
    input), for `op` through `backend` (run inside interpret_kernels: the trace sees it)."""
    wo = jax.random.normal(jax.random.key(7), (B, T, H, V))
    ws = jax.random.normal(jax.random.key(8), (B, H, K, V))
    seg = packed_rows() if packed else None

    def loss(q, k, v, gate, beta, s0):
        o, s = call_op(op, backend, q, k, v, gate, beta, s0, seg)
        return jnp.sum(o * wo) + jnp.sum(s * ws), (o, s)

    def run(inputs):
        with interpret_kernels():
            grads, (o, s) = jax.grad(loss, argnums=tuple(range(6)), has_aux=True)(*inputs)
        return o, s, grads

    return jax.jit(run)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("library", LINEAR_LIBRARIES)
def test_linear_library_matches_the_reference(library, op, packed):
    needs(library)
    if library == "jla" and jax.default_backend() == "gpu":
        pytest.skip("jla's Mosaic GPU kernels take bf16 only: test_linear_library_in_bf16 "
                    "checks them on this GPU")
    inputs = linear_inputs(op)
    seg = packed_rows() if packed else None
    if packed:     # NaN at padding must reach no output, state or gradient
        q, k, v, gate, beta = poison_padding(seg, *inputs[:5])
        inputs = (q, k, v, gate, beta, inputs[5])
    o, s, grads = loss_and_grads(op, library, packed)(inputs)
    o_ref, s_ref, grads_ref = loss_and_grads(op, "reference", packed)(inputs)
    # float32 throughout; measured max |errors| over both libraries and all ops: values 1.1e-5
    # (of |o| <= 10), states 9.5e-6 (of 10), gradients 5e-5 (of 90): ~1e-6 relative, float32
    # rounding over 200-token sums.
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=2e-5)
    for name, g, g_ref in zip("q k v gate beta initial_state".split(), grads, grads_ref):
        if g_ref is None:
            continue
        assert np.isfinite(np.asarray(g)).all(), name
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4, err_msg=name)
    if packed:
        pad = np.asarray(seg == 0)
        assert not np.asarray(o)[pad].any()                       # padding outputs are zeros
        for g in grads[:5]:
            if g is not None:
                assert not np.asarray(g)[pad].any()               # and take no gradient


@pytest.mark.parametrize("library", LINEAR_LIBRARIES)
def test_linear_library_in_bf16(library):
    """bf16 inputs: precision "auto" is the libraries' bf16 path (bf16 matmul operands, float32
    state); against the float32 reference on the same (bf16-rounded) inputs."""
    needs(library)
    q, k, v, gate, beta, s0 = linear_inputs("gated_delta_rule", seed=1)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    seg = packed_rows()
    with interpret_kernels():
        o, s = call_op("gated_delta_rule", library, q, k, v, gate, beta, s0, seg)
    o_ref, s_ref = call_op("gated_delta_rule", "reference", q, k, v, gate, beta, s0, seg)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    # Measured max |error|: deltanet-tpu (bf16 matmuls in the interpreter) 7.8e-3 on outputs
    # of |o| <= 1.6 (one bf16 ulp there), 3.5e-3 on states of 0.94; jla's chunked form computes
    # in float32 on a CPU (2.4e-7); its bf16 kernels run only on the device check.
    np.testing.assert_allclose(o.astype(jnp.float32), o_ref.astype(jnp.float32), atol=2e-2,
                               rtol=2e-2)
    np.testing.assert_allclose(s, s_ref, atol=1e-2, rtol=1e-2)


def test_tokamax_kda_matches_the_reference():
    """tokamax.ops.kimi_delta_attention (its XLA form on a CPU) with our initial and final
    state as its one segment: values, states and every input's gradient. Measured: exact
    (max |error| 0: it runs the same recurrence)."""
    needs("tokamax")
    inputs = linear_inputs("kda", seed=2)
    o, s, grads = loss_and_grads("kda", "tokamax", False)(inputs)
    o_ref, s_ref, grads_ref = loss_and_grads("kda", "reference", False)(inputs)
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=2e-5)
    for name, g, g_ref in zip("q k v gate beta initial_state".split(), grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4, err_msg=name)


def test_tokamax_kda_refuses_packed_documents_and_other_ops():
    needs("tokamax")
    q, k, v, gate, beta, s0 = linear_inputs("kda")
    with pytest.raises(ValueError, match="kda: backend 'tokamax' does not take packed"):
        call_op("kda", "tokamax", q, k, v, gate, beta, s0, packed_rows())
    with pytest.raises(ValueError, match="tokamax"):
        q, k, v, gate, beta, s0 = linear_inputs("gla")
        call_op("gla", "tokamax", q, k, v, gate, beta, s0, None)


def _has_kernel(fn, *args) -> bool:
    """Whether fn, lowered for the platform of the enclosing lowering_for block, calls a
    Pallas kernel (Mosaic TPU, Mosaic GPU or Triton custom call)."""
    platform = {"gpu": "cuda", "tpu": "tpu"}[backends.target_platform()]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return any(c in text for c in ("tpu_custom_call", "mosaic_gpu", "xla.gpu.triton"))


def test_deltanet_tpu_refuses_wide_heads_and_auto_falls_back():
    needs("deltanet_tpu")
    wide = jnp.ones((1, 16, 1, 256))
    g, beta = -0.1 * jnp.ones((1, 16, 1)), 0.5 * jnp.ones((1, 16, 1))
    op = lambda backend: lambda x: gated_delta_rule(x, x, x, g, beta, backend=backend)[0]
    with lowering_for("tpu"):
        with pytest.raises(ValueError, match="gated_delta_rule: backend 'deltanet_tpu' takes "
                                             "K, V <= 128.*got K=256, V=256"):
            jax.make_jaxpr(op("deltanet_tpu"))(wide)
        assert not _has_kernel(op("auto"), wide)                 # xla: no kernel
        assert _has_kernel(op("auto"), wide[..., :64])           # deltanet-tpu, K padded


def test_jla_kernels_take_bf16_and_auto_falls_back_for_float32():
    needs("jla")
    x = jnp.ones((1, 128, 2, 64))
    g, beta = -0.1 * jnp.ones((1, 128, 2)), 0.5 * jnp.ones((1, 128, 2))
    op = lambda backend, precision="auto": lambda x: gated_delta_rule(
        x, x, x, g, beta, backend=backend, precision=precision)[0]
    with lowering_for("gpu"):
        with pytest.raises(ValueError, match="backend 'jla' runs bf16 operands only"):
            jax.make_jaxpr(op("jla", "highest"))(x)
        assert not _has_kernel(op("auto"), x)                    # float32: xla
        assert _has_kernel(op("auto"), x.astype(jnp.bfloat16))   # bf16: the Mosaic GPU kernels
        assert _has_kernel(op("jla", "bf16"), x)                 # float32 inputs run as bf16


# ---------------------------------------------------------------------------------------------
# Attention: tokamax (its XLA form here) and cuDNN's adapter (jax's XLA form here)

AB, AT, AH, AHKV, DH = 2, 96, 4, 2, 32


def attention_inputs(dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (AB, AT, AH, DH))
    k = jax.random.normal(ks[1], (AB, AT, AHKV, DH))
    v = jax.random.normal(ks[2], (AB, AT, AHKV, DH))
    return tuple(x.astype(dtype) for x in (q, k, v))


def attention_segments():
    """Row 0: documents of 40 and 36 tokens, 20 padding; row 1: 8 padding, one document."""
    return jnp.array([[1] * 40 + [2] * 36 + [0] * 20, [0] * 8 + [3] * 88], jnp.int32)


@functools.cache
def attention_grads(backend, window, n_sinks, packed):
    seg = attention_segments() if packed else None
    wo = jax.random.normal(jax.random.key(9), (AB, AT, AH, DH))

    def loss(q, k, v):
        o = attention(q, k, v, window=window, n_sinks=n_sinks, backend=backend,
                      segment_ids=seg)
        return jnp.sum(o.astype(jnp.float32) * wo), o

    def run(q, k, v):
        with interpret_kernels():
            return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    return jax.jit(run)


@pytest.mark.parametrize("window,n_sinks,packed", [
    (None, 0, False), (24, 0, False), (24, 3, False), (None, 0, True), (24, 3, True)],
    ids=["causal", "window", "window-sinks", "packed", "packed-window-sinks"])
def test_tokamax_attention_matches_the_reference(window, n_sinks, packed):
    needs("tokamax")
    q, k, v = attention_inputs()
    if packed:
        q, k, v = poison_padding(attention_segments(), q, k, v)
    grads, o = attention_grads("tokamax", window, n_sinks, packed)(q, k, v)
    grads_ref, o_ref = attention_grads("reference", window, n_sinks, packed)(q, k, v)
    # float32; measured max |errors| 2.4e-7 (values), 1.4e-6 (gradients of |g| <= 6.5).
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 24])
def test_cudnn_adapter_matches_the_reference(window):
    """bf16 (cuDNN takes nothing else): the adapter's window, GQA and scale against the
    float32 reference on the same bf16 inputs."""
    q, k, v = attention_inputs(jnp.bfloat16)
    grads, o = attention_grads("cudnn", window, 0, False)(q, k, v)
    up = lambda x: x.astype(jnp.float32)
    grads_ref, o_ref = attention_grads("reference", window, 0, False)(up(q), up(k), up(v))
    other_ref = attention_grads("reference", 8 if window else 24, 0, False)(up(q), up(k),
                                                                           up(v))[1]
    assert o.dtype == jnp.bfloat16
    # bf16 probabilities and products: measured max |error| 9.8e-3 on outputs, 2.2e-2 on
    # gradients of |g| <= 5.8; the output under another window differs by 1.3-2.3.
    np.testing.assert_allclose(up(o), o_ref, atol=2.5e-2, rtol=2e-2)
    assert np.abs(up(o) - other_ref).max() > 0.3
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(up(g), g_ref, atol=6e-2, rtol=2e-2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(window=16, n_sinks=2), "backend 'cudnn' has no attention sinks: use 'flash'"),
    (dict(segment_ids=jnp.ones((AB, AT), jnp.int32)), "backend 'cudnn' takes no packed "
                                                       "documents.*'tokamax' or 'xla'"),
    (dict(dtype=jnp.float32), "backend 'cudnn' runs bf16 / fp16 inputs only.*got float32"),
])
def test_cudnn_refuses_what_it_cannot_do_and_auto_falls_back(kwargs, message):
    kwargs = dict(kwargs)
    q, k, v = attention_inputs(kwargs.pop("dtype", jnp.bfloat16))
    with lowering_for("gpu"):
        assert backends.resolve_backend("attention", "auto") == "cudnn"
        with pytest.raises(ValueError, match=message):
            attention(q, k, v, backend="cudnn", **kwargs)
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, backend="auto",
                                                             **kwargs))(q, k, v))
        assert "cudnn" not in jaxpr                   # the xla form ran instead
