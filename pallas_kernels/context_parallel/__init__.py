"""Context parallelism: ops whose time axis is sharded over the mesh's `sequence` axis exchange
what their slices need from each other instead of gathering the sequence.

Shape legend: B batch, T tokens of the whole row, Tl = T / N tokens of one shard, N shards of
the `sequence` axis, H heads, K key dim, V value dim.

The model code does not change: inside `shard_sequence(mesh)` (entered by the LM when the
active mesh has sequence > 1 and no cache is in use) the ops that know how run their shard's
slice under jax.shard_map with an exchange of their own:

  * linear family and delta rules (pallas_kernels/dispatch.run_linear_op: linear_attention,
    gla, simple_gla / Mamba-2, delta_rule, gated_delta_rule, kda): each shard summarises its
    slice as an affine map of the incoming state, S_out = M S_in + b, folds the gathered
    summaries in shard order and runs its slice from the state it receives (linear.py);
  * softmax attention (pallas_kernels/attention): key / value slices all-gathered, each shard's
    queries attend over them under the causal / window / sink / document mask (attention.py);
  * short convolutions (layers/conv.py): the previous shard's last W - 1 inputs as a halo
    (halo.py).

Everything else is left to XLA's SPMD partitioner, which keeps the result exact by gathering
what an op needs (correct on any mesh, not memory-efficient): tests/test_context_parallel.py
checks both, equal logits and gradients for every mixer, and no gathered [B, T, D] activation
where a mixer has its exchange.

Layout: contiguous (shard r holds tokens r Tl .. (r + 1) Tl - 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

SEQUENCE = "sequence"
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


@dataclasses.dataclass(frozen=True)
class SequenceShards:
    """The mesh an op's time axis is sharded over, and how."""

    mesh: Mesh

    @property
    def n(self) -> int:
        return self.mesh.shape[SEQUENCE]

    def batch_spec(self, batch: int):
        """The batch axes when they divide the batch (else replicated)."""
        axes = tuple(a for a in BATCH_AXES if a in self.mesh.shape)
        return axes if axes and batch % math.prod(self.mesh.shape[a] for a in axes) == 0 \
            else None

    def head_spec(self, heads: int):
        size = self.mesh.shape.get(HEAD_AXIS, 1)
        return HEAD_AXIS if size > 1 and heads % size == 0 else None

    def spec(self, x: jax.Array, heads: bool = True) -> P:
        """[B, T, H, ...] (heads=True) or [B, T, ...]: batch, time over `sequence`, heads over
        `tensor` where they divide; the rest replicated."""
        rest = [None] * (x.ndim - 2)
        if heads and x.ndim >= 3:
            rest[0] = self.head_spec(x.shape[2])
        return P(self.batch_spec(x.shape[0]), SEQUENCE, *rest)

    def check_length(self, op: str, t: int, at_least: int = 1) -> int:
        """Tl, after checking that N divides T and Tl >= at_least."""
        if t % self.n:
            raise ValueError(f"{op}: the sequence length {t} must be a multiple of "
                             f"mesh.sequence = {self.n} (each shard holds T / {self.n} tokens)")
        if t // self.n < at_least:
            raise ValueError(f"{op}: each of the {self.n} sequence shards holds {t // self.n} "
                             f"tokens, fewer than the {at_least} it needs from the previous "
                             "shard; use fewer shards or longer sequences")
        return t // self.n


_STATE = threading.local()


def sequence_shards() -> SequenceShards | None:
    """The active SequenceShards, or None (no `shard_sequence` block, or inside a shard)."""
    return getattr(_STATE, "shards", None)


@contextlib.contextmanager
def _set(value) -> Iterator[None]:
    previous = getattr(_STATE, "shards", None)
    _STATE.shards = value
    try:
        yield
    finally:
        _STATE.shards = previous


def shard_sequence(mesh: Mesh):
    """Inside this block ops run sequence-parallel over mesh's `sequence` axis (read when a
    function is traced). A no-op context when that axis has size 1."""
    if mesh.shape.get(SEQUENCE, 1) <= 1:
        return contextlib.nullcontext()
    return _set(SequenceShards(mesh))


def inside_shard():
    """For the body of a shard_map: ops called there see their local slice only."""
    return _set(None)


def run_sharded(shards: SequenceShards, local, args, in_specs, out_specs):
    """jax.shard_map(local) over every mesh axis, with `inside_shard()` while tracing it."""
    def body(*a):
        with inside_shard():
            return local(*a)

    return jax.shard_map(body, mesh=shards.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)


def previous_shard(x: jax.Array, n: int, fill=0):
    """Inside a shard: x of shard r - 1 (shard 0 gets `fill`)."""
    got = jax.lax.ppermute(x, SEQUENCE, perm=[(i, i + 1) for i in range(n - 1)])
    first = jax.lax.axis_index(SEQUENCE) == 0
    return jax.numpy.where(first, jax.numpy.asarray(fill, x.dtype), got)
