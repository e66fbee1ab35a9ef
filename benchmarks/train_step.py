"""Train-step tokens/s of one config, once per backend setting of its mixers: what "auto" picks
on this machine against named backends, on the training loop's own jitted step.

    python benchmarks/train_step.py configs/presets/gdn_swa_125m.yaml --seq_len 4096 \\
        --batch 2 --variants auto xla                              # GPU / TPU
    python benchmarks/train_step.py configs/quickstart.yaml --seq_len 128 --batch 2 \\
        --variants auto xla --repeats 2                            # CPU smoke run

A variant is "auto" (the config as written, backends "auto"), or a backend name given to every
mixer that has a `backend` setting and takes that name for its op ("xla", "jla",
"deltanet_tpu", "cudnn", "tokamax", ...; a mixer whose op does not take it keeps "auto"), or
NAME:KEY=VALUE,KEY=VALUE for dotted config overrides of your own. The table says what each
mixer's "auto" resolved to here (pallas_kernels/backends.py).

Timing: training.loop.make_train_step (forward, backward, AdamW update, state donated) on one
random batch of --batch x --seq_len tokens; two warm-up steps (the first compiles), then the
median of --repeats steps, each waited for; variants run in shuffled order within one process.
Prints a markdown table, saves .md and .json (benchmarks/results/train_step_<platform>.*).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# The op each mixer with a `backend` setting calls (for what "auto" resolves to).
MIXER_OP = {"attn": "attention", "swa": "attention", "gated_deltanet": "gated_delta_rule",
            "deltanet": "delta_rule", "gla": "gla", "mom": "gated_delta_rule",
            "based": "linear_attention", "titans": "titans_memory"}


def mixer_backends(cfg) -> dict[str, tuple[str, str]]:
    """{mixer: (op, backend setting)} for the mixers of cfg with a `backend` setting."""
    found = {}
    for name in dict.fromkeys(cfg.model.mixers):
        value = getattr(cfg.model.mixer_args.get(name), "backend", None)
        if value is not None and name in MIXER_OP:
            found[name] = (MIXER_OP[name], value)
    return found


def variant_overrides(variant: str, base_cfg) -> tuple[str, list[str]]:
    """(label, dotted overrides) of a --variants entry."""
    from pallas_kernels.backends import OP_BACKENDS

    if ":" in variant:
        label, pairs = variant.split(":", 1)
        return label, [p for p in pairs.split(",") if p]
    if variant == "auto":
        return "auto", []
    overrides = [f"model.mixer_args.{mixer}.backend={variant}"
                 for mixer, (op, _) in mixer_backends(base_cfg).items()
                 if variant in OP_BACKENDS[op]]
    if not overrides:
        raise SystemExit(f"variant {variant!r}: no mixer of this config takes that backend")
    return variant, overrides


def resolved(cfg) -> str:
    """'mixer: backend' for each mixer, "auto" resolved for this platform."""
    from pallas_kernels.backends import resolve_backend

    return ", ".join(f"{m}: {resolve_backend(op, b)}" for m, (op, b) in
                     mixer_backends(cfg).items())


def build_step(cfg, batch: int, seq_len: int):
    """(step(), the config) for one jitted train step on a fixed random batch."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from models.lm import build_model
    from training.loop import make_train_step
    from training.optim import make_optimizer

    model = build_model(cfg.model, seed=0)
    optimizer = make_optimizer(cfg.optim, 100)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    del model, state
    opt_state = optimizer.init(params)
    train_step, _ = make_train_step(graphdef, optimizer)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch, seq_len + 1),
                                               dtype=np.int32)
    data = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.ones((batch, seq_len), jnp.float32)}
    holder = {"params": params, "opt": opt_state}

    def step():
        holder["params"], holder["opt"], metrics = train_step(holder["params"], holder["opt"],
                                                              data)
        return metrics

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--seq_len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["auto", "xla"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every variant")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)

    import jax

    from models.config_check import load_config

    common = [f"data.seq_len={a.seq_len}", f"model.max_len={max(a.seq_len, 1)}", *a.set]
    base = load_config(a.config, common)
    variants = [variant_overrides(v, base) for v in a.variants]
    steps, rows = {}, {}
    for label, overrides in variants:
        cfg = load_config(a.config, common + overrides)
        step = build_step(cfg, a.batch, a.seq_len)
        t0 = time.perf_counter()
        jax.block_until_ready(step())
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(step())
        steps[label] = step
        rows[label] = {"variant": label, "backends": resolved(cfg), "overrides": overrides,
                       "compile_s": compile_s, "times": []}
    order = list(steps)
    for _ in range(a.repeats):          # shuffled rounds: no variant always runs first
        random.shuffle(order)
        for label in order:
            t0 = time.perf_counter()
            metrics = steps[label]()
            jax.block_until_ready(metrics)
            rows[label]["times"].append(time.perf_counter() - t0)
            rows[label]["loss"] = float(metrics["loss"])
    dev = jax.devices()[0]
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"{jax.default_backend()} ({dev.device_kind}), jax {jax.__version__}: "
              f"`python benchmarks/train_step.py {command}`"
              f", batch {a.batch} x {a.seq_len}, median of {a.repeats} shuffled rounds")
    fastest = min(statistics.median(r["times"]) for r in rows.values())
    lines = [header, "", "| variant | backends | ms/step | tokens/s | x fastest | compile s |",
             "|---|---|---|---|---|---|"]
    for r in rows.values():
        r["step_ms"] = 1e3 * statistics.median(r["times"])
        r["tokens_per_s"] = a.batch * a.seq_len / (r["step_ms"] / 1e3)
        lines.append(f"| {r['variant']} | {r['backends']} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_ms'] / 1e3 / fastest:.2f} | "
                     f"{r['compile_s']:.0f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train_step_{jax.default_backend()}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"device": dev.device_kind, "settings": vars(a),
         "rows": list(rows.values())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
