"""Training throughput of every mixer family at (about) the same parameter count: tokens/s of
the jitted train step, and model FLOP utilization on an accelerator.

    python benchmarks/throughput.py                               # CPU-sized: ~0.5M params
    python benchmarks/throughput.py --families attn gated_deltanet --params 2e5 --repeats 3
    python benchmarks/throughput.py --params 1.5e8 --n_layers 12 --n_heads 16 --seq_len 2048 \\
        --batch 16 --repeats 20                                   # GPU / TPU (peak detected)
    python benchmarks/throughput.py --params 1.5e8 --n_layers 12 --peak_tflops 989  # explicit

Models: the LM of models/lm.py with ``--n_layers`` layers of one family's mixer (the families
of benchmarks/decode.py: attn, swa and titans_mag with window ``--window``, default
seq_len / 4; mla and cca as benchmarks/cache.py sets them, scaled with the head dim; the rest
at configs/base.yaml settings), ``--n_heads`` heads, vocabulary ``--vocab``, bf16 compute.

Equal size: for each family, ``d_model`` is the multiple of 2 x n_heads (even head dims for
RoPE) whose parameter count (all parameters, tied embeddings counted once; from
``nnx.eval_shape``, nothing allocated) is closest to ``--params``; candidates the config
rejects (e.g. CCA's latent head dim must be even) are skipped. The table gives each count and
its ratio to the target; a family whose closest count is more than 10% off is marked ``*``.

Timing: ``training.loop.make_train_step`` (the training loop's own jitted step: forward,
backward, AdamW update, params and optimizer state donated) on one fixed random batch of
``--batch`` x ``--seq_len`` tokens (every position scored); two warm-up steps (the first
compiles), then the median wall time of ``--repeats`` steps, each waited for.
tokens/s = batch x seq_len / median step.

FLOPs and MFU: model FLOPs per token = 6 N + attention, where N is the parameters a token
uses (all of them, except MoM's routed memories, counted at (top_k + shared) / (memories +
shared) of their k/v/beta/decay projections), and attention = 6 x H x T_eff x (d_qk + d_v)
per softmax-attention layer (PaLM's 12 L H Q T for d_qk = d_v = Q, no causal discount; T_eff
= min(seq_len, window + sinks) for windowed attention, including titans_mag's SWA branch; MLA
counts its expanded training form, CCA its latent heads). The linear-recurrence families'
state updates (gla, gated_deltanet, based, mom, titans memory) are not counted, so their MFU
is a lower bound. MFU = FLOPs/token x tokens/s / peak, the peak from ``--peak_tflops`` or,
when not given, the dense bf16 peak of the device kind (PEAK_TFLOPS: TPU v4, v5e, v5p, v6e;
A100, H100, H200). On a CPU (or an unknown device without ``--peak_tflops``) MFU is "-"; the
achieved model TFLOP/s is reported everywhere.

Each family runs in its own process (XLA:CPU has deadlocked in long multi-model processes
here; ``--in_process``: all in this one). Prints a markdown table and saves .md, .json and .png
(tokens/s per family, with parameter counts) under ``--out`` (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_runner_flags, load_bench, run_child, save_results, settings_of, strip_flags  # noqa: E402

FAMILY_NAMES = ["attn", "swa", "gated_deltanet", "gla", "based", "mla", "cca", "mom",
                "titans_mag"]
# Dense bf16 peak TFLOP/s per chip, matched in order against jax's device_kind (lower case).
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("tpu v4", 275.0),
    ("tpu v5 lite", 197.0), ("tpu v5e", 197.0),
    ("tpu v5p", 459.0), ("tpu v5", 459.0),
    ("tpu v6 lite", 918.0), ("tpu v6e", 918.0),
    ("h100 pcie", 756.0), ("h100", 989.0),
    ("h200", 989.0),
    ("a100", 312.0),
]
TOLERANCE = 0.10


def _decode():
    """benchmarks/decode.py as a module (its family table is shared)."""
    return load_bench("decode")


def peak_tflops(device_kind: str, platform_name: str, given: float | None) -> float | None:
    """--peak_tflops if given; else the table's peak for this device kind; None on a CPU or an
    unknown device."""
    if given is not None:
        return given
    if platform_name == "cpu":
        return None
    kind = device_kind.lower()
    return next((peak for key, peak in PEAK_TFLOPS if key in kind), None)


def model_config(a, family: str, d_model: int):
    """The validated ModelConfig of one family at width d_model (ConfigError if impossible)."""
    from models.config_check import load_config

    name, overrides = _decode().families(d_model, a.n_heads, a.window)[family]
    args = [f"model.d_model={d_model}", f"model.n_heads={a.n_heads}",
            f"model.n_layers={a.n_layers}", f"model.vocab_size={a.vocab}",
            f"model.max_len={a.seq_len}", f"data.seq_len={a.seq_len}",
            f"model.dtype={a.dtype}", f"model.mixers=[{name}]"]
    args += [f"model.mixer_args.{name}.{k}={'null' if v is None else v}"
             for k, v in overrides.items()]
    return load_config(None, args + list(a.set)).model


def count_params(model_cfg) -> int:
    import jax
    from flax import nnx

    from models.lm import build_model

    abstract = nnx.eval_shape(lambda: build_model(model_cfg))
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))))


def pick_width(a, family: str) -> tuple[int, int, list[tuple[int, int]]]:
    """(d_model, params, [(d, params) tried]) with params closest to --params (in log ratio).

    Parameters grow with d_model, so: widths growing by 1.25x until one reaches the target,
    then every multiple of the step between that one and the last below it."""
    import math

    from configs import ConfigError

    step, seen = 2 * a.n_heads, {}

    def params_at(d: int) -> int | None:
        if d not in seen:
            try:
                seen[d] = count_params(model_config(a, family, d))
            except (ConfigError, ValueError):
                seen[d] = None
        return seen[d]

    lo, hi, d = step, None, step
    while d <= 1 << 17:
        n = params_at(d)
        if n is not None and n >= a.params:
            hi = d
            break
        if n is not None:
            lo = d
        d = max(d + step, int(d * 1.25) // step * step)
    for d in range(lo, (hi or lo) + 1, step):
        params_at(d)
    tried = sorted((d, n) for d, n in seen.items() if n is not None)
    if not tried:
        raise SystemExit(f"error: no valid d_model for {family} with {a.n_heads} heads")
    d, n = min(tried, key=lambda t: abs(math.log(t[1] / a.params)))
    return d, n, tried


def active_params(model, total: int) -> int:
    """Parameters a token uses: MoM's routed memories count (top_k + shared) / states of their
    per-memory projections (w_kv, w_ba); everything else counts in full."""
    from layers.mom import MoM

    inactive = 0
    for block in model.blocks:
        m = block.mixer
        if isinstance(m, MoM):
            per_state = m.w_kv[...].size + m.w_ba[...].size
            used = m.top_k + int(m.shared)
            inactive += per_state * (m.n_states - used) // m.n_states
    return total - inactive


def attention_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token of the softmax-attention score and value products, all layers:
    6 H T_eff (d_qk + d_v) each (see the module docstring)."""
    from layers.attention import Attention
    from layers.cca import CCA
    from layers.mla import MLA
    from layers.titans_variants import TitansMAG

    total = 0.0
    for block in model.blocks:
        m = block.mixer
        if isinstance(m, TitansMAG):
            m = m.attn
        if isinstance(m, MLA):
            h, dqk, dv = m.n_heads, m.nope_dim + m.rope_dim, m.v_dim
        elif isinstance(m, Attention | CCA):
            h, dqk, dv = m.n_heads, m.head_dim, m.head_dim
        else:
            continue
        window = getattr(m, "window", None)
        t_eff = seq_len if window is None else min(seq_len, window + getattr(m, "n_sinks", 0))
        total += 6.0 * h * t_eff * (dqk + dv)
    return total


def run_family(a, family: str) -> dict:
    """Width search, then the timed train step, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from models.config_check import load_config
    from models.lm import build_model
    from training.loop import make_train_step
    from training.optim import make_optimizer

    t0 = time.perf_counter()
    d, n, tried = pick_width(a, family)
    search_s = time.perf_counter() - t0
    cfg = model_config(a, family, d)
    model = build_model(cfg, seed=0)
    active = active_params(model, n)
    n_matmul = active - (0 if cfg.tie_embeddings else cfg.vocab_size * d)  # lookup is free
    flops_tok = 6.0 * n_matmul + attention_flops_per_token(model, a.seq_len)
    optim_cfg = load_config(None, []).optim
    optimizer = make_optimizer(optim_cfg, a.repeats + 2)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    del model, state
    opt_state = optimizer.init(params)
    train_step, _ = make_train_step(graphdef, optimizer)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, a.vocab, (a.batch, a.seq_len + 1), dtype=np.int32)
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "loss_mask": jnp.ones((a.batch, a.seq_len), jnp.float32)}
    times = []
    for i in range(a.repeats + 2):   # two warm-up steps (the first compiles)
        t1 = time.perf_counter()
        params, opt_state, metrics = train_step(params, opt_state, batch)
        jax.block_until_ready((params, opt_state, metrics))
        if i == 0:
            compile_s = time.perf_counter() - t1
        elif i >= 2:
            times.append(time.perf_counter() - t1)
    step_s = statistics.median(times)
    tps = a.batch * a.seq_len / step_s
    dev = jax.devices()[0]
    peak = peak_tflops(dev.device_kind, dev.platform, a.peak_tflops)
    achieved = flops_tok * tps / 1e12
    loss = float(metrics["loss"])
    row = {"family": family, "mixer": cfg.mixers[0], "d_model": d, "params": n,
           "active_params": active, "params_ratio": n / a.params,
           "within_tolerance": abs(n / a.params - 1) <= TOLERANCE, "tried": tried,
           "step_ms": 1e3 * step_s, "tokens_per_s": tps, "compile_s": compile_s,
           "search_s": search_s, "flops_per_token": flops_tok, "model_tflops": achieved,
           "peak_tflops": peak, "mfu": None if peak is None else achieved / peak,
           "loss": loss, "device_kind": dev.device_kind}
    print(f"{family:15s} d_model {d:5d}: {n / 1e6:7.3f}M params, {tps:12,.0f} tok/s, "
          f"{1e3 * step_s:8.1f} ms/step, {achieved:.4f} model TFLOP/s, compile "
          f"{compile_s:.0f} s", flush=True)
    return row


def table(rows: list[dict], header: str) -> list[str]:
    lines = [header, "", "| family | d_model | params | vs target | active params | tokens/s | "
             "step ms | model TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["within_tolerance"] else " *"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['family']} | {r['d_model']} | {r['params'] / 1e6:.3f}M | "
                     f"{r['params_ratio']:.2f}{mark} | {r['active_params'] / 1e6:.3f}M | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                     f"{r['model_tflops']:.4g} | {mfu} |")
    return lines


def plot(rows: list[dict], a, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows) + 2), 4))
    names = [r["family"] for r in rows]
    bars = ax.bar(names, [r["tokens_per_s"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        label = f"{r['params'] / 1e6:.2f}M"
        if r["mfu"] is not None:
            label += f"\n{100 * r['mfu']:.1f}%"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("training tokens / s")
    ax.tick_params(axis="x", rotation=25)
    ax.set_title(f"train-step throughput at ~{a.params / 1e6:.3g}M params, {a.n_layers} layers, "
                 f"batch {a.batch} x {a.seq_len} ({rows[0]['device_kind'] if rows else ''})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=FAMILY_NAMES, choices=FAMILY_NAMES)
    p.add_argument("--params", type=float, default=5e5, help="target parameter count")
    p.add_argument("--n_layers", type=int, default=2)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--window", type=int, default=None,
                   help="swa / titans_mag window; default seq_len / 4")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--repeats", type=int, default=5, help="timed train steps")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="device peak for MFU; default: from the device kind (PEAK_TFLOPS)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra dotted model config overrides for every family")
    add_runner_flags(p, "family")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.window is None:
        a.window = max(1, a.seq_len // 4)
    if a._row is not None:   # child: one family, its row to a file
        Path(a._row).write_text(json.dumps(run_family(a, a.families[0])))
        return 0
    rows, t_start = [], time.perf_counter()
    for fam in a.families:
        if a.in_process:
            rows.append(run_family(a, fam))
            continue
        got = run_child(__file__, [*strip_flags(argv, ("--families",)), "--families", fam], fam)
        if got is None:
            return 1
        rows.append(got)

    import jax

    dev = jax.devices()[0]
    peak = peak_tflops(dev.device_kind, dev.platform, a.peak_tflops)
    header = (f"Train-step throughput at ~{a.params:,.0f} params (d_model per family; * = more "
              f"than {TOLERANCE:.0%} off), {a.n_layers} layers, {a.n_heads} heads, batch "
              f"{a.batch} x {a.seq_len} tokens, {a.dtype}, window {a.window} (swa, titans_mag), "
              f"median of {a.repeats} steps; MFU = (6 N_active + attention) FLOPs/token x "
              f"tokens/s / peak ({'-' if peak is None else f'{peak:g} TFLOP/s'}); "
              f"{jax.default_backend()}: {dev.device_kind} ({platform.machine()}), "
              f"{time.perf_counter() - t_start:.0f} s in all "
              f"(`python benchmarks/throughput.py {' '.join(argv)}`)")
    save_results(a.out, f"throughput_{jax.default_backend()}", table(rows, header),
                 {"settings": settings_of(a), "rows": rows}, lambda path: plot(rows, a, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
