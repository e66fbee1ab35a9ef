"""Time the Mixture-of-Memories layer as the number of memories M grows (top-k fixed): the packed
(sorted-by-memory) path against the masked reference, forward and forward+backward, with a
Gated DeltaNet layer of the same per-memory state as the baseline (ratios are what to read; this
machine is noisy).

    python benchmarks/mom.py                          # B=1 T=2048 D=256 H=4, M in 2 4 8 16, k=2
    python benchmarks/mom.py --T 512 --repeats 2      # quicker
    python benchmarks/mom.py --M 4 16 --dispatch packed --out /tmp/mom_bench

Prints a markdown table and saves it with the raw numbers (JSON) under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import time_jax  # noqa: E402

from layers.delta_net import DeltaNet, DeltaNetArgs  # noqa: E402
from layers.mom import MoM, MoMArgs, packed_length  # noqa: E402
from models.config_check import load_config  # noqa: E402

HEADER = ("| layer | M | k | op slots / T | fwd ms | fwd+bwd ms | fwd vs GDN | fwd+bwd vs GDN |"
          "\n|---|---|---|---|---|---|---|---|")


def measure(layer, x, repeats: int, **call_kw) -> tuple[float, float]:
    """(forward, forward+backward) median seconds of `layer` on x (grads of params and x)."""
    graphdef, params = nnx.split(layer, nnx.Param)
    pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])

    def forward(p, x):
        return nnx.merge(graphdef, p)(x, positions=pos, **call_kw)[0]

    def loss(p, x):
        return jnp.sum(forward(p, x).astype(jnp.float32) ** 2)

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return (time_jax(fwd, params, x, repeats=repeats),
            time_jax(fwd_bwd, params, x, repeats=repeats))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--M", nargs="+", type=int, default=[2, 4, 8, 16])
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--dispatch", nargs="+", default=["packed", "masked"],
                   choices=["packed", "masked"])
    p.add_argument("--no_shared", action="store_true", help="without the shared memory")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--D", type=int, default=256, help="model width")
    p.add_argument("--H", type=int, default=4, help="heads (K = V = D / H)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--chunk_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = load_config(None, [f"model.d_model={a.D}", f"model.n_heads={a.H}",
                             f"model.dtype={a.dtype}", f"model.max_len={a.T}"]).model
    x = jax.random.normal(jax.random.key(0), (a.B, a.T, a.D)).astype(a.dtype)
    shared = not a.no_shared
    print(f"device {jax.devices()[0].device_kind} ({platform.machine()}), B={a.B} T={a.T} "
          f"D={a.D} H={a.H} K=V={a.D // a.H} {a.dtype}, chunk {a.chunk_size}, shared memory "
          f"{'on' if shared else 'off'}, median of {a.repeats}\n{HEADER}", flush=True)

    gdn = DeltaNet(cfg, DeltaNetArgs(gated=True, chunk_size=a.chunk_size), rngs=nnx.Rngs(0))
    base_f, base_fb = measure(gdn, x, a.repeats)
    rows = [{"layer": "gated_deltanet", "M": 1, "k": 1, "slots": a.T, "fwd_s": base_f,
             "fwd_bwd_s": base_fb}]
    print(_line(rows[0], rows[0], a.T), flush=True)
    for m in a.M:
        layer = MoM(cfg, MoMArgs(num_memories=m, top_k=a.k, shared_memory=shared,
                                 chunk_size=a.chunk_size), rngs=nnx.Rngs(0))
        n_states, n_assign = m + shared, a.k + shared
        for dispatch in a.dispatch:
            slots = (packed_length(a.T, n_assign, n_states, a.chunk_size, 0)
                     if dispatch == "packed" else n_states * a.T)
            f, fb = measure(layer, x, a.repeats, dispatch=dispatch)
            rows.append({"layer": f"mom {dispatch}", "M": m, "k": a.k, "slots": slots,
                         "fwd_s": f, "fwd_bwd_s": fb})
            print(_line(rows[-1], rows[0], a.T), flush=True)
    lines = [_line(r, rows[0], a.T) for r in rows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"mom_{jax.devices()[0].platform}"
    for r in rows:
        r.update(B=a.B, T=a.T, D=a.D, H=a.H, dtype=a.dtype, shared_memory=shared)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out / f"{stem}.md").write_text(
        f"B={a.B} T={a.T} D={a.D} H={a.H} K=V={a.D // a.H} {a.dtype}, chunk {a.chunk_size}, "
        f"shared memory {'on' if shared else 'off'}, median of {a.repeats} "
        f"(`python benchmarks/mom.py {' '.join(argv)}`)\n\n" + HEADER + "\n"
        + "\n".join(lines) + "\n")
    print(f"saved {out / stem}.md and .json")
    return 0


def _line(r: dict, base: dict, t: int) -> str:
    return (f"| {r['layer']} | {r['M']} | {r['k']} | {r['slots'] / t:.2f} | "
            f"{r['fwd_s'] * 1e3:.1f} | {r['fwd_bwd_s'] * 1e3:.1f} | "
            f"{r['fwd_s'] / base['fwd_s']:.2f}x | {r['fwd_bwd_s'] / base['fwd_bwd_s']:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
