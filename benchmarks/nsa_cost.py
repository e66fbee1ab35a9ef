"""NSA against full attention: how the cost of one layer's forward+backward grows with T.

    python benchmarks/nsa_cost.py                               # FLOPs 4k..64k, CPU time 1k..8k
    python benchmarks/nsa_cost.py --flops_T 4096 8192 --time_T 1024 --rounds 3

Two tables, each NSA (layers/nsa.py, the gathered XLA form) beside softmax attention (layers/
attention.py, the dense XLA form) at the same heads (GQA) and width:
  * compiled FLOPs of forward+backward (`cost_analysis` of the lowered program: nothing runs,
    so 64k fits a CPU): NSA's selected and window branches grow with T (n l' + w keys per
    query), its compressed branch with T^2 / d, attention's with T^2. The NSA program is
    lowered with one query chunk of T (a lax.map's body is counted once by cost_analysis).
  * CPU time of forward+backward, side by side in shuffled rounds (ratios are what to read),
    and the T where NSA starts to win.
Saves benchmarks/results/nsa_cost_<platform>.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import ROOT, save_results, time_side_by_side  # noqa: E402
from flax import nnx  # noqa: E402

from layers.attention import Attention, AttentionArgs  # noqa: E402
from layers.nsa import NSA, NSAArgs  # noqa: E402
from models.config_check import load_config  # noqa: E402


def model_cfg(a, t):
    return load_config(None, [f"model.d_model={a.d_model}", f"model.n_heads={a.heads}",
                              f"model.n_kv_heads={a.kv_heads}", f"model.max_len={t}",
                              "model.dtype=float32", "data.seq_len=64"]).model


def layers(a, t, query_chunk):
    cfg = model_cfg(a, t)
    nsa = NSA(cfg, NSAArgs(cmp_block=a.cmp_block, cmp_stride=a.cmp_stride,
                           block_size=a.block_size, block_count=a.block_count, window=a.window,
                           query_chunk=query_chunk, backend="xla"), rngs=nnx.Rngs(0))
    attn = Attention(cfg, AttentionArgs(backend="xla"), rngs=nnx.Rngs(0))
    return {"nsa": nsa, "attention": attn}


def loss_fn(layer):
    graphdef, params = nnx.split(layer)

    def loss(params, x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        y, _ = nnx.merge(graphdef, params)(x, positions=pos)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss)), params


def flops_rows(a):
    rows = []
    for t in a.flops_T:
        x = jax.ShapeDtypeStruct((1, t, a.d_model), jnp.float32)
        row = {"T": t}
        for name, layer in layers(a, t, query_chunk=t).items():
            f, params = loss_fn(layer)
            cost = f.lower(params, x).cost_analysis()
            row[f"{name}_flops"] = float(cost["flops"])
        rows.append(row)
        print(row, flush=True)
    return rows


def time_rows(a):
    rows = []
    for t in a.time_T:
        x = jax.random.normal(jax.random.key(0), (1, t, a.d_model))
        calls = {}
        for name, layer in layers(a, t, query_chunk=a.query_chunk).items():
            f, params = loss_fn(layer)
            calls[name] = lambda f=f, params=params, x=x: f(params, x)
        times = time_side_by_side(calls, rounds=a.rounds)
        rows.append({"T": t, **{f"{k}_s": v for k, v in times.items()}})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flops_T", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--time_T", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--cmp_block", type=int, default=32)
    p.add_argument("--cmp_stride", type=int, default=16)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--block_count", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--query_chunk", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    flops = flops_rows(a) if a.flops_T else []
    times = time_rows(a) if a.time_T else []
    settings = (f"d_model {a.d_model}, {a.heads} query heads over {a.kv_heads} key/value heads "
                f"(head dim {a.d_model // a.heads}), batch 1, float32; NSA l={a.cmp_block} "
                f"d={a.cmp_stride} l'={a.block_size} n={a.block_count} w={a.window}")
    lines = [f"NSA vs softmax attention, one layer's forward+backward: {settings} "
             f"(`python benchmarks/nsa_cost.py{' ' + ' '.join(argv or sys.argv[1:])}`)", ""]
    if flops:
        lines += ["Compiled FLOPs (cost_analysis of the lowered program):", "",
                  "| T | NSA GFLOP | attention GFLOP | NSA / attention | NSA growth vs previous T "
                  "| attention growth |", "|---|---|---|---|---|---|"]
        prev = None
        for r in flops:
            grow = ("" if prev is None else
                    f"{r['nsa_flops'] / prev['nsa_flops']:.2f}x")
            grow_a = ("" if prev is None else
                      f"{r['attention_flops'] / prev['attention_flops']:.2f}x")
            lines.append(f"| {r['T']} | {r['nsa_flops'] / 1e9:.1f} | "
                         f"{r['attention_flops'] / 1e9:.1f} | "
                         f"{r['nsa_flops'] / r['attention_flops']:.3f} | {grow} | {grow_a} |")
            prev = r
        lines.append("")
    if times:
        lines += [f"{jax.devices()[0].platform} time, median of {a.rounds} shuffled rounds "
                  f"(query chunk {a.query_chunk}):", "",
                  "| T | NSA ms | attention ms | NSA / attention |", "|---|---|---|---|"]
        for r in times:
            lines.append(f"| {r['T']} | {r['nsa_s'] * 1e3:.1f} | {r['attention_s'] * 1e3:.1f} "
                         f"| {r['nsa_s'] / r['attention_s']:.2f} |")
        wins = [r["T"] for r in times if r["nsa_s"] < r["attention_s"]]
        lines += ["", f"NSA faster from T = {wins[0]}" if wins else
                  "NSA not faster at any timed T"]
    save_results(a.out, f"nsa_cost_{jax.devices()[0].platform}", lines,
                 {"settings": dataclasses.asdict(a) if dataclasses.is_dataclass(a)
                  else vars(a), "flops": flops, "times": times})


if __name__ == "__main__":
    main()
