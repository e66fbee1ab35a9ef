"""Training throughput with packed documents (data.packing=true) against the same run unpacked,
on byte text of short documents, side by side in one process and alternating, so machine
noise falls on both.

    python benchmarks/packing.py                      # CPU: ~3 min
    python benchmarks/packing.py --steps 200 --repeats 3 --mixers gated_deltanet swa

Each run trains the same model on the same corpus (generated: --docs files of a few short
words each, ~40 bytes) for --steps steps; tokens/s is the median of the logged rates after the
first log (which includes the compile). Packing adds segment masks to every layer; the rate
compares what that costs. Prints a markdown table and saves it with the raw numbers as
benchmarks/results/packing_<platform>.{md,json} (--out for another folder).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def short_documents(path: Path, n_docs: int, seed: int = 0) -> Path:
    """n_docs files of lower-case words: each repeats its own three words, so context inside
    a document helps and context from the previous document misleads."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n_docs):
        words = ["".join(rng.choice(list("abcdefgh"), rng.integers(2, 5))) for _ in range(3)]
        (path / f"{i:04d}.txt").write_text(" ".join(rng.choice(words, rng.integers(6, 14))))
    return path


def one_run(text: Path, run_dir: Path, packing: bool, a) -> float:
    from models.config_check import load_config
    from training.loop import train

    over = ["data.kind=bytes", f"data.path={text}", f"data.packing={str(packing).lower()}",
            f"data.seq_len={a.seq_len}", f"data.batch_size={a.batch}", "model.vocab_size=256",
            f"model.d_model={a.d_model}", "model.n_heads=4", f"model.d_ff={2 * a.d_model}",
            f"model.max_len={a.seq_len}", f"model.mixers=[{','.join(a.mixers)}]",
            f"model.n_layers={len(a.mixers)}", "model.mixer_args.swa.window=32",
            f"train.steps={a.steps}", f"train.eval_every={a.steps}", "train.eval_batches=1",
            f"train.log_every={max(1, a.steps // 6)}", "train.progress_bar=false",
            f"run_dir={run_dir}"]
    train(load_config("configs/quickstart.yaml", over))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return float(statistics.median(rates[1:] or rates))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per setting")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--mixers", nargs="+", default=["gated_deltanet", "swa"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    import jax

    tmp = Path(tempfile.mkdtemp(prefix="mnemax-packing-"))
    text = short_documents(tmp / "docs", a.docs)
    mean_doc = statistics.mean(f.stat().st_size for f in text.iterdir())
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(a.repeats):
        for packing in (False, True) if i % 2 == 0 else (True, False):
            rates[packing].append(one_run(text, tmp / f"run{i}_{packing}", packing, a))
            print(f"packing={packing}: {rates[packing][-1]:,.0f} tokens/s", flush=True)
    ratio = statistics.mean(rates[True]) / statistics.mean(rates[False])
    plat = jax.default_backend()
    cmd = " ".join(["python", "benchmarks/packing.py", *argv])
    text_md = (f"`{cmd}` ({plat}, {platform.machine()}, jax {jax.__version__}): "
               f"{a.docs} documents of {mean_doc:.0f} bytes on average, seq {a.seq_len}, "
               f"batch {a.batch}, d_model {a.d_model}, mixers {a.mixers}, {a.steps} steps per "
               f"run, runs alternating\n\n"
               "| data.packing | tokens/s per run | mean |\n|---|---|---|\n")
    for packing in (False, True):
        runs = ", ".join(f"{r:,.0f}" for r in rates[packing])
        text_md += f"| {str(packing).lower()} | {runs} | {statistics.mean(rates[packing]):,.0f} |\n"
    text_md += f"\npacked / unpacked throughput: {ratio:.2f}\n"
    print("\n" + text_md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"packing_{plat}"
    stem.with_suffix(".md").write_text(text_md)
    stem.with_suffix(".json").write_text(json.dumps(
        {"argv": argv, "settings": vars(a), "tokens_per_s": {str(k): v for k, v in rates.items()},
         "ratio": ratio, "mean_doc_bytes": mean_doc, "time": time.time()}, indent=1))
    print(f"saved {stem}.md/.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
