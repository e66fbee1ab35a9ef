"""Recall against state size (the Zoology / Based plot): MQAR held-out accuracy of each model
family against the bytes of its decode cache at the training length, over a sweep of widths.

    python benchmarks/recall.py                       # CPU-sized: widths 32 64, 200 steps, batch 8
    python benchmarks/recall.py --families attn gated_deltanet --widths 32 --steps 100
    python benchmarks/recall.py --widths 64 128 256 512 --steps 2000 --batch 64 \\
        --seq_len 256 --kv_pairs 32 --vocab 8192 --window 64 --eval_batches 32   # GPU / TPU

The CPU defaults only show that the pipeline runs: at 200 steps most families are still near
chance on MQAR (the attention models learn it through a sudden phase change that needs several
hundred steps at lr 1e-2; configs/quickstart.yaml). Meaningful curves need ~1000+ steps per
model (the configs' own budget is 1000 at width 64) and, to separate the families as in the
papers, longer sequences with more pairs (the GPU line above).

What is measured, for each family and each width in ``--widths`` (``model.d_model``):

1. Training: ``training.loop.train`` on MQAR (``data.kind=mqar``: ``--kv_pairs`` key-value
   pairs, ``--seq_len`` tokens, vocabulary ``--vocab``) from the family's own config file
   (below), which supplies the layer count, heads and optimizer (its ``optim.lr`` unless
   ``--lr`` is given); every run gets the same ``--steps``, ``--batch``, data stream and
   initialization seed. Only ``model.d_model`` changes along a family's line.
2. Accuracy: ``eval_acc`` of the final evaluation in ``train``: the query positions of
   ``--eval_batches`` x ``--batch`` sequences of the held-out split (never trained on).
3. State: the model's own ``init_cache(batch_size=1, max_len=seq_len)`` in the layers' cache
   dtype (the model's compute dtype, bf16 by default; recurrent states that layers keep in
   float32 stay float32), the sum of its leaves' bytes over all layers (``ModelCache.nbytes``;
   the int32 slot positions of attention caches included). Measured from the arrays, not from
   a formula: a full-attention cache grows with seq_len, windows and recurrent states do not.

Families (``--families``; or ``name=mixer1,mixer2`` for any registered mixers on the
quickstart config):

- ``attn``: softmax attention, configs/quickstart.yaml (2 layers).
- ``swa``: sliding-window attention, quickstart with ``model.mixers=[swa]``.
- ``based``: configs/based.yaml's pattern ``[conv, based, swa]`` (3 layers).
- ``gla``, ``gated_deltanet``, ``mom``, ``mla``: configs/<name>.yaml (2 layers).
  MLA's latent widths scale with the width in configs/mla.yaml's ratios (kv_lora_rank
  d_model / 2, qk_nope and v head dims = the head dim, qk_rope half of it), otherwise its
  cache would not grow with d_model.
- ``titans``: Titans MAG (configs/titans_mag.yaml: ``[titans_mag]``, 2 layers). MAG rather
  than MAL (``[titans, swa]``) because every layer then carries a memory, as every layer of
  the other families carries its own mixer; because titans_mal.yaml's SWA window (64) equals
  the sequence length, so MAL's recall there would be plain attention's; and because
  benchmarks/decode.py and throughput.py time the same titans_mag mixer.

Windows: every mixer registered with a window (``swa``, ``titans_mag``; also the SWA layer of
``based``) gets ``--window`` (default 16 = seq_len / 4, titans_mag.yaml's window), so that
recall beyond the window has to go through a fixed-size state. Windowed attention caches hold
window (+ sink) slots, so their bytes do not grow with seq_len.

Each model trains in its own process (XLA:CPU has deadlocked in long multi-model processes
here; ``--in_process`` runs them in this one). Prints a markdown table and saves .md, .json and
.png (accuracy against state bytes, log x, one line per family) under ``--out``
(default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_runner_flags, run_child, save_results, settings_of, strip_flags  # noqa: E402

CONFIGS = ROOT / "configs"
# name -> (config file, mixers pattern or None for the config's own, label)
FAMILIES: dict[str, tuple[str, tuple[str, ...] | None, str]] = {
    "attn": ("quickstart.yaml", ("attn",), "attention"),
    "swa": ("quickstart.yaml", ("swa",), "sliding window"),
    "based": ("based.yaml", None, "Based (conv, based, swa)"),
    "gla": ("gla.yaml", None, "GLA"),
    "gated_deltanet": ("gated_deltanet.yaml", None, "Gated DeltaNet"),
    "mom": ("mom.yaml", None, "MoM (4 memories, top-2, shared)"),
    "titans": ("titans_mag.yaml", None, "Titans MAG"),
    "mla": ("mla.yaml", None, "MLA"),
}
DEFAULT_FAMILIES = list(FAMILIES)


def parse_family(spec: str) -> tuple[str, str, tuple[str, ...] | None, str]:
    """``name`` from FAMILIES or ``name=mixer1,mixer2`` -> (name, config, mixers, label)."""
    if "=" in spec:
        name, _, mixers = spec.partition("=")
        mixers = tuple(m for m in mixers.split(",") if m)
        if not name or not mixers:
            raise SystemExit(f"error: --families entry '{spec}' is not name=mixer[,mixer...]")
        return name, "quickstart.yaml", mixers, f"{name} ({', '.join(mixers)})"
    if spec not in FAMILIES:
        raise SystemExit(f"error: unknown family '{spec}' (known: {', '.join(FAMILIES)}; "
                         "or give name=mixer[,mixer...])")
    return (spec, *FAMILIES[spec])


def overrides_for(a, mixers: tuple[str, ...], width: int, n_heads: int,
                  run_dir: str) -> list[str]:
    """Dotted config overrides of one run (shared settings, then the family's, then --set)."""
    from layers.registry import MIXERS

    steps = a.steps
    over = [f"run_dir={run_dir}", f"model.d_model={width}", f"model.max_len={a.seq_len}",
            f"model.vocab_size={a.vocab}", "data.kind=mqar", f"data.seq_len={a.seq_len}",
            f"data.num_kv_pairs={a.kv_pairs}", f"data.batch_size={a.batch}",
            f"data.seed={a.seed}", f"train.seed={a.seed}", f"train.steps={steps}",
            f"train.eval_every={steps}", f"train.eval_batches={a.eval_batches}",
            f"train.checkpoint_every={steps}", "train.keep_checkpoints=1",
            "train.progress_bar=false", f"train.log_every={max(1, steps // 4)}"]
    if a.lr is not None:
        over.append(f"optim.lr={a.lr}")
    over.append(f"model.mixers=[{','.join(mixers)}]")
    for m in dict.fromkeys(mixers):
        defaults = MIXERS[m].defaults
        if getattr(defaults, "window", None) is not None:   # swa, titans_mag: windowed mixers
            over.append(f"model.mixer_args.{m}.window={a.window}")
        if m == "mla":   # configs/mla.yaml's ratios at every width (see the module docstring)
            head = width // n_heads
            over += [f"model.mixer_args.mla.kv_lora_rank={width // 2}",
                     f"model.mixer_args.mla.qk_nope_head_dim={head}",
                     f"model.mixer_args.mla.qk_rope_head_dim={max(2, head // 2 // 2 * 2)}",
                     f"model.mixer_args.mla.v_head_dim={head}"]
    return over + list(a.set)


def state_bytes(model, seq_len: int) -> int:
    """Bytes of the model's decode cache for one sequence of seq_len tokens (all layers)."""
    cache = model.init_cache(batch_size=1, max_len=seq_len)
    return int(cache.nbytes)


def run_one(a, spec: str, width: int) -> dict:
    """Train and evaluate one (family, width) in this process; returns its result row."""
    import jax
    from flax import nnx

    from configs import load_config
    from models.lm import build_model
    from training.loop import train

    name, config, mixers, label = parse_family(spec)
    with tempfile.TemporaryDirectory(prefix=f"recall_{name}_{width}_") as run_dir:
        base = load_config(CONFIGS / config, [])
        mixers = mixers or tuple(base.model.mixers)
        over = overrides_for(a, mixers, width, base.model.n_heads, run_dir)
        cfg = load_config(CONFIGS / config, over)
        print(f"== {name} d_model {width}: mixers {list(cfg.model.layer_mixers())}, "
              f"lr {cfg.optim.lr}, {a.steps} steps", flush=True)
        t0 = time.perf_counter()
        final = train(cfg)
        train_s = time.perf_counter() - t0
    model = build_model(cfg.model, seed=cfg.train.seed)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    sb = state_bytes(model, a.seq_len)
    print(f"   eval acc {final.get('eval_acc', float('nan')):.3f}, state {sb:,} bytes, "
          f"{n_params:,} params, {train_s:.0f} s", flush=True)
    return {"family": name, "label": label, "d_model": width,
            "mixers": list(cfg.model.layer_mixers()), "config": config,
            "lr": cfg.optim.lr, "params": int(n_params), "state_bytes": sb,
            "eval_acc": final.get("eval_acc"), "eval_loss": final.get("eval_loss"),
            "train_acc": final.get("acc"), "train_loss": final.get("loss"),
            "steps": final.get("step"), "train_s": train_s,
            "overrides": [o for o in over if not o.startswith("run_dir=")]}


def table(rows: list[dict], header: str) -> list[str]:
    lines = [header, "", "| family | d_model | state bytes / seq | params | eval acc | "
             "train loss | lr | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["eval_acc"] is None else f"{r['eval_acc']:.3f}"
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        lines.append(f"| {r['label']} | {r['d_model']} | {r['state_bytes']:,} | "
                     f"{r['params'] / 1e3:.0f}k | {acc} | {loss} | {r['lr']:g} | "
                     f"{r['train_s']:.0f} |")
    return lines


def plot(rows: list[dict], a, chance: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam in dict.fromkeys(r["family"] for r in rows):
        pts = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["state_bytes"])
        xs = [r["state_bytes"] for r in pts]
        ys = [float("nan") if r["eval_acc"] is None else r["eval_acc"] for r in pts]
        (line,) = ax.plot(xs, ys, marker="o", label=pts[0]["label"])
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(str(r["d_model"]), (x, y), textcoords="offset points", xytext=(3, 3),
                        fontsize=6, color=line.get_color())
    ax.axhline(chance, color="gray", linestyle=":", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"decode state (bytes per sequence at {a.seq_len} tokens, all layers)")
    ax.set_ylabel("MQAR held-out accuracy")
    ax.set_title(f"recall vs state: {a.kv_pairs} pairs, {a.steps} steps; labels: d_model",
                 fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=DEFAULT_FAMILIES,
                   help=f"names from {list(FAMILIES)} or name=mixer[,mixer...]")
    p.add_argument("--widths", nargs="+", type=int, default=[32, 64], help="d_model values")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help="default: each family's config's")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--kv_pairs", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--window", type=int, default=16,
                   help="window of the windowed mixers (swa, titans_mag, based's swa)")
    p.add_argument("--eval_batches", type=int, default=32,
                   help="held-out batches (of --batch sequences) in the final evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra dotted config overrides for every run")
    add_runner_flags(p, "model")
    p.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a._row is not None:   # child: one (family, width), result row to a file
        spec, _, width = a._job.rpartition("@")
        Path(a._row).write_text(json.dumps(run_one(a, spec, int(width))))
        return 0

    from configs import ConfigError
    from data import DataError

    for spec in a.families:
        parse_family(spec)   # unknown names stop here, before anything trains
    rows, t_start = [], time.perf_counter()
    for spec in a.families:
        for width in a.widths:
            if a.in_process:
                try:
                    rows.append(run_one(a, spec, width))
                except (ConfigError, DataError) as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 2
                continue
            got = run_child(__file__, [*strip_flags(argv, ("--families", "--widths")),
                                       "--_job", f"{spec}@{width}"], f"{spec} at d_model {width}")
            if got is None:
                return 1
            rows.append(got)

    import jax

    chance = 1.0 / (a.vocab - a.vocab // 2)   # a uniform guess among the value tokens
    header = (f"MQAR recall vs decode state: {a.kv_pairs} pairs, {a.seq_len} tokens, vocab "
              f"{a.vocab}, {a.steps} steps at batch {a.batch}, window {a.window}, accuracy on "
              f"{a.eval_batches * a.batch} held-out sequences (chance {chance:.3f}); state = "
              f"init_cache(batch 1, max_len {a.seq_len}) bytes, all layers; "
              f"{jax.default_backend()} ({platform.machine()}), "
              f"{time.perf_counter() - t_start:.0f} s in all "
              f"(`python benchmarks/recall.py {' '.join(argv)}`)")
    save_results(a.out, f"recall_{jax.default_backend()}", table(rows, header),
                 {"settings": settings_of(a), "chance": chance, "rows": rows},
                 lambda path: plot(rows, a, chance, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
