"""What every decode cache shares: it is an immutable pytree that reports its own size."""

from __future__ import annotations

import jax


def refuse_segments_with_cache(where: str, segment_ids, cache) -> None:
    """Packed documents (segment_ids) are for the cache-free call: decoding runs one sequence
    per row. ValueError naming `where` when both are given."""
    if segment_ids is not None and cache is not None:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}segment_ids are for the cache-free call (packed training "
                         "rows); decoding runs one sequence per row")


def tree_nbytes(tree) -> int:
    """Bytes held by the array leaves of a pytree (static: uses shapes and dtypes only)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "dtype")))


class CacheBytes:
    """Mixin for cache dataclasses: `cache.nbytes` is the memory the cache holds."""

    @property
    def nbytes(self) -> int:
        return tree_nbytes(self)
