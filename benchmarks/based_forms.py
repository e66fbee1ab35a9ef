"""Time the two forms of a cache-free Based call side by side (layers/based.py): the quadratic
form (the causal T x T kernel 1 + s + s^2 / 2) against the Taylor features through the chunked
linear-attention op, forward + backward of one Based layer, by sequence length. Both forms are
compiled first and timed in interleaved rounds (best round), so the ratio is what to read.

    python benchmarks/based_forms.py                      # d_model 64, 4 heads, batch 16
    python benchmarks/based_forms.py --lens 256 1024 --batch 4 --d_model 256

Sets BasedArgs.quadratic_max_len's default: the longest T where the quadratic form is the
faster one and its T^2 scores stay small. Prints a markdown table and saves .md / .json under
--out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import save_results, settings_of  # noqa: E402

from layers.based import Based, BasedArgs  # noqa: E402
from models.config_check import load_config  # noqa: E402

FORMS = {"quadratic": 2 ** 31 - 1, "features": 0}   # -> BasedArgs.quadratic_max_len


def grad_fn(cfg, quadratic_max_len: int, feature_dim: int, x, pos):
    graphdef, params = nnx.split(Based(cfg, BasedArgs(feature_dim=feature_dim,
                                                      quadratic_max_len=quadratic_max_len),
                                       rngs=nnx.Rngs(0)))
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, positions=pos)[0]
                                .astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lens", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--feature_dim", type=int, default=16)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best is kept)")
    p.add_argument("--repeats", type=int, default=5, help="calls per round")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    if a.rounds < 1 or a.repeats < 1 or min(a.lens) < 1:
        raise SystemExit("error: --rounds, --repeats and every --lens value must be >= 1")
    rows = []
    for dtype in a.dtypes:
        cfg = load_config(None, [f"model.d_model={a.d_model}", f"model.n_heads={a.n_heads}",
                                 f"model.max_len={max(64, *a.lens)}", f"model.dtype={dtype}"]).model
        for t in a.lens:
            x = jax.random.normal(jax.random.key(0), (a.batch, t, a.d_model)).astype(dtype)
            pos = jnp.broadcast_to(jnp.arange(t), (a.batch, t))
            fns = {}
            for form, qmax in FORMS.items():
                fn, params = grad_fn(cfg, qmax, a.feature_dim, x, pos)
                jax.block_until_ready(fn(params, x))   # compile outside the timed rounds
                fns[form] = (fn, params)
            best = dict.fromkeys(FORMS, float("inf"))
            for _ in range(a.rounds):
                for form, (fn, params) in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(a.repeats):
                        out = fn(params, x)
                    jax.block_until_ready(out)
                    best[form] = min(best[form], (time.perf_counter() - t0) / a.repeats)
            rows.append({"dtype": dtype, "T": t, "quadratic_ms": best["quadratic"] * 1e3,
                         "features_ms": best["features"] * 1e3,
                         "features_over_quadratic": best["features"] / best["quadratic"]})
            print(f"{dtype} T {t}: quadratic {rows[-1]['quadratic_ms']:.2f} ms, features "
                  f"{rows[-1]['features_ms']:.2f} ms", flush=True)
    lines = [f"Based layer forward + backward, quadratic form vs Taylor features (chunked op): "
             f"batch {a.batch}, d_model {a.d_model}, {a.n_heads} heads, feature dim "
             f"{a.feature_dim}; best of {a.rounds} interleaved rounds x {a.repeats} calls; "
             f"{jax.default_backend()} ({platform.machine()}) "
             f"(`python benchmarks/based_forms.py {' '.join(argv or sys.argv[1:])}`)", "",
             "| dtype | T | quadratic ms | features ms | features / quadratic |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['T']} | {r['quadratic_ms']:.2f} | {r['features_ms']:.2f} | "
              f"{r['features_over_quadratic']:.2f}x |" for r in rows]
    save_results(a.out, f"based_forms_{jax.default_backend()}", lines,
                 {"settings": settings_of(a), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
