"""Needle in a haystack: train small models at one length, measure recall at 1x, 4x and 16x.

    python benchmarks/needle.py                       # CPU-sized defaults, every model below
    python benchmarks/needle.py --models gqa_window gated_deltanet --steps 300 --out /tmp/nb
    python benchmarks/needle.py --train_len 256 --d_model 256 --n_layers 4 --steps 4000 \\
        --eval_examples 1024                          # larger, on a GPU
    python benchmarks/needle.py --models attn_full=attn hybrid=gated_deltanet,swa

Task (data/needle.py, ``data.kind=needle``): a sequence of random filler tokens holds one
needle, K key tokens followed by L value tokens, at a uniformly random depth; the sequence ends
with the same K key tokens and the model must produce the L value tokens. Filler, key and value
tokens come from disjoint vocabulary ranges ([0, V/4), [V/4, V/2), [V/2, V)).

What is measured, for each model:

1. Training: ``training.loop.train`` on the needle task at ``--train_len`` tokens, from
   ``--config`` (configs/needle.yaml) with the flags' overrides. Every model gets the same data
   stream (``data.seed``), the same initialization seed, batch size, optimizer and number of
   steps; only ``model.mixers`` (and the model's own overrides) differ. Only the answer tokens
   are scored, as in the training loss. ``model.max_len`` is set to the longest eval length.
2. Evaluation: the trained parameters are restored from the run's final checkpoint and the full
   forward of models/lm.py runs on held-out needle sequences (the eval split: never the
   training sequences) at each length ``m * train_len`` for m in ``--multiples``; one jitted
   function, compiled once per length. Sequences are fresh at every length (needle depth uniform
   over that length), ``--eval_examples`` of them, in batches of ``--eval_batch``.
3. Reported: answer-token accuracy (argmax over the full vocabulary equals the value token,
   averaged over the L answer tokens of every sequence: the ``acc`` of training/loop.py),
   exact match (all L answer tokens right; equals the accuracy when L = 1), answer loss, and
   accuracy by needle depth in quarters of the sequence (JSON only; the markdown shows the
   longest length). Chance is 1 / (V - V/2) for a model that knows the answer is a value token.

Attention windows and positions: ``gqa_window`` is sliding-window attention (``swa``) with 2 key/
value heads and window ``--window`` (default: the training length, so at 1x it sees the whole
sequence and the RoPE offsets it meets at 4x and 16x were all seen in training, but needles
further back than the window are out of its reach). A mixer whose Args have a ``window`` field
(e.g. a Titans variant's attention branch) gets the same window. Recurrent mixers (Gated
DeltaNet) carry a fixed-size state over any length.

A model whose mixers are not registered in layers/registry.MIXERS is skipped with a note.
Each model trains in its own process (XLA:CPU has deadlocked in long multi-model processes
here). Prints a markdown table and saves .md, .json and .png under ``--out`` (default
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
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

# name -> (mixers, extra dotted overrides, label)
MODELS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "gqa_window": (("swa",), ("model.n_kv_heads=2",), "GQA (2 kv heads), sliding window"),
    "gqa_full": (("attn",), ("model.n_kv_heads=2",), "GQA (2 kv heads), full attention"),
    # NSA's blocks for 64-token training rows (the paper's are for 8k-64k): compressed tokens of
    # 8 keys every 4, 4 blocks of 8 read per query, a 16-token window, so a needle further back
    # than the window is reached through the compressed tokens and the selected blocks only.
    "nsa": (("nsa",), ("model.n_kv_heads=2", "model.mixer_args.nsa.window=16",
                       "model.mixer_args.nsa.cmp_block=8", "model.mixer_args.nsa.cmp_stride=4",
                       "model.mixer_args.nsa.block_size=8", "model.mixer_args.nsa.block_count=4"),
            "NSA (2 kv heads; 4 blocks of 8, window 16)"),
    "gated_deltanet": (("gated_deltanet",), (), "Gated DeltaNet"),
    "titans_mag": (("titans_mag",), (), "Titans MAG (memory as a gate)"),
    "titans_mac": (("titans_mac",), (), "Titans MAC (memory as context)"),
    # MAL is a layer pattern, not a mixer: a Titans memory layer, then a sliding-window layer.
    "titans_mal": (("titans", "swa"), (), "Titans MAL (memory layer + SWA layer)"),
}
DEFAULT_MODELS = list(MODELS)
DEPTH_BINS = 4


def parse_model(spec: str) -> tuple[str, tuple[str, ...], tuple[str, ...], str]:
    """``name`` from MODELS, or ``name=mixer1,mixer2`` for any registered mixers."""
    if "=" in spec:
        name, _, mixers = spec.partition("=")
        mixers = tuple(m for m in mixers.split(",") if m)
        if not name or not mixers:
            raise SystemExit(f"error: --models entry '{spec}' is not name=mixer[,mixer...]")
        return name, mixers, (), f"{name} ({', '.join(mixers)})"
    if spec not in MODELS:
        raise SystemExit(f"error: unknown model '{spec}' (known: {', '.join(MODELS)}; "
                         "or give name=mixer[,mixer...])")
    return (spec, *MODELS[spec])


def overrides_for(a, mixers: tuple[str, ...], extra: tuple[str, ...], run_dir: str) -> list[str]:
    """Dotted config overrides for one model: shared settings first, then the model's own,
    then --set."""
    from layers.registry import MIXERS

    longest = max(a.multiples) * a.train_len
    window = a.window or a.train_len
    over = [f"run_dir={run_dir}", f"model.mixers=[{','.join(mixers)}]",
            f"model.max_len={longest}", f"data.seq_len={a.train_len}",
            f"data.batch_size={a.batch}", f"data.seed={a.seed}", f"train.seed={a.seed}",
            f"train.steps={a.steps}", f"train.eval_every={a.steps}",
            f"train.checkpoint_every={a.steps}", "train.keep_checkpoints=1",
            "train.progress_bar=false", f"train.log_every={max(1, a.steps // 10)}"]
    for key, value in (("model.d_model", a.d_model), ("model.n_layers", a.n_layers),
                       ("model.n_heads", a.n_heads), ("model.vocab_size", a.vocab),
                       ("optim.lr", a.lr), ("data.needle_key_len", a.key_len),
                       ("data.needle_value_len", a.value_len),
                       ("data.needle_filler", a.filler),
                       ("data.needle_distractors", a.distractors)):
        if value is not None:
            over.append(f"{key}={value}")
    for m in dict.fromkeys(mixers):
        if "window" in {f.name for f in dataclasses.fields(MIXERS[m].defaults)}:
            over.append(f"model.mixer_args.{m}.window={window}")
    return over + list(extra) + list(a.set)


def evaluate_lengths(model, cfg, a) -> dict:
    """Accuracy of a trained model at every eval length (see the module docstring)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from data import make_eval_batches
    from data.needle import needle_start

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, inputs, targets):
        logits, _ = nnx.merge(graphdef, state)(inputs)
        nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, targets[..., None], -1)[..., 0]
        return jnp.argmax(logits, -1), nll

    vocab = cfg.model.vocab_size
    n_batches = max(1, -(-a.eval_examples // a.eval_batch))
    out = {}
    for m in a.multiples:
        T = m * a.train_len
        dcfg = dataclasses.replace(cfg.data, seq_len=T, batch_size=a.eval_batch)
        t0 = time.perf_counter()
        correct, nlls, starts = [], [], []
        for batch in make_eval_batches(dcfg, vocab, n_batches):
            pred, nll = forward(state, jnp.asarray(batch["inputs"]),
                                jnp.asarray(batch["targets"]))
            mask = batch["loss_mask"] == 1.0
            L = int(mask[0].sum())
            # Answer positions are the last L of every row (data/needle.py).
            correct.append((np.asarray(pred) == batch["targets"])[mask].reshape(-1, L))
            nlls.append(np.asarray(nll)[mask].reshape(-1, L))
            starts.append(needle_start(batch["inputs"], vocab, cfg.data.needle_key_len,
                                       cfg.data.needle_value_len))
        correct, nlls, starts = (np.concatenate(x) for x in (correct, nlls, starts))
        last_start = T + 1 - 2 * (cfg.data.needle_key_len + cfg.data.needle_value_len)
        # (with distractors the queried needle still starts somewhere in [0, last_start])
        depth = np.minimum((starts * DEPTH_BINS) // (last_start + 1), DEPTH_BINS - 1)
        by_depth = [float(correct[depth == b].mean()) if np.any(depth == b) else None
                    for b in range(DEPTH_BINS)]
        out[str(T)] = {"multiple": m, "acc": float(correct.mean()),
                       "exact": float(correct.all(-1).mean()), "loss": float(nlls.mean()),
                       "acc_by_depth": by_depth, "examples": int(correct.shape[0]),
                       "eval_s": time.perf_counter() - t0}
        print(f"  {T:6d} tokens: acc {out[str(T)]['acc']:.3f}  exact "
              f"{out[str(T)]['exact']:.3f}  loss {out[str(T)]['loss']:.3f}  by depth "
              f"{' '.join('-' if x is None else f'{x:.2f}' for x in by_depth)}", flush=True)
    return out


def run_one(a, spec: str) -> dict:
    """Train and evaluate one model in this process; returns its result row."""
    import jax
    from flax import nnx

    from models.config_check import load_config
    from training.checkpoint import restore_for_inference
    from training.loop import train

    name, mixers, extra, label = parse_model(spec)
    with tempfile.TemporaryDirectory(prefix=f"needle_{name}_") as run_dir:
        over = overrides_for(a, mixers, extra, run_dir)
        cfg = load_config(a.config, over)
        print(f"== {name}: mixers {list(cfg.model.layer_mixers())}, {a.steps} steps at "
              f"{a.train_len} tokens", flush=True)
        t0 = time.perf_counter()
        final = train(cfg)
        train_s = time.perf_counter() - t0
        cfg, model, step = restore_for_inference(run_dir)
        n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        lengths = evaluate_lengths(model, cfg, a)
    d = cfg.data
    return {"model": name, "label": label, "mixers": list(mixers),
            "task": {"vocab": cfg.model.vocab_size, "key_len": d.needle_key_len,
                     "value_len": d.needle_value_len, "filler": d.needle_filler,
                     "distractors": d.needle_distractors, "window": a.window or a.train_len},
            "overrides": [o for o in over if not o.startswith("run_dir=")],
            "params": int(n_params), "steps": step, "train_s": train_s,
            "train_loss": final.get("loss"), "train_acc": final.get("acc"),
            "lengths": lengths}


def registered_or_note(spec: str) -> bool:
    from layers.registry import MIXERS

    name, mixers, _, _ = parse_model(spec)
    missing = [m for m in mixers if m not in MIXERS]
    if missing:
        print(f"note: skipping {name}: mixer {', '.join(missing)} is not registered in "
              "layers/registry.MIXERS", flush=True)
    return not missing


def table(rows: list[dict], a, header: str) -> list[str]:
    lengths = [m * a.train_len for m in a.multiples]
    cols = "".join(f" acc @{T} ({m}x) |" for T, m in zip(lengths, a.multiples, strict=True))
    lines = [header, "", f"| model | params | train acc |{cols} train s |",
             "|---|---|---|" + "---|" * len(lengths) + "---|"]
    for r in rows:
        accs = "".join(f" {r['lengths'][str(T)]['acc']:.3f} |" for T in lengths)
        tr = "-" if r["train_acc"] is None else f"{r['train_acc']:.3f}"
        lines.append(f"| {r['label']} | {r['params'] / 1e3:.0f}k | {tr} |{accs} "
                     f"{r['train_s']:.0f} |")
    longest = str(lengths[-1])
    lines += ["", f"Accuracy by needle depth at {longest} tokens (quarters of the sequence, "
              "first = farthest from the query):", "",
              "| model |" + "".join(f" depth q{b + 1} |" for b in range(DEPTH_BINS)),
              "|---|" + "---|" * DEPTH_BINS]
    for r in rows:
        cells = "".join(" - |" if x is None else f" {x:.3f} |"
                        for x in r["lengths"][longest]["acc_by_depth"])
        lines.append(f"| {r['label']} |{cells}")
    return lines


def plot(rows: list[dict], a, chance: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [m * a.train_len for m in a.multiples]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.plot(lengths, [r["lengths"][str(T)]["acc"] for T in lengths], marker="o",
                label=r["label"])
    ax.axhline(chance, color="gray", linestyle=":", label="chance (1 / value tokens)")
    ax.axvline(a.train_len, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("sequence length (tokens); dashed: training length")
    ax.set_ylabel("needle answer accuracy")
    ax.set_title(f"needle in a haystack, {a.steps} steps at {a.train_len} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS,
                   help=f"names from {list(MODELS)} or name=mixer[,mixer...]")
    p.add_argument("--config", default=str(ROOT / "configs" / "needle.yaml"))
    p.add_argument("--train_len", type=int, default=64)
    p.add_argument("--multiples", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="default: the config's")
    p.add_argument("--d_model", type=int, default=None, help="default: the config's")
    p.add_argument("--n_layers", type=int, default=None, help="default: the config's")
    p.add_argument("--n_heads", type=int, default=None, help="default: the config's")
    p.add_argument("--vocab", type=int, default=None, help="default: the config's")
    p.add_argument("--key_len", type=int, default=None, help="default: the config's")
    p.add_argument("--value_len", type=int, default=None, help="default: the config's")
    p.add_argument("--filler", choices=["random", "constant"], default=None)
    p.add_argument("--distractors", type=int, default=None, help="default: the config's")
    p.add_argument("--window", type=int, default=None,
                   help="attention window of windowed mixers; default: --train_len")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_examples", type=int, default=256, help="per length")
    p.add_argument("--eval_batch", type=int, default=16)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra dotted config overrides for every model")
    add_runner_flags(p, "model")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a._row is not None:  # child: one model, result row to a file
        Path(a._row).write_text(json.dumps(run_one(a, a.models[0])))
        return 0

    from configs import ConfigError
    from data import DataError

    specs = [s for s in a.models if registered_or_note(s)]
    rows, t_start = [], time.perf_counter()
    for spec in specs:
        if a.in_process:
            try:
                rows.append(run_one(a, spec))
            except (ConfigError, DataError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            continue
        got = run_child(__file__, [*strip_flags(argv, ("--models",)), "--models", spec], spec)
        if got is None:
            return 1
        rows.append(got)
    if not rows:
        print("nothing to run", file=sys.stderr)
        return 1

    import jax

    task = rows[0]["task"]
    chance = 1.0 / (task["vocab"] - task["vocab"] // 2)
    n_eval = next(iter(rows[0]["lengths"].values()))["examples"]
    header = (f"Needle in a haystack: {a.steps} steps at {a.train_len} tokens, batch {a.batch}, "
              f"vocab {task['vocab']}, key {task['key_len']} / value {task['value_len']} "
              f"tokens, {task['distractors']} distractor needles, {task['filler']} filler, "
              f"attention window {task['window']}; accuracy "
              f"on {n_eval} held-out sequences per length (chance {chance:.3f}); "
              f"{jax.default_backend()} ({platform.machine()}), "
              f"{time.perf_counter() - t_start:.0f} s in all "
              f"(`python benchmarks/needle.py {' '.join(argv)}`)")
    save_results(a.out, f"needle_{jax.default_backend()}", table(rows, a, header),
                 {"settings": settings_of(a), "chance": chance, "rows": rows},
                 lambda path: plot(rows, a, chance, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
