"""The quickstart across seeds: does the README's first command learn on every seed?

    python benchmarks/quickstart_seeds.py                    # seeds 0-4, configs/quickstart.yaml
    python benchmarks/quickstart_seeds.py --seeds 5 6 7 8 9  # seeds never tuned on
    python benchmarks/quickstart_seeds.py --config configs/quickstart.yaml \\
        --set model.mixers=[attn] optim.lr=3e-3 --name trial --out /tmp/qs

Each seed runs the newcomer's command itself, ``python train.py CONFIG train.seed=S data.seed=S
run_dir=TMP [--set ...]``, in its own process one after another (so one run's wall time is not
shared with another's), and the wall time is the whole command's: Python and JAX start-up,
compiles, training, evals and checkpoints. The held-out accuracy at each eval is read back from
the run's metrics.jsonl (``eval_acc``: MQAR accuracy on the eval split, sequences never trained
on). Prints a table (one row per seed, one column per eval step, then wall time) and saves
.md and .json as ``--name`` under ``--out`` (default benchmarks/results/quickstart_seeds_cpu).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import save_results, settings_of  # noqa: E402


def run_seed(config: str, seed: int, overrides: list[str], run_dir: Path) -> dict:
    """One `python train.py` run; -> {"seed", "wall_s", "evals": {step: acc}, "exit"}."""
    cmd = [sys.executable, str(ROOT / "train.py"), config, f"train.seed={seed}",
           f"data.seed={seed}", f"run_dir={run_dir}", "train.progress_bar=false", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    evals = {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "eval_acc" in rec:
                evals[rec["step"]] = rec["eval_acc"]
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
    return {"seed": seed, "wall_s": wall, "evals": evals, "exit": proc.returncode}


def table(rows: list[dict], threshold: float) -> list[str]:
    steps = sorted({s for r in rows for s in r["evals"]})
    head = "| seed | " + " | ".join(f"acc @{s}" for s in steps) + " | wall s |"
    lines = [head, "|" + "---|" * (len(steps) + 2)]
    for r in rows:
        cells = [f"{r['evals'][s]:.3f}" if s in r["evals"] else "-" for s in steps]
        if r["exit"] != 0:
            cells.append(f"exit {r['exit']}")
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {r['wall_s']:.0f} |")
    finals = [r["evals"][steps[-1]] for r in rows if steps and steps[-1] in r["evals"]]
    reached = sum(1 for r in rows if r["evals"] and max(r["evals"].values()) >= threshold)
    if finals:
        lines += ["", f"final held-out accuracy: min {min(finals):.3f}, median "
                      f"{statistics.median(finals):.3f}; {reached} of {len(rows)} seeds reach "
                      f">= {threshold} within the run; wall time max "
                      f"{max(r['wall_s'] for r in rows):.0f} s"]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra dotted overrides, as on the train.py command line")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="the accuracy a seed must reach to count as learned")
    p.add_argument("--name", default="quickstart_seeds_cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            row = run_seed(args.config, seed, args.set, Path(tmp) / f"seed{seed}")
            evals = " ".join(f"{s}:{a:.3f}" for s, a in sorted(row["evals"].items()))
            print(f"seed {seed}: {evals} ({row['wall_s']:.0f} s)", flush=True)
            rows.append(row)
    cmd = " ".join(["python benchmarks/quickstart_seeds.py", "--config", args.config,
                    "--seeds", *map(str, args.seeds)] + (["--set", *args.set] if args.set else []))
    lines = [f"`{cmd}` ({platform.machine()}, {platform.python_version()}): held-out MQAR "
             "accuracy at each eval and the wall time of the whole command", ""]
    lines += table(rows, args.threshold)
    save_results(args.out, args.name, lines, {"settings": settings_of(args), "rows": rows})


if __name__ == "__main__":
    main()
