"""Pallas kernel: the state sweep fused with the chunk outputs (forward), for GPU and TPU.

Shape legend: R rows (batch x heads, flattened), N chunks, C chunk size, K key dim, V value
dim, BV the V tile one program owns. Kernel arrays, row-major 2-D per row:
    gq, w, kd [R, N*C, K]    qk [R, N*C, C]    u, o [R, N*C, V]    decay [R, N, 1, K]
    s0, s_final [R, K, V]

Per row, with S_0 = s0 (state_passing/__init__.py has the derivations):

    x_n     = u_n - w_n S_n                (x_n = u_n without w)
    o_n     = gq_n S_n + qk_n x_n          (without qk: gq_n S_n; the caller adds its own
                                            intra-chunk term, e.g. GLA's sub-chunked one)
    S_{n+1} = diag(decay_n) S_n + kd_n^T x_n

Why fuse: unfused, the sweep writes every chunk-start state [N, K, V] to memory (T/C * K * V
floats per row: twice the size of v at C = 64, K = 128) and a batched matmul reads them back
for o. Here S_n never leaves the program (registers on a GPU, a VMEM scratch on a TPU): the
forward pass moves only its inputs and o. The backward recomputes the states with the
unfused sweep kernel and runs its reverse sweep (as flash-linear-attention recomputes h in
its backward); see `chunk_outputs` in __init__.py. The WY / UT solve stays outside, in XLA:
it is parallel over all chunks (no state), and folding a C-row triangular solve into the
sequential program would lengthen the one part that cannot be spread over chunks.

Precision: matmul operands are the inputs' dtype (bfloat16 inputs go to the tensor core /
MXU as bfloat16), with S and x rounded to that dtype only where they enter a matmul;
every product accumulates in float32 and the state itself is carried in float32, so the
rounding of one read never feeds the next chunk's state. float32 inputs use HIGHEST
precision (see precision.HIGHEST).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.state_passing import pallas as _sweep

F32 = jnp.float32


def _dot(a, b, trans_a=False):
    """a b (or a^T b) with b cast to a's dtype; float32 accumulation."""
    b = b.astype(a.dtype)
    dims = (((0,), (0,)), ((), ())) if trans_a else (((1,), (0,)), ((), ()))
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _chunk(s, gq, qk, w, u, kd, decay_row):
    """One chunk: (o [C, BV] float32, S_next [K, BV] float32)."""
    x = u.astype(F32) if w is None else u.astype(F32) - _dot(w, s)
    o = _dot(gq, s)
    if qk is not None:
        o = o + _dot(qk, x)
    return o, decay_row.astype(F32).reshape(-1, 1) * s + _dot(kd, x, trans_a=True)


def _names(has_w, has_qk):
    return (("gq",) + (("qk",) if has_qk else ()) + (("w",) if has_w else ())
            + ("u", "kd", "decay", "s0", "o", "s_final"))


def _kernel_gpu(*refs, n_chunks, c, has_w, has_qk):
    r = dict(zip(_names(has_w, has_qk), refs, strict=True))

    def body(n, s):
        rows = pl.ds(n * c, c)
        o, s_next = _chunk(s, r["gq"][rows, :], r["qk"][rows, :] if has_qk else None,
                           r["w"][rows, :] if has_w else None, r["u"][rows, :],
                           r["kd"][rows, :], r["decay"][n])
        r["o"][rows, :] = o.astype(r["o"].dtype)
        return s_next

    r["s_final"][...] = jax.lax.fori_loop(0, n_chunks, body, r["s0"][...].astype(F32))


def _kernel_tpu(*refs, n_chunks, has_w, has_qk):
    r = dict(zip(_names(has_w, has_qk) + ("s_scratch",), refs, strict=True))
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        r["s_scratch"][...] = r["s0"][...].astype(F32)

    o, s_next = _chunk(r["s_scratch"][...], r["gq"][...], r["qk"][...] if has_qk else None,
                       r["w"][...] if has_w else None, r["u"][...], r["kd"][...],
                       r["decay"][...])
    r["o"][...] = o.astype(r["o"].dtype)
    r["s_scratch"][...] = s_next

    @pl.when(n == n_chunks - 1)
    def _():
        r["s_final"][...] = s_next


def forward(gq, qk, w, u, kd, decay, s0, *, chunk_size, block_v, driver, interpret, out_dtype):
    """Runs the fused forward. Arrays in the kernel layout of the module docstring; qk and w
    may be None. Returns (o [R, N*C, V] out_dtype, s_final [R, K, V] float32)."""
    rows, tc, k = kd.shape
    v = u.shape[-1]
    c, n, bv = chunk_size, tc // chunk_size, block_v
    has_w, has_qk = w is not None, qk is not None
    out_shape = [jax.ShapeDtypeStruct((rows, tc, v), out_dtype),
                 jax.ShapeDtypeStruct((rows, k, v), F32)]
    if driver == "gpu":
        grid = (rows, v // bv)
        whole = lambda d: pl.BlockSpec((None, tc, d), lambda r, j: (r, 0, 0))
        whole_v = pl.BlockSpec((None, tc, bv), lambda r, j: (r, 0, j))
        tile = pl.BlockSpec((None, k, bv), lambda r, j: (r, 0, j))
        decay_spec = pl.BlockSpec((None, n, 1, k), lambda r, j: (r, 0, 0, 0))
        in_specs = [whole(k)] + ([whole(c)] if has_qk else []) + ([whole(k)] if has_w else [])
        in_specs += [whole_v, whole(k), decay_spec, tile]
        out_specs = [whole_v, tile]
        kernel = functools.partial(_kernel_gpu, n_chunks=n, c=c, has_w=has_w, has_qk=has_qk)
        scratch = ()
    else:
        from jax.experimental.pallas import tpu as pltpu
        grid = (rows, v // bv, n)
        chunk = lambda d: pl.BlockSpec((None, c, d), lambda r, j, i: (r, i, 0))
        chunk_v = pl.BlockSpec((None, c, bv), lambda r, j, i: (r, i, j))
        tile = pl.BlockSpec((None, k, bv), lambda r, j, i: (r, 0, j))
        decay_spec = pl.BlockSpec((None, None, 1, k), lambda r, j, i: (r, i, 0, 0))
        in_specs = [chunk(k)] + ([chunk(c)] if has_qk else []) + ([chunk(k)] if has_w else [])
        in_specs += [chunk_v, chunk(k), decay_spec, tile]
        out_specs = [chunk_v, tile]
        kernel = functools.partial(_kernel_tpu, n_chunks=n, has_w=has_w, has_qk=has_qk)
        scratch = (pltpu.VMEM((k, bv), F32),)
    args = (gq,) + ((qk,) if has_qk else ()) + ((w,) if has_w else ()) + (u, kd, decay, s0)
    o, s_final = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch, compiler_params=_sweep.compiler_params(driver, len(grid), k, bv),
        interpret=_sweep.interpret_arg(driver, interpret), name="chunk_outputs_fwd")(*args)
    return o, s_final
