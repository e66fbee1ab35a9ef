"""Attention visibility masks, shared by the attention op and the layers that build their own
masks (Based's quadratic form, CCA, MLA, Titans MAG).

Query t sees key j iff j <= t and (window is None or t - j < window or j < n_sinks)
(pallas_kernels/attention/reference.py writes the definition out element by element).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.segments import document_positions


def visibility_mask(seq_len: int, window: int | None, n_sinks: int) -> jax.Array:
    """[T, T] bool: query t (rows) sees key j (columns)."""
    t = jnp.arange(seq_len)[:, None]
    j = jnp.arange(seq_len)[None, :]
    visible = j <= t
    if window is not None:
        visible &= (t - j < window) | (j < n_sinks)
    return visible


def packed_visibility(segment_ids, window: int | None, n_sinks: int):
    """[B, T, T] bool for packed documents: query i sees key j iff both are in one document
    and, with p the in-document positions, p_j <= p_i and (window is None or p_i - p_j <
    window or p_j < n_sinks): the definition above applied to each document on its own
    (sinks are each document's first tokens)."""
    pos = document_positions(segment_ids)
    pi, pj = pos[:, :, None], pos[:, None, :]
    m = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (pj <= pi)
    if window is not None:
        m &= (pi - pj < window) | (pj < n_sinks)
    return m
