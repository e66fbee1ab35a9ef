"""Pieces every benchmark script shares: timing a jitted call, running one model per
subprocess (and its flags), saving a result (markdown table, JSON, PNG), loading a sibling
script as a module, stripping flags from argv.

Scripts import it as `from common import ...` (benchmarks/ is on sys.path when a script runs;
they add it themselves when imported from elsewhere).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """Another script of benchmarks/ as a module (the folder is not a package)."""
    key = f"_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def strip_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given (possibly multi-valued) flags."""
    out, skipping = [], False
    for arg in argv:
        if arg in flags:
            skipping = True
            continue
        if any(arg.startswith(f + "=") for f in flags):
            continue
        if skipping and arg.startswith("--"):
            skipping = False
        if not skipping:
            out.append(arg)
    return out


def run_child(script: str, args: list[str], what: str, *, capture: bool = False):
    """Runs `python script *args --_row FILE` (one model in a fresh process: XLA:CPU has
    deadlocked in long multi-model processes here) and returns the JSON it wrote to FILE, or
    None after printing an error when the child failed. capture: hold the child's output and
    print it in one piece when it ends (children running side by side do not interleave)."""
    with tempfile.TemporaryDirectory() as tmp:
        row_path = Path(tmp) / "row.json"
        piped = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) if capture \
            else {}
        proc = subprocess.run([sys.executable, script, *args, "--_row", str(row_path)],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, **piped)
        if capture and proc.stdout:
            print(proc.stdout, end="", flush=True)
        if proc.returncode != 0 or not row_path.exists():
            print(f"error: {what} failed (exit {proc.returncode})", file=sys.stderr)
            return None
        return json.loads(row_path.read_text())


def save_results(out: str | Path, name: str, lines: list[str], payload: dict,
                 plot: Callable[[Path], None] | None = None) -> Path:
    """Prints the table and saves OUT/NAME.md (the table), .json (payload) and .png (plot)."""
    print("\n".join(lines))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / name
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    if plot is not None:
        plot(stem.with_suffix(".png"))
    print(f"saved {stem}.md/.json" + ("/.png" if plot is not None else ""))
    return stem


def settings_of(args) -> dict:
    """argparse namespace -> the JSON-able settings (private flags dropped)."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def time_jax(fn, *args, repeats: int) -> float:
    """Median wall seconds of fn(*args) after one compile / warm-up call (block_until_ready
    around each, so asynchronous dispatch is not what gets timed)."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_side_by_side(calls: dict, *, rounds: int, burst: int = 2, seed: int = 0) -> dict:
    """Median over rounds of each call's best of `burst` back-to-back runs, with the calls in a
    new random order every round.

    A shared 2-core machine drifts (other jobs, clocks), so every form is timed in every round
    and only same-run ratios are read. Two effects of a fixed order are removed: the call that
    follows a memory-heavy one (a token scan's backward allocates ~1 GB at T = 8192) pays for
    the allocator's page faults (best of a burst drops that), and the same call always
    following the same neighbour (the shuffle spreads it).

    Args:
        calls: key -> zero-argument callable returning jax arrays (warmed up here).
        rounds: rounds (the median is over these).
        burst: consecutive runs per call per round (the fastest is the round's time).
        seed: order of the shuffles.

    Returns:
        key -> median seconds.
    """
    import random

    import jax

    for call in calls.values():
        jax.block_until_ready(call())
    order, times = list(calls), {key: [] for key in calls}
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for key in order:
            best = float("inf")
            for _ in range(burst):
                start = time.perf_counter()
                jax.block_until_ready(calls[key]())
                best = min(best, time.perf_counter() - start)
            times[key].append(best)
    return {key: statistics.median(ts) for key, ts in times.items()}


def add_runner_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--in_process, --out and the private --_row of a one-process-per-`what` script."""
    p.add_argument("--in_process", action="store_true",
                   help=f"every {what} in this process (default: one process each)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
