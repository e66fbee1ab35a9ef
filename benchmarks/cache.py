"""Decode cache size and per-token decode latency of the softmax-attention family at one width:
MHA, GQA, MLA (latent cache, absorbed decode) and CCA / CCGQA (compressed latent attention).

    python benchmarks/cache.py                          # d_model 512, 8 heads, context 1k 4k 16k
    python benchmarks/cache.py --context 1024 4096      # quicker
    python benchmarks/cache.py --d_model 1024 --n_heads 16 --batch 8 --context 4096 16384 65536

For each mixer (one layer, bf16 cache, batch --batch): the cache is filled by a chunked prefill
of `context` tokens through the layer itself, then single-token decode steps are timed (jitted,
cache buffers donated so each step updates in place, as the decode loop of generate.py does).
Reported: cache bytes per token per layer (the marginal cost: (bytes at L2 - bytes at L1) /
(L2 - L1), so the constant parts such as conv tails drop out; it counts the int32 position
stored with each slot), the values each token costs, and median step latency at each context.
Prints a markdown table, saves it with JSON and a PNG plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from layers.registry import build_mixer  # noqa: E402
from models.config_check import load_config  # noqa: E402


def entries(d_model: int, n_heads: int) -> dict[str, tuple[str, dict]]:
    """name -> (registered mixer, mixer_args overrides), all at width d_model with n_heads.

    GQA and CCGQA share keys/values over 4 query heads; MLA's latent is 2 head dims wide plus a
    half-head RoPE key (DeepSeek-V3 ratio: 512 + 64 against 128-wide heads); CCA compresses the
    latent by 4 (Zyphra's reported 4-8x range).
    """
    head = d_model // n_heads
    kv = max(1, n_heads // 4)
    return {
        "MHA": ("attn", {"n_kv_heads": n_heads}),
        f"GQA ({n_heads}:{kv})": ("attn", {"n_kv_heads": kv}),
        "MLA": ("mla", {"kv_lora_rank": 2 * head, "qk_rope_head_dim": head // 2,
                        "qk_nope_head_dim": head, "v_head_dim": head, "q_lora_rank": 0}),
        "CCA (C=4)": ("cca", {"compression": 4}),
        "CCGQA (C=4)": ("ccgqa", {"compression": 4, "n_kv_heads": kv}),
    }


def build(name: str, overrides: dict, d_model: int, n_heads: int, max_len: int):
    args = [f"model.{k}={v}" for k, v in dict(d_model=d_model, n_heads=n_heads,
                                               max_len=max_len, dtype="bfloat16").items()]
    args += [f"model.mixer_args.{name}.{k}={'null' if v is None else v}"
             for k, v in overrides.items()]
    args.append(f"model.mixers=[{name}]")
    cfg = load_config(None, args).model
    return build_mixer(cfg, name, rngs=nnx.Rngs(0))


def measure(mixer, d: int, batch: int, context: int, steps: int, prefill_chunk: int) -> dict:
    graphdef, state = nnx.split(mixer)
    call = lambda st, x, pos, c: nnx.merge(graphdef, st)(x, positions=pos, cache=c)  # noqa: E731
    prefill = jax.jit(call, donate_argnums=(3,))
    step = jax.jit(call, donate_argnums=(3,))
    rng = np.random.default_rng(0)
    cache = mixer.init_cache(batch, context + steps + 1, jnp.bfloat16)
    start = 0
    while start < context:   # chunked prefill: the cache holds `context` real tokens
        size = min(prefill_chunk, context - start)
        x = jnp.asarray(rng.standard_normal((batch, size, d)), jnp.bfloat16)
        pos = jnp.broadcast_to(jnp.arange(start, start + size, dtype=jnp.int32), (batch, size))
        _, cache = prefill(state, x, pos, cache)
        start += size
    x1 = jnp.asarray(rng.standard_normal((batch, 1, d)), jnp.bfloat16)
    times = []
    for i in range(steps + 2):   # two warm-up steps (the first compiles)
        pos = jnp.full((batch, 1), context + i, jnp.int32)
        t0 = time.perf_counter()
        y, cache = step(state, x1, pos, cache)
        y.block_until_ready()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"step_ms": 1e3 * statistics.median(times), "cache_bytes": int(cache.nbytes)}


def bytes_per_token(mixer, batch: int) -> float:
    lo, hi = 1024, 2048
    small = jax.eval_shape(lambda: mixer.init_cache(batch, lo, jnp.bfloat16))
    large = jax.eval_shape(lambda: mixer.init_cache(batch, hi, jnp.bfloat16))
    size = lambda c: sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(c))  # noqa: E731
    return (size(large) - size(small)) / (hi - lo) / batch


def plot(rows, contexts, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["mixer"] for r in rows]
    ax0.bar(names, [r["bytes_per_token"] for r in rows], color="tab:blue")
    ax0.set_ylabel("cache bytes / token / layer (bf16)")
    ax0.tick_params(axis="x", rotation=20)
    for r in rows:
        ax1.plot(contexts, [r["step_ms"][str(c)] for c in contexts], marker="o", label=r["mixer"])
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context (tokens)")
    ax1.set_ylabel("decode step (ms), one layer")
    ax1.legend()
    fig.suptitle(f"decode cache and latency ({jax.default_backend()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--n_heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per point")
    p.add_argument("--prefill_chunk", type=int, default=1024)
    p.add_argument("--mixers", nargs="+", default=None, help="subset of the table's names")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)

    table = entries(a.d_model, a.n_heads)
    unknown = set(a.mixers or []) - set(table)
    if unknown:
        p.error(f"unknown --mixers {sorted(unknown)}; choose from {list(table)}")
    rows = []
    for label, (name, overrides) in table.items():
        if a.mixers and label not in a.mixers:
            continue
        mixer = build(name, overrides, a.d_model, a.n_heads, max(a.context) + a.steps + 8)
        row = {"mixer": label, "name": name, "args": overrides,
               "bytes_per_token": bytes_per_token(mixer, a.batch), "step_ms": {},
               "cache_bytes": {}}
        for ctx in a.context:
            m = measure(mixer, a.d_model, a.batch, ctx, a.steps, a.prefill_chunk)
            row["step_ms"][str(ctx)] = m["step_ms"]
            row["cache_bytes"][str(ctx)] = m["cache_bytes"]
            print(f"{label:14s} ctx {ctx:6d}: {m['step_ms']:8.3f} ms/step, "
                  f"cache {m['cache_bytes'] / 2**20:8.2f} MiB", flush=True)
        rows.append(row)

    mha = rows[0]["bytes_per_token"] if rows and rows[0]["mixer"] == "MHA" else None
    head = (f"d_model {a.d_model}, {a.n_heads} heads, batch {a.batch}, bf16 cache, one layer, "
            f"{jax.default_backend()} ({platform.machine()}), median of {a.steps} steps "
            f"(`python benchmarks/cache.py {' '.join(argv or sys.argv[1:])}`)")
    cols = "".join(f" step ms @{c} |" for c in a.context)
    lines = [head, "", f"| mixer | bytes/token/layer | MHA bytes / these |{cols}",
             "|---|---|---|" + "---|" * len(a.context)]
    for r in rows:
        ratio = f"{mha / r['bytes_per_token']:.1f}x" if mha else "-"
        steps = "".join(f" {r['step_ms'][str(c)]:.3f} |" for c in a.context)
        lines.append(f"| {r['mixer']} | {r['bytes_per_token']:.0f} | {ratio} |{steps}")
    print("\n".join(lines))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cache_{jax.default_backend()}"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=1))
    plot(rows, a.context, out / f"{stem}.png")
    print(f"saved {out / stem}.md/.json/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
