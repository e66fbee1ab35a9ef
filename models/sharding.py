"""Device mesh, logical axis names and the rules that map them onto the mesh (JAX SPMD).

Shape legend: B batch, T tokens, D d_model, V vocabulary, X any projection width (heads x
head_dim, MLP width, latent ranks).

The mesh has four axes, sized by the config's `mesh` section (-1 = the devices left over):

    data      data parallelism, params replicated
    fsdp      data parallelism with params and optimizer state sharded (ZeRO-3 / FSDP: XLA
              all-gathers a weight where it is used and reduce-scatters its gradient)
    sequence  context parallelism: the time axis of the batch and of every activation split
              (params replicated over it, their gradients summed); the mixers' exchanges are
              pallas_kernels/context_parallel's
    tensor    Megatron-style: attention heads and MLP width sharded

Logical axes (as in MaxText and flax.linen.partitioning): every parameter dimension gets a
logical name, and RULES map names to mesh axes. A batch is split over data x fsdp; the model
width D is split over fsdp (that is what makes FSDP); projection widths over tensor:

    batch -> (data, fsdp)   length -> sequence   embed -> fsdp   heads, mlp, vocab -> tensor
    anything else -> none

Where the names come from: `param_logical_axes` assigns them in one place from a parameter's
path and shape (D-sized dimensions are "embed"; the other dimension of a 2-D projection is
"mlp" inside an MLP and "heads" elsewhere; the token table is (None, embed) and an untied
output head (embed, vocab); stacked
weights shard only their D dimension; everything else, e.g. norms, short convs, Titans' memory
weights, is replicated). Doing it here rather
than at each of the ~15 layers' inits keeps every layer free of sharding code; a parameter the
rules do not recognise is replicated, which is always correct, only not memory-optimal. A
dimension is sharded only when the mesh axes divide it (else replicated along that axis), and a
mesh axis is used at most once per array.

Sharding never changes the math: XLA inserts the collectives, so a model gives the same losses
on any mesh up to the order of floating-point sums (tests/test_sharding.py checks it on 8
simulated CPU devices).

Activations: `constrain(x, names)` pins key activations (the residual stream [B, T, D] is
("batch", None, None)) when a mesh is active (`use_mesh`); without one it is a no-op, so
single-device code (tests, decoding) is untouched. The residual stream [B, T, D] is
("batch", "length", None): with mesh.sequence > 1 its time axis stays split.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.segments import document_positions

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": ("sequence",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
}

# (mesh, sequence layout, sequence attention exchange) of each use_mesh block
_ACTIVE: list[tuple[Mesh, str, str]] = []


class MeshError(ValueError):
    """A mesh that does not fit the devices or the batch."""


def resolve_mesh_shape(sizes: Sequence[int], n_devices: int) -> tuple[int, ...]:
    """(data, fsdp, sequence, tensor) with -1 filled in; raises MeshError unless the product
    is n_devices."""
    sizes = tuple(int(s) for s in sizes)
    named = lambda: ", ".join(f"{a}={n}" for a, n in zip(MESH_AXES, sizes))  # noqa: E731
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % fixed:
            raise MeshError(f"mesh {named()}: the fixed axes ({fixed} devices) do not divide "
                            f"the {n_devices} devices available")
        sizes = tuple(n_devices // fixed if s == -1 else s for s in sizes)
    if math.prod(sizes) != n_devices:
        raise MeshError(f"mesh {named()} needs {math.prod(sizes)} devices, but {n_devices} "
                        "are available (set one axis to -1 to take the rest)")
    return sizes


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
    """The (data, fsdp, sequence, tensor) mesh of the config's `mesh` section over `devices`
    (default: all devices of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg.sizes(), len(devices))
    # jax.make_mesh orders devices for the physical topology (TPU ICI rings). Auto axes: XLA
    # (GSPMD / Shardy) propagates shardings from the pinned inputs, outputs and constraints;
    # newer jax defaults to Explicit axes, which would need a sharding on every gather.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of one array from its logical axis names: each name's mesh axes, dropped
    where they do not divide the dimension or were already used by an earlier dimension."""
    used, spec = set(), []
    for name, dim in zip(names, shape, strict=True):
        axes = tuple(a for a in RULES.get(name, ()) if a not in used) if name else ()
        if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return P(*spec)


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry))))


def param_logical_axes(path: Sequence[str], shape: Sequence[int], d_model: int
                       ) -> tuple[str | None, ...]:
    """Logical names of one parameter's dimensions (module docstring: the rules)."""
    path = [str(p) for p in path]
    if path and path[-1] == "embedding" and len(shape) == 2:
        # Only D is split: a lookup into a vocab-split table with batch-split ids makes XLA
        # replicate the table on the fly (its "involuntary full rematerialization").
        return (None, "embed")
    if d_model not in shape or any("conv" in p for p in path):
        # Short-conv kernels [W, C] are a few KB and C is a channel (heads) width even when it
        # equals D: replicated.
        return (None,) * len(shape)
    if len(shape) != 2:
        # Stacked weights (MoM's per-memory projections [M, D, X], ...): only D is sharded.
        i = list(shape).index(d_model)
        return tuple("embed" if j == i else None for j in range(len(shape)))
    width = "mlp" if "mlp" in path else "heads"
    if path[:1] == ["head"]:
        width = "vocab"
    d_in, d_out = shape
    if d_in == d_model and d_out == d_model:
        # Square: an output projection (heads -> D) reads its width on the input side.
        is_out = any(p in ("out", "o_proj", "out_proj", "down") for p in path)
        return (width, "embed") if is_out else ("embed", width)
    return ("embed", width) if d_in == d_model else (width, "embed")


def param_shardings(params, mesh: Mesh, d_model: int):
    """A NamedSharding for every leaf of a params pytree (e.g. nnx state.to_pure_dict())."""
    def one(path, leaf):
        # An nnx.State's leaves sit one level below their Variable ("...kernel.value").
        keys = [k for k in map(_key, path) if k not in ("value", "raw_value")]
        names = param_logical_axes(keys, np.shape(leaf), d_model)
        return NamedSharding(mesh, spec_for(names, np.shape(leaf), mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def follow_params(tree, params, shardings, mesh: Mesh):
    """Shardings for a pytree holding copies of the params (optimizer state: Adam's mu and nu
    are params-shaped trees inside optax's state): a leaf whose path ends with a parameter's
    path and has its shape takes that parameter's sharding; other leaves (step counts, scalars)
    are replicated."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree_util.tree_leaves(shardings), strict=True):
        by_path[tuple(_key(p) for p in path)] = (np.shape(leaf), sh)

    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        keys = tuple(_key(p) for p in path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] batch arrays: rows over data x fsdp, the time axis over sequence."""
    return NamedSharding(mesh, P(RULES["batch"], RULES["length"]))


def check_batch(batch_size: int, mesh: Mesh, what: str = "data.batch_size") -> None:
    """Raises MeshError unless the batch splits evenly over the batch axes and the processes.
    what: how the rows are named in the message."""
    n = math.prod(mesh.shape[a] for a in RULES["batch"])
    if batch_size % n:
        raise MeshError(f"{what}={batch_size} must be a multiple of mesh data x fsdp "
                        f"= {n}")
    if batch_size % jax.process_count():
        raise MeshError(f"{what}={batch_size} must be a multiple of the "
                        f"{jax.process_count()} processes (each reads its own rows)")


def check_sequence(seq_len: int, mesh: Mesh, what: str = "data.seq_len",
                   layout: str = "contiguous") -> None:
    """Raises MeshError unless the sequence axis divides the batch's time axis (into 2N
    pieces for the zigzag layout)."""
    n = mesh.shape.get("sequence", 1)
    if seq_len % n:
        raise MeshError(f"{what}={seq_len} must be a multiple of mesh.sequence = {n} (each "
                        f"sequence shard holds {what} / {n} tokens)")
    if layout == "zigzag" and n > 1 and seq_len % (2 * n):
        raise MeshError(f"{what}={seq_len} must be a multiple of 2 x mesh.sequence = {2 * n} "
                        "for the zigzag layout (each shard holds two pieces), or set "
                        "mesh.sequence_layout=contiguous")


def active_mesh() -> Mesh | None:
    """The mesh of the innermost `use_mesh` block, or None."""
    return _ACTIVE[-1][0] if _ACTIVE else None


def active_sequence_layout() -> str:
    """The sequence layout of the innermost `use_mesh` block ("contiguous" without one)."""
    return _ACTIVE[-1][1] if _ACTIVE else "contiguous"


def active_sequence_attention() -> str:
    """Softmax attention's sequence exchange in the innermost `use_mesh` block."""
    return _ACTIVE[-1][2] if _ACTIVE else "all_gather"


def lay_out_batch(batch: dict, mesh: Mesh, layout: str) -> dict:
    """A host batch of [B, T] arrays laid out for the sequence shards: unchanged when
    contiguous (or one shard); zigzag: every array reordered along T (context_parallel's
    zigzag_order) and "positions" added, the in-document positions (segment ids) or token
    indices of the original order, which the model's position encodings need."""
    n = mesh.shape.get("sequence", 1)
    if layout != "zigzag" or n == 1:
        return batch
    from pallas_kernels.context_parallel import zigzag_order

    first = next(iter(batch.values()))
    order = zigzag_order(first.shape[1], n)
    seg = batch.get("segment_ids")
    if seg is None:
        positions = np.broadcast_to(np.arange(first.shape[1], dtype=np.int32), first.shape)
    else:
        positions = np.asarray(document_positions(np.asarray(seg)))
    out = {k: np.asarray(v)[:, order] for k, v in batch.items()}
    out["positions"] = np.asarray(positions, np.int32)[:, order]
    return out


def shard_batch(local_batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a batch -> global arrays sharded over the batch axes.

    With one process the local rows are the whole batch; with several, each process passes the
    rows it read (data/pipeline.make_train_iterator(shard=...)), and the global batch is their
    concatenation in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


@contextlib.contextmanager
def use_mesh(mesh: Mesh, sequence_layout: str = "contiguous",
             sequence_attention: str = "all_gather") -> Iterator[Mesh]:
    """Makes `mesh` the one `constrain` uses while tracing inside this block, sequence_layout
    how its batches' rows are laid out over the sequence axis (lay_out_batch; the model's
    sequence exchanges read it) and sequence_attention softmax attention's exchange."""
    _ACTIVE.append((mesh, sequence_layout, sequence_attention))
    try:
        yield mesh
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names under the active mesh; identity without one."""
    if not _ACTIVE:
        return x
    mesh = _ACTIVE[-1][0]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names, x.shape,
                                                                             mesh)))


def cache_shardings(cache, mesh: Mesh, batch_size: int):
    """Decode caches: every array whose leading dimension is the batch is split over the batch
    axes like the activations (when they divide it); scalars (lengths, offsets) and other
    leaves are replicated. Cache layouts differ per mixer ([B, S, Hkv, Dh] KV caches,
    [B, H, K, V] recurrent states, [B, W - 1, C] conv tails, Titans' per-head weights), so
    heads are not split over `tensor` here: with tensor > 1 XLA gathers the heads where the
    step needs them."""
    axes = RULES["batch"]
    n = math.prod(mesh.shape[a] for a in axes)

    def one(leaf):
        shape = np.shape(leaf)
        if shape and shape[0] == batch_size and batch_size % n == 0:
            return NamedSharding(mesh, P(axes))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, cache)
