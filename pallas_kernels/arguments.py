"""Argument checks and defaults shared by the linear-family ops (linear_attention, gla, delta
rules).

Shapes: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def default_scale(k: jax.Array, scale: float | None = None) -> float:
    """Query scale: `scale` if given, else K ** -0.5 (K = k.shape[-1])."""
    return k.shape[-1] ** -0.5 if scale is None else scale


def check_delta_inputs(op: str, q, k, v, beta, g=None, initial_state=None) -> None:
    """Raises ValueError on inconsistent shapes (q/k [B,T,H,K], v [B,T,H,V], beta/g [B,T,H])."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"{op}: q and k must both be [B, T, H, K]; got {q.shape}, {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must be [B, T, H, V] matching q; got {v.shape}")
    if beta.shape != q.shape[:3]:
        raise ValueError(f"{op}: beta must be [B, T, H] = {q.shape[:3]}; got {beta.shape}")
    if g is not None and g.shape != q.shape[:3]:
        raise ValueError(f"{op}: g must be [B, T, H] = {q.shape[:3]}; got {g.shape}")
    b, _, h, dk = q.shape
    want = (b, h, dk, v.shape[-1])
    if initial_state is not None and initial_state.shape != want:
        raise ValueError(f"{op}: initial_state must be [B, H, K, V] = {want}; "
                         f"got {initial_state.shape}")


def initial_state_f32(initial_state, q: jax.Array, v: jax.Array) -> jax.Array:
    """The [B, H, K, V] float32 starting state (zeros when none is given)."""
    if initial_state is None:
        b, _, h, dk = q.shape
        return jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
    return initial_state.astype(jnp.float32)
