"""Pieces shared by the delta-rule memories (layers/delta_net.py, layers/kda.py, layers/mom.py)
and the other normalised-key mixers (layers/titans.py, layers/cca.py): the L2 norm of keys, the
Mamba2 decay (its init and its log form), and the one-token recurrence of the (gated) delta
rule.

Shape legend: B batch, H heads, K key (and query) head dim, V value head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x [..., K] -> x / sqrt(sum x^2 + eps), in float32 (bf16 squares lose the small keys)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)


def recurrent_step(state: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array,
                   g: jax.Array | None, scale: float) -> tuple[jax.Array, jax.Array]:
    """One token of the (gated) delta rule, in float32: S' = exp(g) S (no gate: S' = S),
    S = S' + beta k (v - S'^T k)^T, o = scale S^T q.

    Args:
        state: [B, H, K, V] float32 memory before the token.
        q, k: [B, H, K]; v: [B, H, V]; beta: [B, H]; g: [B, H] log decay (Gated DeltaNet),
            [B, H, K] one per key channel (KDA), or None (no gate).
        scale: query scale.

    Returns:
        (o [B, H, V] float32, new state [B, H, K, V] float32).
    """
    f32 = lambda a: a.astype(jnp.float32)
    q, k, v, beta = f32(q), f32(k), f32(v), f32(beta)
    hi = jax.lax.Precision.HIGHEST   # match the ops, which run float32 matmuls at full precision
    if g is not None:                                             # S' = diag(exp(g)) S
        decay = jnp.exp(f32(g))
        state = (decay[..., None] if decay.ndim == 3 else decay[..., None, None]) * state
    pred = jnp.einsum("bhk,bhkv->bhv", k, state, precision=hi)     # S'^T k: what memory recalls
    state = state + jnp.einsum("bhk,bhv->bhkv", beta[..., None] * k, v - pred, precision=hi)
    o = jnp.einsum("bhk,bhkv->bhv", q * scale, state, precision=hi)
    return o, state


def decay_init(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mamba2 / Gated DeltaNet init of the decay parameters (A_log, dt_bias), each `shape`:
    A = exp(A_log) ~ uniform(1, 16) per head, and dt_bias the inverse softplus of
    dt ~ log-uniform[1e-3, 1e-1], so that at init the decay exp(-A softplus(dt_bias)) spans
    slow and fast heads (from ~0.999 to ~0.2)."""
    key_a, key_dt = jax.random.split(key)
    a = jax.random.uniform(key_a, shape, jnp.float32, 1.0, 16.0)
    u = jax.random.uniform(key_dt, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
    dt = jnp.maximum(dt, 1e-4)
    return jnp.log(a), dt + jnp.log(-jnp.expm1(-dt))   # softplus^-1(dt)


def log_decay(logit: jax.Array, a_log: jax.Array, dt_bias: jax.Array) -> jax.Array:
    """Mamba2's discretised A dt as a log decay g = -exp(A_log) softplus(logit + dt_bias) <= 0
    (float32 in, float32 out; the caller lines up the head axis of the three)."""
    return -jnp.exp(a_log) * jax.nn.softplus(logit + dt_bias)
