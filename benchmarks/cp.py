"""Context parallelism: per mixer, a train step's compiled temp memory per device and its time
against the number of sequence shards N, at a fixed total T (strong scaling) and at a fixed
T / N (weak scaling), on simulated CPU devices.

    python benchmarks/cp.py                      # gla, gated_deltanet, mamba2, attn; N 1 2 4 8
    python benchmarks/cp.py --mixers gla gated_deltanet mamba2 attn swa   # + a window (halos)
    python benchmarks/cp.py --mixers kda --T 4096 --shards 1 2 4
    python benchmarks/cp.py --mixers attn --layout zigzag --attention ring
    python benchmarks/cp.py --mixers titans titans_mag titans_mac --heads 8 --layout zigzag \
        --tag titans                             # head split (H % N == 0) and MAC's pipeline

Each row compiles the loss-and-gradient step of a small float32 LM (--layers layers of one
mixer, d_model --d_model, packed rows of four documents) with mesh (1, 1, N, 1) and reads
`compiled.memory_analysis().temp_size_in_bytes`, which is per device (an SPMD program is one
device's). Time: the median of --repeats steps; the N simulated devices share this machine's
cores, so time does not fall with N here: it shows what the exchanges cost, not a speed-up
(that needs N real devices). Writes benchmarks/results/cp_cpu.{md,json} (another --layout or
--attention: cp_cpu_<layout>_<attention>.{md,json}).
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from models.config_check import load_config  # noqa: E402
from models.lm import build_model, lm_loss  # noqa: E402
from models.sharding import batch_sharding, lay_out_batch, make_mesh, use_mesh  # noqa: E402


def step_fn(graphdef):
    def loss(params, tokens, targets, mask, seg, positions=None):
        logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids=seg, positions=positions)
        return lm_loss(logits, targets, mask)[0]

    return jax.jit(jax.value_and_grad(loss))


def measure(a, mixer: str, t: int, n: int) -> dict:
    cfg = load_config(None, [f"model.d_model={a.d_model}", f"model.n_heads={a.heads}",
                             f"model.n_layers={a.layers}", f"model.mixers=[{mixer}]",
                             "model.dtype=float32", "model.vocab_size=256",
                             f"model.max_len={t}", f"data.seq_len={t}", "mesh.data=1",
                             f"mesh.sequence={n}"])
    graphdef, params = nnx.split(build_model(cfg.model, seed=0))
    mesh = make_mesh(cfg.mesh, jax.devices()[:n])
    rng = np.random.default_rng(0)
    seg = np.repeat(np.arange(1, 5), t // 4)[None].repeat(a.batch, 0)      # 4 documents
    host = lay_out_batch({"tokens": rng.integers(0, 256, (a.batch, t)).astype(np.int32),
                          "targets": rng.integers(0, 256, (a.batch, t)).astype(np.int32),
                          "mask": np.ones((a.batch, t), np.float32),
                          "segment_ids": seg.astype(np.int32)}, mesh, a.layout)
    batch = [jax.device_put(jnp.asarray(host[k]), batch_sharding(mesh))
             for k in ("tokens", "targets", "mask", "segment_ids", "positions") if k in host]
    params = jax.device_put(params, NamedSharding(mesh, P()))
    fn = step_fn(graphdef)
    with use_mesh(mesh, a.layout, a.attention):
        compiled = fn.trace(params, *batch).lower().compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, *batch))
    times = []
    for _ in range(a.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, *batch))
        times.append(time.perf_counter() - start)
    row = {"mixer": mixer, "T": t, "N": n, "temp_MiB": mem.temp_size_in_bytes / 2 ** 20,
           "ms": 1e3 * statistics.median(times)}
    print(f"  {mixer:15s} T={t:6d} N={n}: temp {row['temp_MiB']:8.2f} MiB/device, "
          f"{row['ms']:8.1f} ms", flush=True)
    return row


def table(rows, kind: str) -> list[str]:
    lines = ["| mixer | T | N | temp MiB / device | x N=1 | step ms |",
             "|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        if r["N"] == 1:
            base[r["mixer"]] = r["temp_MiB"]
        ratio = r["temp_MiB"] / base[r["mixer"]] if base.get(r["mixer"]) else float("nan")
        lines.append(f"| {r['mixer']} | {r['T']} | {r['N']} | {r['temp_MiB']:.2f} | "
                     f"{ratio:.2f} | {r['ms']:.1f} |")
    return [f"{kind}:", "", *lines, ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mixers", nargs="+", default=["gla", "gated_deltanet", "mamba2", "attn"])
    p.add_argument("--T", type=int, default=2048, help="total T (strong scaling)")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4,
                   help="model.n_heads (Titans' head split needs N to divide it)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_weak", action="store_true")
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous")
    p.add_argument("--attention", choices=["all_gather", "ring"], default="all_gather",
                   help="softmax attention's exchange")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None,
                   help="the results' file suffix (default: the layout and attention, when "
                        "not contiguous and all_gather)")
    a = p.parse_args(argv)
    print(f"devices: {len(jax.devices())} simulated CPU", flush=True)
    strong = [measure(a, m, a.T, n) for m in a.mixers for n in a.shards]
    per_shard = a.T // max(a.shards)
    weak = [] if a.skip_weak else [measure(a, m, per_shard * n, n)
                                   for m in a.mixers for n in a.shards]
    text = "\n".join([
        f"Context parallelism on {len(jax.devices())} simulated CPU devices (`python "
        f"benchmarks/cp.py {' '.join(argv or sys.argv[1:])}`): {a.layers}-layer float32 LM, "
        f"d_model {a.d_model}, {a.heads} heads, batch {a.batch}, 4 packed documents per row, "
        f"{a.layout} layout, "
        f"attention by {a.attention}, loss + gradients; temp = compiled temp bytes per device; "
        "time on shared cores (no speed-up expected here).", "",
        *table(strong, f"Strong scaling (T = {a.T})"),
        *([] if a.skip_weak else table(weak, f"Weak scaling (T / N = {per_shard})"))])
    print("\n" + text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # Another layout or attention exchange: a file of its own beside the default's.
    tag = "" if (a.layout, a.attention) == ("contiguous", "all_gather") \
        else f"_{a.layout}_{a.attention}"
    tag = f"_{a.tag}" if a.tag else tag
    stem = out / f"cp_cpu{tag}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"strong": strong, "weak": weak,
                                                     "settings": vars(a)}, indent=1))
    print(f"saved {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
