"""Config checks shared by the mixers' check_config: one line per problem, naming the key
(`model.mixer_args.<name>.<key>`) and what it may be."""

from __future__ import annotations


def head_errors(p: str, n_heads: int, *, n_kv_heads: int | None = None,
                head_dim: int | None = None, width: int | None = None,
                width_name: str | None = None, null_ok: bool = False,
                hint: str = "") -> list[str]:
    """Problems with a mixer's head layout.

    p: the mixer's key prefix, e.g. "model.mixer_args.gla".
    n_heads, n_kv_heads: the resolved head counts (n_kv_heads None: no separate key/value
        heads); each must be > 0 (null_ok: the message offers null, the model's count), and
        n_kv_heads must divide n_heads.
    head_dim: the mixer's own head_dim setting (None: derived from the width); must be > 0.
    width: the width the heads split (None: no split to check); n_heads must divide it unless
        head_dim is set. width_name: how the message names it (default model.d_model=<width>);
        hint: appended to that message (e.g. how else to fix it).
    """
    allowed = "> 0 or null" if null_ok else "> 0"
    errs = [f"{p}.{key} must be {allowed}, got {n}"
            for key, n in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads))
            if n is not None and n <= 0]
    if head_dim is not None and head_dim <= 0:
        errs.append(f"{p}.head_dim must be {allowed}, got {head_dim}")
    if errs:
        return errs
    if width is not None and head_dim is None and width % n_heads:
        errs.append(f"{p}.n_heads={n_heads} does not divide "
                    f"{width_name or f'model.d_model={width}'}{hint}")
    if n_kv_heads is not None and n_heads % n_kv_heads:
        errs.append(f"{p}.n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
    return errs


def rope_errors(p: str, head_dim: int, how: str = "", hint: str = "") -> list[str]:
    """RoPE rotates pairs of channels: head_dim must be even. how: how head_dim came about
    (shown as `got <how> = <head_dim>`); hint: appended (how to fix it)."""
    if head_dim % 2 == 0:
        return []
    got = f"{how} = {head_dim}" if how else f"{head_dim}"
    return [f"{p}: RoPE needs an even head dim, got {got}{hint}"]


def min_errors(p: str, args, *keys: str, low: int = 1) -> list[str]:
    """Each args.<key> must be >= low."""
    return [f"{p}.{key} must be >= {low}, got {getattr(args, key)}"
            for key in keys if getattr(args, key) < low]
