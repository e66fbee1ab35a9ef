"""Recall against state size (the Zoology / Based plot): MQAR held-out accuracy of each model
family against the bytes of its decode cache at the training length, over a sweep of widths.

    python benchmarks/recall.py          # the CPU protocol: 8 families x 3 lrs x 3 seeds (~64 min)
    python benchmarks/recall.py --families attn gated_deltanet --lrs 3e-3 --seeds 0
    python benchmarks/recall.py --widths 64 128 256 512 --steps 2000 --batch 64 \\
        --seq_len 256 --kv_pairs 32 --vocab 8192 --window 64 --eval_batches 32   # GPU / TPU

The protocol (Zoology, Arora et al. 2023, section 3 and appendix: the best learning rate per
point of a sweep): every (family, width) trains at each of ``--lrs`` with each of ``--seeds``
(seed = ``train.seed`` = ``data.seed``, so the seeds differ in initialization and data), for at
most ``--steps`` steps, evaluating every ``--eval_every`` steps and stopping at the first
evaluation whose held-out accuracy reaches ``--early_stop`` (``train.early_stop_acc``). The
table reports, per (family, width), the learning rate with the highest median held-out accuracy
over the seeds, that median with the seeds' min and max, the median steps trained, and every
learning rate's median. The CPU defaults (4 pairs in 32 tokens, vocabulary 64, window 8, batch
32, <= 1500 steps, lrs 3e-4 1e-3 3e-3) come from the first runs of plain attention, the family
that needs the most steps (its two-layer induction circuit forms late): at 1000 steps it stayed
at 0.27-0.30 (= "some value of the context") at lr 3e-3 and 1e-2 on all 3 seeds, and reached
0.28 / 0.76 / 0.44 at 1e-3; at 1500 steps 1e-3 gave 0.953 and 0.967 (seeds 0, 1) and 3e-4
0.41 / 0.93 / 0.67. The full sweep (72 runs, two side by side: ``--jobs``) took 64 min wall on
a 2-core machine, 122 min of training summed over runs; mean seconds per run, two at a time:
attention 56, sliding window 48, Based 57 (its quadratic form: layers/based.py), GLA 60, Gated
DeltaNet 55 (early stop), MLA 46, MoM 242, Titans MAG 251. Two runs side by side go ~1.2-1.5x
faster than one after another here (XLA:CPU runs these small steps mostly on one core).
``--resume`` continues one that was cut short (every finished run is appended to
OUT/recall_runs.jsonl). ``--config_lr`` runs each config's own ``optim.lr`` instead of a sweep.

What is measured, for each family and each width in ``--widths`` (``model.d_model``):

1. Training: ``training.loop.train`` on MQAR (``data.kind=mqar``: ``--kv_pairs`` key-value
   pairs, ``--seq_len`` tokens, vocabulary ``--vocab``) from the family's own config file
   (below), which supplies the layer count, heads and optimizer (its ``optim.lr`` is replaced
   by the swept one); every run at one seed gets the same ``--steps``, ``--batch``, data
   stream and initialization. Only ``model.d_model`` changes along a family's line.
2. Accuracy: ``eval_acc`` of the last evaluation in ``train`` (the early-stopping one or
   the last step's): the query positions of
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
``based``) gets ``--window`` (default 8 = seq_len / 4, as titans_mag.yaml's 16 is of its
64), so that recall beyond the window has to go through a fixed-size state. Windowed attention
caches hold window (+ sink) slots, so their bytes do not grow with seq_len.

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
from concurrent.futures import ThreadPoolExecutor, as_completed
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
    "kda": ("kda.yaml", None, "KDA"),
    "mamba2": ("mamba2.yaml", None, "Mamba-2"),
    "hybrid_heads": ("hybrid_heads.yaml", None,
                     "hybrid heads (swa + mamba2 in one layer, gated_deltanet)"),
    "mom": ("mom.yaml", None, "MoM (4 memories, top-2, shared)"),
    "titans": ("titans_mag.yaml", None, "Titans MAG"),
    "mla": ("mla.yaml", None, "MLA"),
    "nsa": ("nsa.yaml", None, "NSA (4 of 8 blocks, window 8)"),
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
                  run_dir: str, lr: float | None, seed: int) -> list[str]:
    """Dotted config overrides of one run (shared settings, then the family's, then --set)."""
    from layers.registry import MIXERS

    steps = a.steps
    every = min(a.eval_every or steps, steps)
    over = [f"run_dir={run_dir}", f"model.d_model={width}", f"model.max_len={a.seq_len}",
            f"model.vocab_size={a.vocab}", "data.kind=mqar", f"data.seq_len={a.seq_len}",
            f"data.num_kv_pairs={a.kv_pairs}", f"data.batch_size={a.batch}",
            f"data.seed={seed}", f"train.seed={seed}", f"train.steps={steps}",
            f"train.eval_every={every}", f"train.eval_batches={a.eval_batches}",
            f"train.checkpoint_every={steps}", "train.keep_checkpoints=1",
            "train.progress_bar=false", f"train.log_every={max(1, every)}"]
    if a.early_stop is not None:
        over.append(f"train.early_stop_acc={a.early_stop}")
    if lr is not None:
        over.append(f"optim.lr={lr}")
    over.append(f"model.mixers=[{','.join(mixers)}]")
    # A hybrid-heads layer's branches (layers/parallel.py) are set through their own names.
    windowed = MIXERS if "parallel" in mixers else dict.fromkeys(mixers)
    for m in windowed:
        defaults = MIXERS[m].defaults
        if getattr(defaults, "window", None) is not None:   # swa, titans_mag: windowed mixers
            over.append(f"model.mixer_args.{m}.window={a.window}")
        if m == "mla" and m in mixers:  # configs/mla.yaml's ratios at every width (docstring)
            head = width // n_heads
            over += [f"model.mixer_args.mla.kv_lora_rank={width // 2}",
                     f"model.mixer_args.mla.qk_nope_head_dim={head}",
                     f"model.mixer_args.mla.qk_rope_head_dim={max(2, head // 2 // 2 * 2)}",
                     f"model.mixer_args.mla.v_head_dim={head}"]
        if m == "nsa" and m in mixers:  # blocks for --seq_len rows: 8 blocks, half of them read
            block = max(2, a.seq_len // 8 // 2 * 2)
            over += [f"model.mixer_args.nsa.cmp_block={block}",
                     f"model.mixer_args.nsa.cmp_stride={block // 2}",
                     f"model.mixer_args.nsa.block_size={block}",
                     "model.mixer_args.nsa.block_count=4"]
    return over + list(a.set)


def state_bytes(model, seq_len: int) -> int:
    """Bytes of the model's decode cache for one sequence of seq_len tokens (all layers)."""
    cache = model.init_cache(batch_size=1, max_len=seq_len)
    return int(cache.nbytes)


def run_one(a, spec: str, width: int, lr: float | None = None, seed: int = 0) -> dict:
    """Train and evaluate one (family, width, lr, seed) in this process; its result row."""
    import jax
    from flax import nnx

    from models.config_check import load_config
    from models.lm import build_model
    from training.loop import train

    name, config, mixers, label = parse_family(spec)
    with tempfile.TemporaryDirectory(prefix=f"recall_{name}_{width}_") as run_dir:
        base = load_config(CONFIGS / config, [])
        mixers = mixers or tuple(base.model.mixers)
        over = overrides_for(a, mixers, width, base.model.n_heads, run_dir, lr, seed)
        cfg = load_config(CONFIGS / config, over)
        print(f"== {name} d_model {width}: mixers {list(cfg.model.layer_mixers())}, "
              f"lr {cfg.optim.lr}, seed {seed}, {a.steps} steps", flush=True)
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
            "lr": cfg.optim.lr, "seed": seed, "params": int(n_params), "state_bytes": sb,
            "eval_acc": final.get("eval_acc"), "eval_loss": final.get("eval_loss"),
            "train_acc": final.get("acc"), "train_loss": final.get("loss"),
            "steps": final.get("step"), "train_s": train_s,
            "overrides": [o for o in over if not o.startswith("run_dir=")]}


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (family, width): the learning rate whose median held-out accuracy over the
    seeds is highest (Zoology reports the best lr per point), that median with the seeds'
    min and max, the median steps trained (early stop) and every lr's median."""
    import statistics

    out = []
    for key in dict.fromkeys((r["family"], r["d_model"]) for r in rows):
        runs = [r for r in rows if (r["family"], r["d_model"]) == key]
        by_lr = {}
        for r in runs:
            by_lr.setdefault(r["lr"], []).append(r)
        med = {lr: statistics.median(_acc(r) for r in rs) for lr, rs in by_lr.items()}
        best = max(med, key=lambda lr: (med[lr], -lr))
        accs = [_acc(r) for r in by_lr[best]]
        out.append({"family": key[0], "d_model": key[1], "label": runs[0]["label"],
                    "state_bytes": runs[0]["state_bytes"], "params": runs[0]["params"],
                    "best_lr": best, "median_acc": med[best], "min_acc": min(accs),
                    "max_acc": max(accs), "seeds": len(accs),
                    "median_steps": statistics.median(r["steps"] or 0 for r in by_lr[best]),
                    "median_acc_by_lr": {f"{lr:g}": m for lr, m in sorted(med.items())}})
    return out


def _acc(r: dict) -> float:
    return 0.0 if r["eval_acc"] is None else float(r["eval_acc"])


def table(rows: list[dict], summary: list[dict], header: str) -> list[str]:
    lrs = sorted({f"{r['lr']:g}" for r in rows}, key=float)
    lines = [header, "", "| family | d_model | state bytes / seq | params | best lr | "
             "held-out acc: median [min, max] over seeds | median steps | "
             + " | ".join(f"median @ lr {lr}" for lr in lrs) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(lrs)]
    for r in summary:
        lines.append(f"| {r['label']} | {r['d_model']} | {r['state_bytes']:,} | "
                     f"{r['params'] / 1e3:.0f}k | {r['best_lr']:g} | **{r['median_acc']:.3f}** "
                     f"[{r['min_acc']:.3f}, {r['max_acc']:.3f}] | {r['median_steps']:.0f} | "
                     + " | ".join(f"{r['median_acc_by_lr'].get(lr, float('nan')):.3f}"
                                  for lr in lrs) + " |")
    lines += ["", "Every run:", "", "| family | d_model | lr | seed | eval acc | steps | "
              "train loss | train s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        lines.append(f"| {r['label']} | {r['d_model']} | {r['lr']:g} | {r['seed']} | "
                     f"{_acc(r):.3f} | {r['steps']} | {loss} | {r['train_s']:.0f} |")
    return lines


def plot(summary: list[dict], a, chance: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for fam in dict.fromkeys(r["family"] for r in summary):
        pts = sorted((r for r in summary if r["family"] == fam), key=lambda r: r["state_bytes"])
        xs = [r["state_bytes"] for r in pts]
        ys = [r["median_acc"] for r in pts]
        err = [[y - r["min_acc"] for r, y in zip(pts, ys)],
               [r["max_acc"] - y for r, y in zip(pts, ys)]]
        line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=pts[0]["label"])
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(str(r["d_model"]), (x, y), textcoords="offset points", xytext=(3, 3),
                        fontsize=6, color=line.lines[0].get_color())
    ax.axhline(chance, color="gray", linestyle=":", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"decode state (bytes per sequence at {a.seq_len} tokens, all layers)")
    ax.set_ylabel("MQAR held-out accuracy (best lr, median; bars: seeds' range)")
    ax.set_title(f"recall vs state: {a.kv_pairs} pairs, seq {a.seq_len}, <= {a.steps} steps, "
                 f"{len(a.seeds)} seeds; labels: d_model", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _shared_settings(a) -> dict:
    """The settings every run of a sweep shares (what --resume must match)."""
    return {k: v for k, v in settings_of(a).items()
            if k not in ("families", "widths", "lrs", "seeds", "resume", "in_process", "out",
                         "jobs")}


def _finished_runs(run_log: Path, shared: dict) -> dict:
    """job -> row of the runs in run_log made with the same shared settings."""
    if not run_log.exists():
        return {}
    done = {}
    for line in run_log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:   # a line cut by a kill: that run is redone
            continue
        if rec.get("shared") == shared:
            done[rec["job"]] = rec["row"]
    return done


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=DEFAULT_FAMILIES,
                   help=f"names from {list(FAMILIES)} or name=mixer[,mixer...]")
    p.add_argument("--widths", nargs="+", type=int, default=[64], help="d_model values")
    p.add_argument("--steps", type=int, default=1500, help="most steps per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3],
                   help="learning rates swept per family and width (best median reported)")
    p.add_argument("--config_lr", action="store_true",
                   help="one run per seed at each family config's own optim.lr, no sweep")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="train.seed = data.seed of each run")
    p.add_argument("--early_stop", type=float, default=0.99,
                   help="stop a run at the first eval with held-out acc >= this (0: off)")
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--kv_pairs", type=int, default=4)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--window", type=int, default=8,
                   help="window of the windowed mixers (swa, titans_mag, based's swa)")
    p.add_argument("--eval_batches", type=int, default=16,
                   help="held-out batches (of --batch sequences) at each evaluation")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra dotted config overrides for every run")
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs of OUT/recall_runs.jsonl made with the same "
                        "settings (a sweep cut short goes on where it stopped)")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs trained side by side, each in its own process (default 2: on a "
                        "2-core CPU two small runs go ~1.2-1.5x faster than one after another)")
    add_runner_flags(p, "model")
    p.add_argument("--_job", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if not a.early_stop:
        a.early_stop = None
    if a.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1 (runs side by side); got {a.jobs}")
    if a._row is not None:   # child: one (family, width, lr, seed), result row to a file
        spec, width, lr, seed = a._job.rsplit("@", 3)
        Path(a._row).write_text(json.dumps(run_one(
            a, spec, int(width), None if lr == "config" else float(lr), int(seed))))
        return 0

    from configs import ConfigError
    from data import DataError

    for spec in a.families:
        parse_family(spec)   # unknown names stop here, before anything trains
    lrs = [None] if a.config_lr else a.lrs
    run_log, shared = Path(a.out) / "recall_runs.jsonl", _shared_settings(a)
    done = _finished_runs(run_log, shared) if a.resume else {}
    if not a.resume:
        run_log.unlink(missing_ok=True)
    jobs = [(spec, width, lr, seed, f"{spec}@{width}@{'config' if lr is None else lr}@{seed}")
            for spec in a.families for width in a.widths for lr in lrs for seed in a.seeds]
    got, t_start = {}, time.perf_counter()

    def record(job: str, row: dict) -> None:
        got[job] = row
        run_log.parent.mkdir(parents=True, exist_ok=True)
        with run_log.open("a") as f:   # one line per finished run, for --resume
            f.write(json.dumps({"job": job, "shared": shared, "row": row}) + "\n")

    pending = []
    for spec, width, lr, seed, job in jobs:
        if job in done:
            print(f"== {job}: finished in {run_log}, reused", flush=True)
            got[job] = done[job]
        else:
            pending.append((spec, width, lr, seed, job))
    if a.in_process:
        for spec, width, lr, seed, job in pending:
            try:
                record(job, run_one(a, spec, width, lr, seed))
            except (ConfigError, DataError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    elif pending:
        child_argv = strip_flags(argv, ("--families", "--widths", "--resume", "--jobs"))

        def child(spec, width, lr, seed, job):
            return run_child(__file__, [*child_argv, "--_job", job],
                             f"{spec} at d_model {width}, lr {lr}, seed {seed}",
                             capture=a.jobs > 1)

        # --jobs children side by side (each its own process, as above); results are logged
        # as they finish and tabled in the sweep's order, so the order of finishing is moot.
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = {pool.submit(child, *p): p[-1] for p in pending}
            for fut in as_completed(futures):
                row = fut.result()
                if row is None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    return 1
                record(futures[fut], row)
    rows = [got[job] for *_, job in jobs]
    wall_s = time.perf_counter() - t_start

    import jax

    summary = summarize(rows)
    chance = 1.0 / (a.vocab - a.vocab // 2)   # a uniform guess among the value tokens
    stop = f", early stop at {a.early_stop:g}" if a.early_stop else ""
    header = (f"MQAR recall vs decode state: {a.kv_pairs} pairs, {a.seq_len} tokens, vocab "
              f"{a.vocab}, <= {a.steps} steps at batch {a.batch}{stop} (eval every "
              f"{a.eval_every}), window {a.window}; lrs "
              f"{'config' if a.config_lr else ' '.join(f'{x:g}' for x in a.lrs)}, seeds "
              f"{' '.join(map(str, a.seeds))}; accuracy on {a.eval_batches * a.batch} held-out "
              f"sequences (chance {chance:.3f}); state = init_cache(batch 1, max_len "
              f"{a.seq_len}) bytes, all layers; {jax.default_backend()} ({platform.machine()}), "
              f"{sum(r['train_s'] for r in rows) / 60:.0f} min of training in all, "
              f"{wall_s / 60:.0f} min wall in this invocation (--jobs {a.jobs}) "
              f"(`python benchmarks/recall.py {' '.join(argv)}`)")
    save_results(a.out, f"recall_{jax.default_backend()}", table(rows, summary, header),
                 {"settings": settings_of(a), "chance": chance, "summary": summary,
                  "rows": rows},
                 lambda path: plot(summary, a, chance, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
