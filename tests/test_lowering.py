"""Every Pallas kernel lowered for the platform it targets, from this CPU, forward and backward.

`jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",) or ("tpu",))` runs the Pallas ->
Triton (GPU) / Mosaic (TPU) lowering without a device and without executing anything: it
catches unsupported primitives, block shapes the target refuses (Triton's power-of-two tiles,
TPU's (8, 128) tiling), VMEM overflow and, for Mosaic GPU, shared-memory overflow. It does not
run ptxas on the Triton IR (XLA does that when it compiles for a real GPU), so register
pressure and Triton's own shared-memory budget are checked only on a device
(benchmarks/device_check.sh).

Arguments are jax.ShapeDtypeStruct, so the benchmark shapes (B4 T4096 H16 D128, attention up
to T16384) cost no memory. Each case asserts that the lowered module holds the kernel's custom
call (Triton for the GPU, Mosaic for the TPU), not an XLA fallback.

The kernel libraries' backends (pallas_kernels/libraries) are lowered the same way: deltanet-
tpu's Pallas TPU kernels for a TPU, jax-linear-attention's and tokamax's Mosaic GPU kernels for
an H100, tokamax's Mosaic TPU attention, each skipped with the reason where its package is not
installed; cuDNN attention where this machine has cuDNN (its lowering asks for it).

Shape legend: B batch, T time, H heads, D head dim (K = V = D).
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import backends
from pallas_kernels.attention import attention
from pallas_kernels.backends import lowering_for
from pallas_kernels.delta_rule import delta_rule
from pallas_kernels.gated_delta_rule import gated_delta_rule
from pallas_kernels.gla import gla, simple_gla
from pallas_kernels.kda import kda
from pallas_kernels.linear_attention import linear_attention
from pallas_kernels.nsa import nsa

# The custom call each platform's Pallas lowering emits; the GPU one must be Triton (the
# kernels are written for it, see state_passing/pallas.py), not Mosaic GPU.
KERNEL_CALL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
LOWERING_PLATFORM = {"gpu": "cuda", "tpu": "tpu"}
BENCH = (4, 4096, 16, 128)          # benchmarks/kernels.py's shape


def lowered_text(fn, args, platform: str) -> str:
    """The StableHLO text of jit(fn)(*args) lowered for `platform` ("gpu" / "tpu")."""
    with lowering_for(platform):
        traced = jax.jit(fn).trace(*args)
        return traced.lower(lowering_platforms=(LOWERING_PLATFORM[platform],)).as_text()


def kernel_calls(text: str, platform: str) -> int:
    return len(re.findall(re.escape(f"custom_call @{KERNEL_CALL[platform]}"), text))


def linear_op_args(op, shape, dtype):
    b, t, h, d = shape
    s = lambda *dims: jax.ShapeDtypeStruct(dims, dtype)
    qkv = (s(b, t, h, d), s(b, t, h, d), s(b, t, h, d))
    if op == "gated_delta_rule":
        return (*qkv, s(b, t, h), s(b, t, h))
    if op == "kda":
        return (*qkv, s(b, t, h, d), s(b, t, h))
    if op == "delta_rule":
        return (*qkv, s(b, t, h))
    if op == "gla":
        return (*qkv, s(b, t, h, d))
    if op == "simple_gla":
        return (*qkv, s(b, t, h))
    return qkv


OPS = {"gated_delta_rule": gated_delta_rule, "delta_rule": delta_rule, "gla": gla,
       "simple_gla": simple_gla, "kda": kda, "linear_attention": linear_attention,
       "normalized_linear_attention": functools.partial(linear_attention, normalize=True)}


def op_fwd_bwd(op, backend):
    """(*args) -> gradients of sum(o) + sum(final state) in every input: forward and backward."""
    def loss(*args):
        o, s = OPS[op](*args, backend=backend, output_final_state=True)
        return jnp.sum(o.astype(jnp.float32)) + sum(jnp.sum(x) for x in jax.tree.leaves(s))

    return lambda *args: jax.grad(loss, argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("shape,dtype", [
    ((1, 37, 2, 16), jnp.float32),      # odd length (padded to the chunk), small head dim
    ((2, 20, 2, 16), jnp.float32),      # shorter than a chunk: chunk 32 (fitted_chunk_size)
    (BENCH, jnp.bfloat16),
    ((4, 4096, 16, 64), jnp.float32),
], ids=["small", "short", "bench-d128-bf16", "bench-d64-f32"])
def test_linear_op_lowers(op, platform, shape, dtype):
    backend = f"pallas_{platform}"
    text = lowered_text(op_fwd_bwd(op, backend), linear_op_args(op, shape, dtype), platform)
    # At least the forward sweep and the backward sweep are kernels.
    assert kernel_calls(text, platform) >= 2, text[:2000]


@pytest.mark.parametrize("platform,backend", [("gpu", "flash"), ("tpu", "splash")])
@pytest.mark.parametrize("t,d,window", [(4096, 128, None), (16384, 128, 1024), (16384, 64, None),
                                        (100, 64, 32)])
def test_attention_kernel_lowers(platform, backend, t, d, window):
    b, h, hkv = (1, 16, 4) if t > 4096 else (4, 16, 16)
    s = lambda hh: jax.ShapeDtypeStruct((b, t, hh, d), jnp.bfloat16)

    def fwd_bwd(q, k, v):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, window=window, backend=backend)
                                    .astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    text = lowered_text(fwd_bwd, (s(h), s(hkv), s(hkv)), platform)
    assert kernel_calls(text, platform) >= 2, text[:2000]


@pytest.mark.parametrize("platform,backend", [("gpu", "flash"), ("tpu", "splash")])
def test_attention_kernel_with_segment_ids_lowers(platform, backend):
    """Packed documents: the segment-id blocks and masks lower too (T 4096, window 1024)."""
    s = jax.ShapeDtypeStruct((2, 4096, 8, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((2, 4096), jnp.int32)

    def fwd_bwd(q, k, v, seg):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, window=1024, backend=backend,
                                              segment_ids=seg).astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    text = lowered_text(fwd_bwd, (s, s, s, seg), platform)
    assert kernel_calls(text, platform) >= 2, text[:2000]


# 64k tokens lowered for the GPU only: the TPU lowering at that length took 144 s of the
# suite's 36 min on 2 cores. The TPU kernels are lowered at 16k, packed and not.
@pytest.mark.parametrize("platform,t,packed", [
    (platform, t, packed) for platform in ("gpu", "tpu")
    for t, packed in ((16384, False), (65536, False), (16384, True))
    if (platform, t) != ("tpu", 65536)])
def test_nsa_kernels_lower(platform, t, packed):
    """NSA (pallas_kernels/nsa) with the paper's blocks (compressed 32 / 16, 16 blocks of 64,
    window 512), GQA groups of 4, bf16, forward and backward: the selected branch's three
    kernels (forward, dq, dk / dv) and the window branch's flash / splash kernels."""
    s = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.bfloat16)  # noqa: E731
    b, hq, h, d = 1, 16, 4, 128
    args = (s(b, t, hq, d), s(b, t, h, d), s(b, t, h, d), *[s(b, t, hq)] * 3,
            jax.ShapeDtypeStruct((b, t), jnp.int32))

    def fwd_bwd(q, k, v, gc, gs, gw, seg):
        f = lambda q, k, v: jnp.sum(nsa(  # noqa: E731
            q, k, v, gc, gs, gw, segment_ids=seg if packed else None, backend="pallas",
            query_chunk=512).astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    text = lowered_text(fwd_bwd, args, platform)
    assert kernel_calls(text, platform) >= 5, text[:2000]
    assert "nsa_selected_dkv" in text


# The custom call a library's kernels lower to: Mosaic GPU's on an H100, Mosaic TPU's on a TPU.
LIBRARY_CALL = {"gpu": "mosaic_gpu", "tpu": "tpu_custom_call"}
LINEAR_LIBRARY_PLATFORM = {"deltanet_tpu": "tpu", "jla": "gpu"}


def needs(backend: str) -> None:
    if not backends.library_installed(backend):
        pytest.skip(f"{backends.LIBRARY_MODULE[backend][1]} is not installed")


@pytest.mark.parametrize("op", ["gated_delta_rule", "delta_rule", "gla", "simple_gla", "kda"])
@pytest.mark.parametrize("backend", sorted(LINEAR_LIBRARY_PLATFORM))
def test_library_linear_op_lowers(backend, op):
    """B4 T4096 H16 D128 bf16, forward and backward, through the library's kernels."""
    needs(backend)
    platform = LINEAR_LIBRARY_PLATFORM[backend]
    text = lowered_text(op_fwd_bwd(op, backend), linear_op_args(op, BENCH, jnp.bfloat16),
                        platform)
    assert len(re.findall(re.escape(f"custom_call @{LIBRARY_CALL[platform]}"), text)) >= 2, (
        text[:2000])


def test_tokamax_kda_lowers_for_tpu():
    """tokamax's KDA Mosaic TPU kernel, forward and backward, B4 T4096 H16 D128 bf16."""
    needs("tokamax")
    text = lowered_text(op_fwd_bwd("kda", "tokamax"), linear_op_args("kda", BENCH, jnp.bfloat16),
                        "tpu")
    assert len(re.findall(re.escape("custom_call @tpu_custom_call"), text)) >= 2, text[:2000]


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("t,window,packed", [(4096, None, False), (16384, 1024, False),
                                             (4096, 1024, True)])
def test_tokamax_attention_lowers(platform, t, window, packed):
    """tokamax's Mosaic kernels, forward and backward (packed documents as its dense mask)."""
    needs("tokamax")
    b, h, hkv = (1, 16, 4) if t > 4096 else (4, 16, 16)
    s = lambda hh: jax.ShapeDtypeStruct((b, t, hh, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def fwd_bwd(q, k, v, seg):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, window=window, backend="tokamax",
                                              segment_ids=seg if packed else None)
                                    .astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    text = lowered_text(fwd_bwd, (s(h), s(hkv), s(hkv), seg), platform)
    assert len(re.findall(re.escape(f"custom_call @{LIBRARY_CALL[platform]}"), text)) >= 2, (
        text[:2000])


@pytest.mark.parametrize("window", [None, 1024])
def test_cudnn_attention_lowers(window):
    """cuDNN flash attention for an H100, forward and backward, where cuDNN is installed (jax
    asks the local cuDNN for its version while lowering)."""
    s = jax.ShapeDtypeStruct((4, 4096, 16, 128), jnp.bfloat16)

    def fwd_bwd(q, k, v):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, window=window, backend="cudnn")
                                    .astype(jnp.float32))
        return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

    try:
        text = lowered_text(fwd_bwd, (s, s, s), "gpu")
    except RuntimeError as err:
        if "cuDNN is not detected" not in str(err):
            raise
        pytest.skip(f"no cuDNN on this machine, which jax needs to lower cuDNN attention: {err}")
    assert "custom_call @__cudnn$fmha" in text, text[:2000]


def test_lowering_for_restores_the_platform_and_refuses_cpu():
    from pallas_kernels.backends import target_platform

    with lowering_for("tpu"):
        assert target_platform() == "tpu"
    assert target_platform() == jax.default_backend()
    with pytest.raises(ValueError, match="platform must be 'gpu' or 'tpu'"):
        with lowering_for("cpu"):
            pass
