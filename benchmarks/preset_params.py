"""Parameter counts and decode-cache sizes of configs/presets/ (shapes only: jax.eval_shape,
nothing allocated; runs in ~15 s on a CPU).

    python benchmarks/preset_params.py               # all presets
    python benchmarks/preset_params.py --context 8192

Columns: total parameters; of them the (untied) embedding and output head; per block, the
token mixer's and the SwiGLU MLP's parameters (a hybrid's mixer column is the mean over its
pattern); the decode cache of one sequence at --context tokens (bfloat16 caches, float32
recurrent states, as models/generation.py allocates them; the presets' max_len is 4096).
The presets match Transformer++'s count at each scale by depth (tests/test_presets.py).
Saves benchmarks/results/preset_params.{md,json}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import ROOT, save_results  # noqa: E402
from flax import nnx  # noqa: E402

from models.config_check import load_config  # noqa: E402
from models.lm import build_model  # noqa: E402


def _size(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def describe(path: Path, context: int) -> dict:
    cfg = load_config(path, [f"model.max_len={max(context, 4096)}"]).model
    model = nnx.eval_shape(lambda: build_model(cfg))
    params = nnx.state(model, nnx.Param)
    total = _size(params)
    embed = _size(nnx.state(model.embed, nnx.Param)) + (
        0 if cfg.tie_embeddings else _size(nnx.state(model.head, nnx.Param)))
    mixer = sum(_size(nnx.state(b.mixer, nnx.Param)) for b in model.blocks) / cfg.n_layers
    mlp = sum(_size(nnx.state(b.mlp, nnx.Param)) for b in model.blocks
              if b.mlp is not None) / cfg.n_layers
    # Built again inside eval_shape: some caches start from parameters (Titans MAG prefills its
    # persistent tokens), which the abstract `model` above cannot give values to.
    cache = jax.eval_shape(lambda: build_model(cfg).init_cache(1, context, jnp.bfloat16))
    return {"preset": path.stem, "mixers": list(cfg.mixers), "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "params": total,
            "embedding": embed, "mixer_per_block": mixer, "mlp_per_block": mlp,
            "cache_bytes": int(cache.nbytes), "context": context}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=4096, help="tokens in the decode cache")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    rows = [describe(path, args.context)
            for path in sorted((ROOT / "configs" / "presets").glob("*.yaml"),
                               key=lambda q: (q.stem.rsplit("_", 1)[1], q.stem))]
    lines = [f"| preset | mixers | d x layers | params | embed + head | mixer / block "
             f"| MLP / block | cache at {args.context} |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {', '.join(r['mixers'])} | {r['d_model']} x "
                     f"{r['n_layers']} | {r['params'] / 1e6:.1f}M | {r['embedding'] / 1e6:.1f}M "
                     f"| {r['mixer_per_block'] / 1e6:.2f}M | {r['mlp_per_block'] / 1e6:.2f}M "
                     f"| {r['cache_bytes'] / 2**20:.1f} MiB |")
    save_results(args.out, "preset_params", lines, {"settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
