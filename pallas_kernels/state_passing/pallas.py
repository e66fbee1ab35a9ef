"""Pallas kernels for the chunk-to-chunk state recurrence, forward and backward.

Shape legend: R rows (batch x heads, flattened), N chunks, C chunk size, K key dim, V value
dim, BV the V tile one program owns (V = VB * BV). Kernel arrays are row-major 2-D per row:
    w, kd  [R, N*C, K]    u, x  [R, N*C, V]    decay [R, N, 1, K]
    s0, s_final [R, K, V]    states [R, N*K, V] (state n at rows n*K : (n+1)*K)

The recurrence (state_passing/__init__.py has the derivation and the XLA reference), per row:

    x_n      = u_n - w_n S_n                  (x_n = u_n when there is no w: the GLA family)
    S_{n+1}  = diag(decay_n) S_n + kd_n^T x_n

and its reverse-mode sweep, with G the gradient flowing into S_{n+1}:

    dX_n     = dx_n + kd_n G                  d u_n = dX_n,   d w_n = -dX_n S_n^T
    d kd_n   = x_n G^T                        d decay_n = sum_v S_n * G
    G       <- dS_n + diag(decay_n) G - w_n^T dX_n          (G = d s0 after chunk 0)

The V columns of S never mix (x_n's columns depend only on S_n's same columns), so a program
owns one [K, BV] tile of the state: the grid is (R, VB). The backward's d w, d kd and d decay
sum over V, so with VB > 1 each V tile writes a partial that the wrapper sums.

Two drivers share the per-chunk bodies (`_fwd_chunk`, `_bwd_chunk`):
* "gpu": grid (R, VB), one program walks all N chunks in a fori_loop with the state in
  registers; each input block is the row's whole sequence and the loop loads [C, K] slices
  with pl.ds (the pattern of jax's Pallas GPU attention). Lowered through Triton, pinned by
  its compiler params (`compiler_params`: without them jax picks Mosaic GPU, which
  stages whole-sequence blocks in shared memory and overflows it).
* "tpu": grid (R, VB, N), the chunk axis "arbitrary" (sequential) and the state in a VMEM
  scratch that persists across it, so a block is one chunk ([C, K] tiles, double-buffered by
  the Pallas pipeline) and long sequences never have to fit VMEM. The backward walks the chunk
  axis in reverse through its index maps.

Both are checked on CPU in interpret mode (tests/test_state_passing.py) and lowered for their
platform (tests/test_lowering.py). Matmuls take float32 inputs at HIGHEST precision: the state
is a sum over the whole sequence (pallas_kernels/precision.py). These kernels run the backward
of the ops (and the unfused forward); the ops' forward is the fused kernel of fused.py, which
also takes bf16 inputs.

What the backward reads: the forward's outputs (every chunk-start state and, with w, every x
tile) are kept as residuals rather than recomputed. The states are outputs of the op anyway
(the chunk outputs o_n = q_n S_n + ... need them), so storing costs nothing extra; x is
[T, V] per row, the size of v.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.precision import HIGHEST

F32 = jnp.float32


def _dot(a, b):
    return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=F32)


def _dot_tn(a, b):
    """a^T b for a [M, P], b [M, Q] -> [P, Q]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=F32)


def _dot_nt(a, b):
    """a b^T for a [M, P], b [Q, P] -> [M, Q]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=HIGHEST,
                               preferred_element_type=F32)


def _fwd_chunk(s, w, u, kd, decay_row):
    """One chunk: returns (x [C, BV], S_next [K, BV]); w None means x = u."""
    x = u if w is None else u - _dot(w, s)
    return x, decay_row.reshape(-1, 1) * s + _dot_tn(kd, x)


def _bwd_chunk(g, s, w, x, kd, decay_row, ds, dx):
    """One reverse step. Returns (G for S_n, d u, d w or None, d kd, d decay [1, K])."""
    dxt = _dot(kd, g) if dx is None else dx + _dot(kd, g)
    d_kd = _dot_nt(x, g)
    d_decay = jnp.sum(s * g, axis=1).reshape(1, -1)
    g_prev = ds + decay_row.reshape(-1, 1) * g
    d_w = None
    if w is not None:
        d_w = -_dot_nt(dxt, s)
        g_prev = g_prev - _dot_tn(w, dxt)
    return g_prev, dxt, d_w, d_kd, d_decay


def _split_refs(refs, names):
    return dict(zip(names, refs, strict=True))


# ------------------------------------------------------------------------------------ GPU driver


def _fwd_kernel_gpu(*refs, n_chunks, c, k, has_w):
    names = (("w",) if has_w else ()) + ("u", "kd", "decay", "s0", "states", "s_final") + \
        (("x",) if has_w else ())
    r = _split_refs(refs, names)

    def body(n, s):
        rows_c, rows_k = pl.ds(n * c, c), pl.ds(n * k, k)
        w = r["w"][rows_c, :] if has_w else None
        r["states"][rows_k, :] = s
        x, s_next = _fwd_chunk(s, w, r["u"][rows_c, :], r["kd"][rows_c, :], r["decay"][n])
        if has_w:
            r["x"][rows_c, :] = x
        return s_next

    r["s_final"][...] = jax.lax.fori_loop(0, n_chunks, body, r["s0"][...].astype(F32))


def _bwd_kernel_gpu(*refs, n_chunks, c, k, has_w):
    names = (("w", "x") if has_w else ("x",)) + ("kd", "decay", "states", "d_states", "d_final")
    names += (("d_x",) if has_w else ()) + ("d_u", "d_kd", "d_decay", "d_s0")
    names += ("d_w",) if has_w else ()
    r = _split_refs(refs, names)

    def body(i, g):
        n = n_chunks - 1 - i
        rows_c, rows_k = pl.ds(n * c, c), pl.ds(n * k, k)
        w = r["w"][rows_c, :] if has_w else None
        dx = r["d_x"][rows_c, :] if has_w else None
        g_prev, du, dw, dkd, ddec = _bwd_chunk(
            g, r["states"][rows_k, :], w, r["x"][rows_c, :], r["kd"][rows_c, :],
            r["decay"][n], r["d_states"][rows_k, :], dx)
        r["d_u"][rows_c, :] = du
        r["d_kd"][rows_c, :] = dkd
        r["d_decay"][n] = ddec
        if has_w:
            r["d_w"][rows_c, :] = dw
        return g_prev

    r["d_s0"][...] = jax.lax.fori_loop(0, n_chunks, body, r["d_final"][...].astype(F32))


# ------------------------------------------------------------------------------------ TPU driver


def _fwd_kernel_tpu(*refs, n_chunks, has_w):
    names = (("w",) if has_w else ()) + ("u", "kd", "decay", "s0", "states", "s_final")
    names += (("x",) if has_w else ()) + ("s_scratch",)
    r = _split_refs(refs, names)
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        r["s_scratch"][...] = r["s0"][...].astype(F32)

    s = r["s_scratch"][...]
    r["states"][...] = s
    x, s_next = _fwd_chunk(s, r["w"][...] if has_w else None, r["u"][...], r["kd"][...],
                           r["decay"][...])
    if has_w:
        r["x"][...] = x
    r["s_scratch"][...] = s_next

    @pl.when(n == n_chunks - 1)
    def _():
        r["s_final"][...] = s_next


def _bwd_kernel_tpu(*refs, has_w):
    names = (("w", "x") if has_w else ("x",)) + ("kd", "decay", "states", "d_states", "d_final")
    names += (("d_x",) if has_w else ()) + ("d_u", "d_kd", "d_decay", "d_s0")
    names += (("d_w",) if has_w else ()) + ("g_scratch",)
    r = _split_refs(refs, names)
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _():
        r["g_scratch"][...] = r["d_final"][...].astype(F32)

    g_prev, du, dw, dkd, ddec = _bwd_chunk(
        r["g_scratch"][...], r["states"][...], r["w"][...] if has_w else None, r["x"][...],
        r["kd"][...], r["decay"][...], r["d_states"][...], r["d_x"][...] if has_w else None)
    r["d_u"][...] = du
    r["d_kd"][...] = dkd
    r["d_decay"][...] = ddec
    if has_w:
        r["d_w"][...] = dw
    r["g_scratch"][...] = g_prev
    # d_s0's block index is constant along the chunk axis, so it is written back after the
    # last (reverse) step; writing every step keeps the block defined whatever the order.
    r["d_s0"][...] = g_prev


# ------------------------------------------------------------------------------------- wrappers


def _block(shape, index_map):
    # A leading None squeezes that dimension out of the kernel's view of the block.
    return pl.BlockSpec(shape, index_map)


def compiler_params(driver, n_grid, k, bv):
    if driver == "gpu":
        # Pinned to Pallas' Triton lowering. Left unset (compiler_params=None), jax lowers
        # a GPU pallas_call through Mosaic GPU, which stages every whole-sequence block in
        # shared memory (8.5 MB at B4 T4096 H16 D128, against 227 KB on an H100/H200); in
        # Triton a block is a pointer and the loop loads one [C, K] chunk at a time. Warps:
        # the [K, BV] float32 state lives in registers across the loop, 8 warps when it is
        # 128 x 64 or larger (32 values per thread) and 4 below. One stage: each step needs
        # the previous step's state, and a second pipeline stage would double the shared
        # memory of the chunk loads for little overlap.
        from jax.experimental.pallas import triton as pltriton
        return pltriton.CompilerParams(num_warps=8 if k * bv >= 128 * 64 else 4, num_stages=1)
    from jax.experimental.pallas import tpu as pltpu
    sem = ("parallel",) * (n_grid - 1) + ("arbitrary",)
    return pltpu.CompilerParams(dimension_semantics=sem)


def interpret_arg(driver, interpret):
    if not interpret:
        return False
    if driver == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        # Uninitialized outputs read as NaN, so an element the kernel never writes shows up.
        return pltpu.InterpretParams()
    return True


def forward(w, u, kd, decay, s0, *, chunk_size, block_v, driver, interpret):
    """Runs the forward recurrence. Arrays in the kernel layout of the module docstring.

    Returns (states [R, N*K, V], s_final [R, K, V], x [R, N*C, V] or None when w is None).
    """
    rows, tc, k = kd.shape
    v = u.shape[-1]
    c, n = chunk_size, tc // chunk_size
    bv = block_v
    has_w = w is not None
    out_shape = [jax.ShapeDtypeStruct((rows, n * k, v), F32),
                 jax.ShapeDtypeStruct((rows, k, v), F32)]
    if has_w:
        out_shape.append(jax.ShapeDtypeStruct((rows, tc, v), F32))
    if driver == "gpu":
        grid = (rows, v // bv)
        whole_k = _block((None, tc, k), lambda r, j: (r, 0, 0))
        whole_v = _block((None, tc, bv), lambda r, j: (r, 0, j))
        in_specs = ([whole_k] if has_w else []) + [
            whole_v, whole_k, _block((None, n, 1, k), lambda r, j: (r, 0, 0, 0)),
            _block((None, k, bv), lambda r, j: (r, 0, j))]
        out_specs = [_block((None, n * k, bv), lambda r, j: (r, 0, j)),
                     _block((None, k, bv), lambda r, j: (r, 0, j))]
        out_specs += [whole_v] if has_w else []
        kernel = functools.partial(_fwd_kernel_gpu, n_chunks=n, c=c, k=k, has_w=has_w)
        scratch = ()
    else:
        from jax.experimental.pallas import tpu as pltpu
        grid = (rows, v // bv, n)
        chunk_k = _block((None, c, k), lambda r, j, i: (r, i, 0))
        chunk_v = _block((None, c, bv), lambda r, j, i: (r, i, j))
        in_specs = ([chunk_k] if has_w else []) + [
            chunk_v, chunk_k, _block((None, None, 1, k), lambda r, j, i: (r, i, 0, 0)),
            _block((None, k, bv), lambda r, j, i: (r, 0, j))]
        out_specs = [_block((None, k, bv), lambda r, j, i: (r, i, j)),
                     _block((None, k, bv), lambda r, j, i: (r, 0, j))]
        out_specs += [chunk_v] if has_w else []
        kernel = functools.partial(_fwd_kernel_tpu, n_chunks=n, has_w=has_w)
        scratch = (pltpu.VMEM((k, bv), F32),)
    args = ((w,) if has_w else ()) + (u, kd, decay, s0)
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch, compiler_params=compiler_params(driver, len(grid), k, bv),
        interpret=interpret_arg(driver, interpret), name="state_passing_fwd")(*args)
    return outs[0], outs[1], (outs[2] if has_w else None)


def backward(w, x, kd, decay, states, d_states, d_final, d_x, *, chunk_size, block_v, driver,
             interpret):
    """Runs the reverse sweep. x is u when w is None. Returns (d_w or None, d_u, d_kd,
    d_decay, d_s0), each summed over V tiles."""
    rows, tc, k = kd.shape
    v = x.shape[-1]
    c, n = chunk_size, tc // chunk_size
    bv = block_v
    vb = v // bv
    has_w = w is not None
    # d_w, d_kd, d_decay sum over V: one partial per V tile, summed below.
    out_shape = [jax.ShapeDtypeStruct((rows, tc, v), F32),
                 jax.ShapeDtypeStruct((vb, rows, tc, k), F32),
                 jax.ShapeDtypeStruct((vb, rows, n, 1, k), F32),
                 jax.ShapeDtypeStruct((rows, k, v), F32)]
    if has_w:
        out_shape.append(jax.ShapeDtypeStruct((vb, rows, tc, k), F32))
    if driver == "gpu":
        grid = (rows, vb)
        whole_k = _block((None, tc, k), lambda r, j: (r, 0, 0))
        whole_v = _block((None, tc, bv), lambda r, j: (r, 0, j))
        state_v = _block((None, n * k, bv), lambda r, j: (r, 0, j))
        tile = _block((None, k, bv), lambda r, j: (r, 0, j))
        part_k = _block((None, None, tc, k), lambda r, j: (j, r, 0, 0))
        in_specs = ([whole_k, whole_v] if has_w else [whole_v]) + [
            whole_k, _block((None, n, 1, k), lambda r, j: (r, 0, 0, 0)), state_v, state_v, tile]
        in_specs += [whole_v] if has_w else []
        out_specs = [whole_v, part_k,
                     _block((None, None, n, 1, k), lambda r, j: (j, r, 0, 0, 0)), tile]
        out_specs += [part_k] if has_w else []
        kernel = functools.partial(_bwd_kernel_gpu, n_chunks=n, c=c, k=k, has_w=has_w)
        scratch = ()
    else:
        from jax.experimental.pallas import tpu as pltpu
        grid = (rows, vb, n)
        rev = n - 1
        chunk_k = _block((None, c, k), lambda r, j, i: (r, rev - i, 0))
        chunk_v = _block((None, c, bv), lambda r, j, i: (r, rev - i, j))
        state_v = _block((None, k, bv), lambda r, j, i: (r, rev - i, j))
        tile = _block((None, k, bv), lambda r, j, i: (r, 0, j))
        part_k = _block((None, None, c, k), lambda r, j, i: (j, r, rev - i, 0))
        in_specs = ([chunk_k, chunk_v] if has_w else [chunk_v]) + [
            chunk_k, _block((None, None, 1, k), lambda r, j, i: (r, rev - i, 0, 0)),
            state_v, state_v, tile]
        in_specs += [chunk_v] if has_w else []
        out_specs = [chunk_v, part_k,
                     _block((None, None, None, 1, k), lambda r, j, i: (j, r, rev - i, 0, 0)),
                     tile]
        out_specs += [part_k] if has_w else []
        kernel = functools.partial(_bwd_kernel_tpu, has_w=has_w)
        scratch = (pltpu.VMEM((k, bv), F32),)
    args = ((w, x) if has_w else (x,)) + (kd, decay, states, d_states, d_final)
    args += (d_x,) if has_w else ()
    outs = pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch, compiler_params=compiler_params(driver, len(grid), k, bv),
        interpret=interpret_arg(driver, interpret), name="state_passing_bwd")(*args)
    d_u, d_kd, d_decay, d_s0 = outs[:4]
    d_w = outs[4].sum(0) if has_w else None
    return d_w, d_u, d_kd.sum(0), d_decay.sum(0), d_s0
