"""The language model: embedding -> n_layers x (norm -> mixer -> +, norm -> SwiGLU -> +) ->
norm -> head. Mixers come from `model.mixers`, repeated cyclically over the layers.

Shape legend: B batch, T tokens, D model width, V vocabulary.

`logits, cache = model(tokens, cache=cache)` serves training (cache None), prefill and decode
(a ModelCache from `model.init_cache`). Parameters are float32; activations run in
`model.dtype` (bf16 by default); logits and the loss are float32.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import refuse_segments_with_cache, tree_nbytes
from layers.mlp import SwiGLU
from layers.norm import RMSNorm
from layers.registry import MixerWithAuxLoss, build_mixer
from models.sharding import (
    active_mesh,
    active_sequence_attention,
    active_sequence_layout,
    constrain,
)
from pallas_kernels.backends import forward_only
from pallas_kernels.context_parallel import shard_sequence
from pallas_kernels.segments import document_positions

RESIDUAL = ("batch", "length", None)     # logical axes of the residual stream [B, T, D]

# Activation checkpointing of each block in training (train.remat): what the backward pass keeps
# from the forward. "full" saves nothing inside a block (its input is kept by the caller) and
# recomputes the whole block; "dots" saves every matmul output and recomputes the elementwise
# work between them (norms, activations, gates); "dots_no_batch" saves only matmuls without
# batch dimensions (the projections, not attention's score / value products, which grow with
# T^2 or with the state); "offload" keeps what dots_no_batch keeps but in host memory
# (pinned_host), copied there in the forward and back in the backward, so the device holds
# none of it (the 1M-token MEMO paper's and MaxText's offloaded remat; a GPU / TPU moves the
# copies alongside compute, a CPU has no separate host memory and keeps them in place).
# Policies: jax.checkpoint_policies.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


@struct.dataclass
class ModelCache:
    """layers: one cache per layer; length: [] int32, tokens consumed so far (all sequences of
    the batch advance together)."""

    layers: tuple
    length: jax.Array
    max_len: int = struct.field(pytree_node=False, default=0)

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self.layers)


class Block(nnx.Module):
    def __init__(self, cfg, mixer_name: str, *, rngs: nnx.Rngs):
        self.mixer_name = mixer_name
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_mixer(cfg, mixer_name, rngs=rngs)
        # d_ff 0: a mixer-only block (Mamba-2's stack); no MLP parameters at all.
        has_mlp = cfg.resolved_d_ff > 0
        self.mlp_norm = nnx.data(RMSNorm(cfg.d_model, eps=cfg.norm_eps) if has_mlp else None)
        self.mlp = nnx.data(SwiGLU(
            cfg.d_model, cfg.resolved_d_ff, dtype=jnp.dtype(cfg.dtype), init_std=cfg.init_std,
            out_std=cfg.init_std / math.sqrt(2 * cfg.n_layers), rngs=rngs) if has_mlp else None)

    def __call__(self, x, *, positions, cache=None, segment_ids=None):
        """-> (x, cache, aux): aux is the mixer's auxiliary training loss (float32 scalar) when
        it has one (`mixer.aux_loss(mixer_input)`, e.g. MoM's router balance), else None."""
        h = self.mixer_norm(x)
        y, cache = self.mixer(h, positions=positions, cache=cache, segment_ids=segment_ids)
        # Recomputes what it needs (MoM: the router); under jit XLA shares it with the mixer's
        # own computation, and drops it where unused (decode). Packed rows: real tokens only.
        aux = None
        if isinstance(self.mixer, MixerWithAuxLoss):
            aux = self.mixer.aux_loss(h, segment_ids=segment_ids)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, cache, aux


class LM(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.max_len = cfg.max_len
        self.dtype = jnp.dtype(cfg.dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype,
                               param_dtype=jnp.float32,
                               embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
        self.blocks = nnx.List([Block(cfg, name, rngs=rngs) for name in cfg.layer_mixers()])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.d_model, cfg.vocab_size, use_bias=False, dtype=self.dtype,
            param_dtype=jnp.float32, kernel_init=nnx.initializers.normal(cfg.init_std),
            rngs=rngs)

    def init_cache(self, batch_size: int, max_len: int | None = None,
                   dtype=None) -> ModelCache:
        """An empty decode cache for `batch_size` sequences of up to `max_len` tokens (layers
        with a window or a recurrent state keep a fixed size whatever max_len is)."""
        max_len = max_len or self.max_len
        dtype = jnp.dtype(dtype) if dtype is not None else self.dtype
        layers = tuple(b.mixer.init_cache(batch_size, max_len, dtype) for b in self.blocks)
        return ModelCache(layers=layers, length=jnp.zeros((), jnp.int32), max_len=max_len)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 cache: ModelCache | None = None, return_aux: bool = False,
                 segment_ids: jax.Array | None = None, remat: str = "none"):
        """tokens [B, T] int -> (logits [B, T, V] float32, the updated cache), and with
        return_aux the sum of the layers' auxiliary losses as a third output (a float32 scalar,
        already weighted by their configs; None when no layer has one).

        segment_ids: optional [B, T] int ids of packed documents (0 = padding, documents
        numbered from 1 in each row; pallas_kernels/segments.py). Every layer then keeps its
        documents apart (attention masks, recurrent states and short convs restart at each
        document start), and positions default to in-document positions. Cache-free only:
        decoding runs one sequence per row.

        remat: a REMAT_POLICIES name; not "none": each block is rematerialized in the backward
        pass under that policy (training only: needs cache None). Values are the same.
        """
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        if remat != "none" and cache is not None:
            raise ValueError("remat is for training (cache=None); decoding keeps no activations")
        b, t = tokens.shape
        mesh = active_mesh()
        zigzag = (mesh is not None and cache is None and mesh.shape.get("sequence", 1) > 1
                  and active_sequence_layout() == "zigzag")
        if zigzag and positions is None:
            raise ValueError("a zigzag-laid-out batch needs its positions, computed before the "
                             "reordering (models/sharding.lay_out_batch adds them)")
        if segment_ids is not None:
            refuse_segments_with_cache("", segment_ids, cache)
            if segment_ids.shape != (b, t):
                raise ValueError(f"segment_ids must be [B, T] = {(b, t)}; got "
                                 f"{segment_ids.shape}")
            if positions is None:
                positions = document_positions(segment_ids)
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = start + jnp.arange(t, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions, (b, t)).astype(jnp.int32)
        # The residual stream [B, T, D] stays split over the batch axes of an active mesh
        # (models/sharding.py; a no-op without one).
        x = constrain(self.embed(tokens), RESIDUAL)
        new_layers, aux = [], []
        # A call with a cache (prefill, decode) is never differentiated: "auto" backends may
        # take their forward-only choice (pallas_kernels/backends.AUTO_FORWARD).
        # Without a cache, a mesh with a sequence axis shards every activation's time axis and
        # the mixers exchange what their slices need (pallas_kernels/context_parallel).
        sharded = contextlib.nullcontext()
        if mesh is not None and cache is None:
            sharded = shard_sequence(mesh, active_sequence_layout(),
                                     active_sequence_attention())
        with forward_only() if cache is not None else contextlib.nullcontext(), sharded:
            for i, block in enumerate(self.blocks):
                if remat != "none":
                    x, layer_cache, layer_aux = _remat_block(block, x, positions, segment_ids,
                                                             REMAT_POLICIES[remat])
                else:
                    x, layer_cache, layer_aux = block(
                        x, positions=positions,
                        cache=None if cache is None else cache.layers[i],
                        segment_ids=segment_ids)
                x = constrain(x, RESIDUAL)
                new_layers.append(layer_cache)
                if layer_aux is not None:
                    aux.append(layer_aux)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        if cache is not None:
            cache = cache.replace(layers=tuple(new_layers), length=cache.length + t)
        if return_aux:
            return logits.astype(jnp.float32), cache, (sum(aux) if aux else None)
        return logits.astype(jnp.float32), cache


def _remat_block(block, x, positions, segment_ids, policy):
    """block(x) under jax.checkpoint with `policy` (nnx.remat lifts the block's variables)."""
    def run(block, x, positions, segment_ids):
        return block(x, positions=positions, segment_ids=segment_ids)

    return nnx.remat(run, policy=policy)(block, x, positions, segment_ids)


def build_model(model_cfg, seed: int = 0) -> LM:
    """A freshly initialized LM for a validated ModelConfig."""
    return LM(model_cfg, rngs=nnx.Rngs(params=seed))


def lm_loss_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """(sum of masked cross-entropy, number of correct masked argmaxes, number of masked
    tokens), all float32: the pieces of lm_loss that add up over micro-batches."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets) * mask
    return ((logz - gold) * mask).sum(), correct.sum(), mask.sum()


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Masked mean cross-entropy (float32) and the masked token accuracy."""
    ce, correct, count = lm_loss_sums(logits, targets, mask)
    denom = jnp.maximum(count, 1.0)
    return ce / denom, correct / denom
