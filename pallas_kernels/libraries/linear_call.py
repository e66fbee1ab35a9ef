"""One linear-op call as the library adapters see it, and the conventions they share: packed
documents as ours define them (pallas_kernels/segments.py) and head dims zero-padded to the
widths a library's kernels are built for.

Shapes: B batch, T time, H heads, K key dim, V value dim.

Packed documents. Ours: segment id 0 is padding, inert (zero output, no gradient, NaN there
reaches nothing), the state restarts at every document start, and the final state is the last
document's. The libraries restart the state at every change of id, so padding would open a
"document" of its own and a row ending in padding would return that one's state. The adapters
therefore hand them run ids: the number of document starts up to each token, so padding
continues the run before it, with its q, k, v, gates and betas zeroed. A zeroed token keeps
the state as it is (decay exp(0) = 1, write k v^T = 0, delta-rule beta 0) and reads nothing
(q = 0), which is exactly our padding, and outputs at padding are zeroed again after the call.

Head-dim padding. q and k zero-padded along K leave every score q.k and k.k unchanged and the
extra state rows at zero; v zero-padded along V adds state columns that only ever hold zeros.
So a library built for K = V = 128 computes our K = 64 op exactly (scale is K ** -0.5 of the
unpadded K, passed explicitly), and the results are sliced back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.segments import document_starts, zero_padding


@dataclasses.dataclass(frozen=True)
class LinearCall:
    """A call of gated_delta_rule / delta_rule / kda / gla / simple_gla in our convention.

    q, k [B, T, H, K]; v [B, T, H, V]; g None (delta rule), [B, T, H] (gated delta rule,
    simple GLA) or [B, T, H, K] (KDA, GLA), log-space decays <= 0; beta [B, T, H] or None (GLA);
    initial_state [B, H, K, V] float32 or None; segment_ids [B, T] int or None; scale a
    Python float; precision "highest" / "bf16" (resolved).
    """

    op: str
    q: jax.Array
    k: jax.Array
    v: jax.Array
    g: jax.Array | None
    beta: jax.Array | None
    scale: float
    initial_state: jax.Array | None
    output_final_state: bool
    segment_ids: jax.Array | None
    precision: str

    @property
    def key_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.v.shape[-1]


def make_call(op: str, q, k, v, g, beta, *, scale, initial_state, output_final_state,
              segment_ids, precision) -> LinearCall:
    """A LinearCall with scale defaulted to K ** -0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return LinearCall(op, q, k, v, g, beta, scale, initial_state, output_final_state,
                      segment_ids, precision)


def library_segments(call: LinearCall) -> tuple[LinearCall, jax.Array | None]:
    """(call with its padding zeroed, run ids [B, T] int32 for the library) as the module
    docstring explains; (call, None) without segment ids."""
    if call.segment_ids is None:
        return call, None
    q, k, v, g, beta = zero_padding(call.segment_ids, call.q, call.k, call.v, call.g, call.beta)
    runs = jnp.cumsum(document_starts(call.segment_ids).astype(jnp.int32), axis=1)
    return dataclasses.replace(call, q=q, k=k, v=v, g=g, beta=beta), runs


def zero_padding_outputs(o: jax.Array, segment_ids) -> jax.Array:
    """o [B, T, H, V] with padding positions zeroed (inert padding, whatever a kernel wrote)."""
    return o if segment_ids is None else zero_padding(segment_ids, o)[0]


def pad_last(x: jax.Array | None, width: int) -> jax.Array | None:
    """x zero-padded along its last axis to `width`."""
    if x is None or x.shape[-1] == width:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def pad_head_dims(call: LinearCall, key_width: int, value_width: int) -> LinearCall:
    """call with q, k (and a per-channel gate) padded to key_width, v to value_width and the
    initial state to [B, H, key_width, value_width]."""
    g = call.g
    if g is not None and g.ndim == 4:
        g = pad_last(g, key_width)
    state = call.initial_state
    if state is not None:
        state = jnp.pad(state, [(0, 0), (0, 0), (0, key_width - state.shape[2]),
                                (0, value_width - state.shape[3])])
    return dataclasses.replace(call, q=pad_last(call.q, key_width), k=pad_last(call.k, key_width),
                               v=pad_last(call.v, value_width), g=g, initial_state=state)


def finish(call: LinearCall, o: jax.Array, final: jax.Array | None):
    """The library's outputs in our convention: o [B, T, H, V] in q's dtype with padding
    zeroed, the final state float32 [B, H, K, V] (None unless asked for); head dims sliced
    back to the call's."""
    o = zero_padding_outputs(o[..., :call.value_dim], call.segment_ids).astype(call.q.dtype)
    if not call.output_final_state:
        return o, None
    return o, final[:, :, :call.key_dim, :call.value_dim].astype(jnp.float32)
