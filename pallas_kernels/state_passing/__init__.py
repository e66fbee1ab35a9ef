"""The sequential part of every chunkwise linear-attention op: passing the state from chunk to
chunk. One function, three backends ("xla" lax.scan, "pallas_gpu", "pallas_tpu"), used by
gla, simple_gla, delta_rule and gated_delta_rule.

Shape legend: B batch, H heads, N chunks, C chunk size, K key dim, V value dim.
    w, kd [B, H, N, C, K]; u [B, H, N, C, V]; decay [B, H, N, K]; s0 [B, H, K, V].

The recurrence (one per batch row and head; S_n is the [K, V] state entering chunk n):

    x_n     = u_n - w_n S_n          (no w: x_n = u_n)
    S_{n+1} = diag(decay_n) S_n + kd_n^T x_n

* GLA / simple GLA (Yang et al. 2024, "Gated Linear Attention Transformers with
  Hardware-Efficient Training", Sec. 4, the inter-chunk recurrence): no w, u = V_n, kd = keys
  decayed to the chunk end, decay = the chunk's total decay exp(G_C) (per key channel; a
  scalar gate broadcast over K).
* (Gated) DeltaNet in the WY / UT form (Yang et al. 2024, arXiv:2406.06484, Eq. 8-11; Yang,
  Kautz & Hatamizadeh 2024, arXiv:2412.06464, Sec. 3.3): w = T diag(beta gamma) K, u = T
  diag(beta) V with T = (I + A)^-1, so x_n is the chunk's "new values" (the pseudo-values the
  delta rule actually writes); decay = gamma_C broadcast over K (1 for the ungated rule).

Everything per chunk that does not depend on S (building w, u, kd, and the intra-chunk
outputs) is parallel over chunks and stays in XLA (batched matmuls, autodiff); only this
sweep is sequential, and it is what the Pallas kernels (pallas.py) implement, forward and
backward, joined by jax.custom_vjp. The ops call `chunk_outputs`, which also forms the chunk
outputs o_n = gq_n S_n + qk_n x_n: on "xla" as batched matmuls over the states
`state_passing` returns, on a Pallas backend inside the sweep (fused.py), so the forward never
writes the chunk-start states; its backward recomputes them with the sweep kernel.

On the GPU driver C, K and V are zero-padded to Triton's tile sides (powers of two, >= 16) and
sliced back (`_triton_side`); zeros are inert in the recurrence.

`state_passing` returns the state entering every chunk, x (the same array as u when there is
no w) and the final state, all float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.backends import interpreting, kernel_interpret, needs_interpreter
from pallas_kernels.precision import matmul
from pallas_kernels.state_passing import fused as _fused
from pallas_kernels.state_passing import pallas as _pallas

__all__ = ["BACKENDS", "chunk_outputs", "state_passing", "state_passing_xla"]

BACKENDS = ("xla", "pallas_gpu", "pallas_tpu")
F32 = jnp.float32


def _dot(spec: str, a, b):
    """einsum with b cast to a's dtype, accumulated in float32: float32 operands at HIGHEST,
    bf16 operands on the bf16 path (the fused kernel's rule: a state enters a matmul as a copy
    in the operands' dtype, and the product is added to the float32 state)."""
    return matmul(spec, a, b, a.dtype)


def state_passing_xla(w, u, kd, decay, s0):
    """lax.scan over chunks; the definition the kernels are checked against (autodiff).

    w / u / kd may be bfloat16 (precision "bf16"): the matmuls then take bf16 operands; the
    state and x stay float32."""
    def step(s, xs):
        w_n, u_n, kd_n, dec_n = xs
        x = u_n.astype(F32) if w_n is None else u_n.astype(F32) - _dot("bhck,bhkv->bhcv", w_n, s)
        s_next = dec_n[..., None] * s + _dot("bhck,bhcv->bhkv", kd_n, x)
        return s_next, (s, x)

    xs = tuple(None if a is None else jnp.moveaxis(a, 2, 0) for a in (w, u, kd, decay))
    s_final, (states, x) = jax.lax.scan(step, s0, xs)
    states, x = jnp.moveaxis(states, 0, 2), jnp.moveaxis(x, 0, 2)
    return states, (u.astype(F32) if w is None else x), s_final


def _default_block_v(v: int, driver: str) -> int:
    # GPU: 64-wide V tiles double the programs for V = 128 (one program per row and tile runs
    # the whole sequence, so parallelism is rows x tiles). TPU: 128 lanes per vreg.
    tile = 64 if driver == "gpu" else 128
    return tile if v % tile == 0 else v


def state_passing(w, u, kd, decay, s0, *, backend="xla", block_v=None):
    """Chunk-to-chunk state recurrence (see the module docstring).

    Args:
        w: [B, H, N, C, K] float32, or None (x = u).
        u: [B, H, N, C, V] float32.
        kd: [B, H, N, C, K] float32 keys as they enter the end-of-chunk state.
        decay: [B, H, N, K] float32 chunk decays in [0, 1].
        s0: [B, H, K, V] float32 state before the first chunk.
        backend: "xla", "pallas_gpu" or "pallas_tpu".
        block_v: V tile per kernel program (must divide V); default 64 (GPU) / 128 (TPU) when
            it divides V, else V.

    Returns:
        (states [B, H, N, K, V] entering each chunk, x [B, H, N, C, V], s_final [B, H, K, V]).

    Raises:
        ValueError: unknown backend or a block_v that does not divide V.
    """
    if backend == "xla":
        return state_passing_xla(w, u, kd, decay, s0)
    driver = _driver("state_passing", backend)
    b, h, n, c, k = kd.shape
    v = u.shape[-1]
    if driver == "gpu" and (padded := _triton_padding(c, k, v)):
        states, x, s_final = state_passing(*_pad_sweep_inputs(w, u, kd, decay, s0, padded),
                                           backend=backend, block_v=block_v)
        # The slices give the padding zero gradient.
        return (states[..., :k, :v], u if w is None else x[..., :c, :v],
                s_final[..., :k, :v])
    bv = _default_block_v(v, driver) if block_v is None else int(block_v)
    if bv < 1 or v % bv:
        raise ValueError(f"state_passing: block_v={block_v} must divide V={v}")
    flat = lambda a, d: None if a is None else a.astype(F32).reshape(b * h, n * c, d)
    states, x, s_final = _kernel_op(
        flat(w, k), flat(u, v), flat(kd, k), decay.astype(F32).reshape(b * h, n, 1, k),
        s0.astype(F32).reshape(b * h, k, v), (c, bv, driver, kernel_interpret(backend)))
    states = states.reshape(b, h, n, k, v)
    x = u if w is None else x.reshape(b, h, n, c, v)
    return states, x, s_final.reshape(b, h, k, v)


def _driver(op: str, backend: str) -> str:
    """"gpu" or "tpu" for a Pallas backend name.

    Raises:
        ValueError: naming `op`, for any other name, or for a kernel of another platform
            outside backends.interpret_kernels() / lowering_for().
    """
    if backend not in BACKENDS or backend == "xla":
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of "
                         f"{', '.join(map(repr, BACKENDS))}")
    if needs_interpreter(backend) and not interpreting():
        raise ValueError(f"{op}: backend {backend!r} needs its platform, or "
                         "pallas_kernels.backends.interpret_kernels() to run in the interpreter")
    return backend.removeprefix("pallas_")


def _triton_side(d: int) -> int:
    """Triton tiles have power-of-two sides, and tl.dot wants each side >= 16."""
    return max(16, 1 << (d - 1).bit_length())


def _triton_padding(c: int, k: int, v: int):
    """(Cp, Kp, Vp), the Triton sides of (C, K, V), or None when they already are."""
    padded = tuple(_triton_side(d) for d in (c, k, v))
    return None if padded == (c, k, v) else padded


def _pad(a, rows: int, cols: int):
    """a zero-padded at the end of its last two axes (None stays None)."""
    return None if a is None else jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, rows), (0, cols)])


def _pad_sweep_inputs(w, u, kd, decay, s0, padded):
    """The sweep's inputs padded to (Cp, Kp, Vp). Zeros are inert: a padded row of w / u / kd
    writes nothing (x = 0 there, kd^T x = 0); padded K rows of the state start at 0 and stay 0
    (decay 1, no write); padded V columns never mix with real ones."""
    c, k, v = kd.shape[3], kd.shape[4], u.shape[-1]
    cp, kp, vp = padded
    return (_pad(w, cp - c, kp - k), _pad(u, cp - c, vp - v), _pad(kd, cp - c, kp - k),
            jnp.pad(decay, [(0, 0)] * 3 + [(0, kp - k)], constant_values=1.0),
            _pad(s0, kp - k, vp - v))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _kernel_op(w, u, kd, decay, s0, cfg):
    states, s_final, x = _run_forward(w, u, kd, decay, s0, cfg)
    return states, x, s_final


def _run_forward(w, u, kd, decay, s0, cfg):
    c, bv, driver, interpret = cfg
    return _pallas.forward(w, u, kd, decay, s0, chunk_size=c, block_v=bv, driver=driver,
                           interpret=interpret)


def _kernel_op_fwd(w, u, kd, decay, s0, cfg):
    states, s_final, x = _run_forward(w, u, kd, decay, s0, cfg)
    # Residuals: the forward's own outputs (see pallas.py: stored, not recomputed).
    return (states, x, s_final), (w, u if w is None else x, kd, decay, states)


def _kernel_op_bwd(cfg, res, cts):
    c, bv, driver, interpret = cfg
    w, x, kd, decay, states = res
    d_states, d_x, d_final = cts
    d_w, d_u, d_kd, d_decay, d_s0 = _pallas.backward(
        w, x, kd, decay, states, d_states.astype(F32), d_final.astype(F32),
        None if w is None else d_x.astype(F32), chunk_size=c, block_v=bv, driver=driver,
        interpret=interpret)
    return d_w, d_u, d_kd, d_decay, d_s0


_kernel_op.defvjp(_kernel_op_fwd, _kernel_op_bwd)


# ------------------------------------------------------------------ sweep fused with the outputs


def _outputs_unfused(gq, qk, w, u, kd, decay, s0, backend, block_v):
    """o = gq S + qk x from the states the sweep returns (float32), and the final state.

    The matmuls take the inputs' dtype (bf16 operands on the bf16 path, float32 at HIGHEST
    otherwise); a Pallas sweep takes float32 inputs."""
    if backend != "xla":
        f32 = lambda a: None if a is None else a.astype(F32)
        w, u, kd = f32(w), f32(u), f32(kd)
    states, x, s_final = state_passing(w, u, kd, decay, s0, backend=backend, block_v=block_v)
    o = _dot("bhnck,bhnkv->bhncv", gq, states)
    if qk is not None:
        o = o + _dot("bhnij,bhnjv->bhniv", qk, x)
    return o, s_final


def chunk_outputs(gq, qk, w, u, kd, decay, s0, *, backend="xla", block_v=None):
    """The chunk outputs o_n = gq_n S_n + qk_n x_n over the state sweep, and the final state.

    "xla" runs the lax.scan sweep and two batched matmuls; a Pallas backend runs one kernel
    that computes o inside the sweep, so the chunk-start states are never written (fused.py),
    and its backward recomputes them with the sweep kernel and runs the reverse sweep.

    Args:
        gq: [B, H, N, C, K] queries as they read the chunk-start state (scaled and decayed).
        qk: [B, H, N, C, C] masked intra-chunk scores applied to x, or None (no such term: the
            caller adds its own intra-chunk output).
        w, u, kd, decay, s0: as in `state_passing` (w may be None).
        backend, block_v: as in `state_passing`.

    Float32 or bfloat16 gq / qk / w / u / kd; decay and s0 float32.

    Returns:
        (o [B, H, N, C, V] float32, s_final [B, H, K, V] float32).
    """
    if backend == "xla":
        return _outputs_unfused(gq, qk, w, u, kd, decay, s0, "xla", None)
    driver = _driver("chunk_outputs", backend)
    b, h, n, c, k = kd.shape
    v = u.shape[-1]
    if driver == "gpu" and (padded := _triton_padding(c, k, v)):
        cp, kp, _ = padded
        o, s_final = chunk_outputs(_pad(gq, cp - c, kp - k), _pad(qk, cp - c, cp - c),
                                   *_pad_sweep_inputs(w, u, kd, decay, s0, padded),
                                   backend=backend, block_v=block_v)
        return o[..., :c, :v], s_final[..., :k, :v]
    bv = _default_block_v(v, driver) if block_v is None else int(block_v)
    if bv < 1 or v % bv:
        raise ValueError(f"chunk_outputs: block_v={block_v} must divide V={v}")
    return _fused_op(gq, qk, w, u, kd, decay.astype(F32), s0.astype(F32),
                     (backend, bv, kernel_interpret(backend)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused_op(gq, qk, w, u, kd, decay, s0, cfg):
    backend, bv, interpret = cfg
    b, h, n, c, k = kd.shape
    v = u.shape[-1]
    # One input dtype for the kernel's matmuls: bfloat16 only when every matrix input is.
    dtype = jnp.bfloat16 if all(a is None or a.dtype == jnp.bfloat16
                                for a in (gq, qk, w, u, kd)) else F32
    flat = lambda a, d: None if a is None else a.astype(dtype).reshape(b * h, n * c, d)
    o, s_final = _fused.forward(
        flat(gq, k), flat(qk, c), flat(w, k), flat(u, v), flat(kd, k),
        decay.reshape(b * h, n, 1, k), s0.reshape(b * h, k, v), chunk_size=c, block_v=bv,
        driver=backend.removeprefix("pallas_"), interpret=interpret, out_dtype=F32)
    return o.reshape(b, h, n, c, v), s_final.reshape(b, h, k, v)


def _fused_fwd(gq, qk, w, u, kd, decay, s0, cfg):
    # Residuals: the inputs only; the states are recomputed in the backward.
    return _fused_op(gq, qk, w, u, kd, decay, s0, cfg), (gq, qk, w, u, kd, decay, s0)


def _fused_bwd(cfg, res, cts):
    backend, bv, interpret = cfg
    # The backward of the unfused form on the kernels: the sweep kernel recomputes the
    # chunk-start states (float32), then the reverse-sweep kernel and two batched matmuls.
    _, vjp = jax.vjp(lambda *a: _outputs_unfused(*a, backend, bv), *res)
    grads = vjp(cts)
    return tuple(None if g is None else g.astype(a.dtype) for g, a in zip(grads, res))


_fused_op.defvjp(_fused_fwd, _fused_bwd)
