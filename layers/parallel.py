"""Hybrid heads: several mixers side by side inside one layer, on the same normalised input.

Shape legend: B batch, T new tokens, D model width, M branches.

Falcon-H1 (2025, "Falcon-H1: A Family of Hybrid-Head Language Models") and Hymba (Dong et al.
2024, arXiv:2411.13676) run attention heads and SSM heads in parallel inside one block rather
than in alternating layers (`model.mixers` alternates). The form here is one more mixer,
`parallel`, so it composes with the cyclic pattern like any other:

    model:
      mixers: [parallel, gated_deltanet]          # layer 0 hybrid heads, layer 1 GDN, ...
      mixer_args:
        parallel: {branches: [swa, mamba2], combine: sum}
        swa: {window: 512}                        # each branch keeps its own settings
        mamba2: {expand: 1}

combine:
  "sum"        Falcon-H1: the branches' head groups concatenated, then one output projection.
               Every branch already ends in its own projection onto D, and a projection of a
               concatenation is the sum of the projections of its parts, so this is the sum
               of the branch outputs (W [o_1; o_2] = W_1 o_1 + W_2 o_2).
  "mean_norm"  Hymba: each branch output RMS-normalised with its own learned scale, then the
               mean over branches (the branches' magnitudes differ a lot, attention's vs an
               SSM's, and the norms put them on one scale).

Each branch sees the block's input x [B, T, D] and returns [B, T, D]; the cache is the tuple of
the branches' caches (each as its mixer defines it), so prefill, steps and packed documents
work as they do for each branch. One `parallel` setting per model (mixer_args are per name);
a branch may be any registered mixer but `parallel` itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from layers.cache import CacheBytes
from layers.norm import RMSNorm

Combine = Literal["sum", "mean_norm"]


@dataclasses.dataclass(frozen=True)
class ParallelArgs:
    branches: tuple[str, ...] = ("swa", "mamba2")   # registered mixer names, run side by side
    combine: Combine = "sum"                        # "sum" (Falcon-H1) | "mean_norm" (Hymba)


@struct.dataclass
class ParallelCache(CacheBytes):
    """branches: each branch's own decode cache, in ParallelArgs.branches order."""

    branches: tuple[Any, ...]


class Parallel(nnx.Module):
    """Hybrid-head mixer. `y, cache = layer(x, positions=pos, cache=cache)`: x [B, T, D] ->
    y [B, T, D], the branches combined as ParallelArgs.combine says."""

    Args = ParallelArgs

    def __init__(self, cfg, args: ParallelArgs, *, rngs: nnx.Rngs):
        from layers.registry import build_mixer  # the registry imports this module

        self.names = tuple(args.branches)
        self.combine = args.combine
        self.branches = nnx.List([build_mixer(cfg, name, rngs=rngs) for name in self.names])
        self.norms = (nnx.List([RMSNorm(cfg.d_model, eps=cfg.norm_eps) for _ in self.names])
                      if args.combine == "mean_norm" else None)

    @staticmethod
    def check_config(cfg, args: ParallelArgs, name: str) -> list[str]:
        """Problems with these settings, one line each (empty when fine); each branch's own
        settings are checked by its mixer."""
        from layers.registry import MIXERS, branch_args

        p = f"model.mixer_args.{name}"
        if len(args.branches) < 2:
            return [f"{p}.branches: give at least two mixers to run side by side; got "
                    f"{list(args.branches)}"]
        errs = []
        for i, branch in enumerate(args.branches):
            if branch == name or MIXERS.get(branch) is not None and MIXERS[branch].cls is Parallel:
                errs.append(f"{p}.branches[{i}]: '{branch}' cannot be a branch of itself")
            elif branch not in MIXERS:
                errs.append(f"{p}.branches[{i}]: unknown mixer '{branch}' (available: "
                            f"{', '.join(sorted(n for n in MIXERS if n != name))})")
            elif hasattr(MIXERS[branch].cls, "aux_loss"):
                errs.append(f"{p}.branches[{i}]: '{branch}' has an auxiliary training loss, "
                            "which parallel does not carry yet; use it as a layer of its own")
            else:
                errs += MIXERS[branch].cls.check_config(cfg, branch_args(cfg, branch), branch)
        if len(set(args.branches)) != len(args.branches):
            errs.append(f"{p}.branches: a mixer appears twice in {list(args.branches)} (the "
                        "copies would share one setting; give each branch a different mixer)")
        return errs

    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> ParallelCache:
        return ParallelCache(branches=tuple(m.init_cache(batch_size, max_len, dtype)
                                            for m in self.branches))

    def __call__(self, x: jax.Array, *, positions: jax.Array,
                 cache: ParallelCache | None = None, segment_ids: jax.Array | None = None
                 ) -> tuple[jax.Array, ParallelCache | None]:
        caches = (None,) * len(self.names) if cache is None else cache.branches
        outs, new = [], []
        for m, c in zip(self.branches, caches, strict=True):
            y, c = m(x, positions=positions, cache=c, segment_ids=segment_ids)
            outs.append(y)
            new.append(c)
        if self.combine == "sum":
            y = sum(o.astype(jnp.float32) for o in outs)
        else:
            y = sum(n(o).astype(jnp.float32) for n, o in zip(self.norms, outs, strict=True))
            y = y / len(outs)
        return y.astype(x.dtype), (None if cache is None else ParallelCache(tuple(new)))
