"""Time the linear-family ops: token-by-token reference (scan) vs chunked XLA, forward and
forward+backward, side by side in one run, in shuffled rounds (ratios are what to read; this
machine is noisy), with each compiled program's temp memory. xla/scan below 1 means the
chunked form is faster.

    python benchmarks/ops.py                       # B=2 H=4 K=V=64, T in 512 2048 8192
    python benchmarks/ops.py --T 512 --repeats 2   # quicker
    python benchmarks/ops.py --ops gated_delta_rule gla --T 2048 8192 --B 4

Prints a markdown table and saves it with the raw numbers (JSON) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import time_side_by_side  # noqa: E402

from pallas_kernels.delta_rule import delta_rule  # noqa: E402
from pallas_kernels.gated_delta_rule import gated_delta_rule  # noqa: E402
from pallas_kernels.gla import gla, simple_gla  # noqa: E402
from pallas_kernels.kda import kda  # noqa: E402
from pallas_kernels.linear_attention import linear_attention  # noqa: E402
from pallas_kernels.titans import titans_memory  # noqa: E402


def _inputs(op: str, b: int, t: int, h: int, d: int, dtype, seed: int = 0):
    """Random inputs in the ranges the layers produce (normalized keys, gates <= 0)."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(3))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    args = {"q": q, "k": k, "v": v}
    if op in ("gla", "kda"):
        args["gk"] = np.log(1 / (1 + np.exp(-rng.standard_normal((b, t, h, d)) - 3)))
    if op in ("simple_gla", "gated_delta_rule"):
        args["g"] = -np.log1p(np.exp(rng.standard_normal((b, t, h))))
    if op in ("delta_rule", "gated_delta_rule", "kda"):
        args["beta"] = 1 / (1 + np.exp(-rng.standard_normal((b, t, h))))
    if op == "titans":   # a 2-layer MLP memory K -> 2K -> V; theta moderate (no divergence)
        sig = lambda shift: 1 / (1 + np.exp(-rng.standard_normal((b, t, h)) - shift))
        args.update(theta=0.3 * sig(0.0), eta=sig(1.0), alpha=sig(-2.0))
        args["mem0"] = rng.standard_normal((b, h, d, 2 * d)) / np.sqrt(d)
        args["mem1"] = rng.standard_normal((b, h, 2 * d, d)) / np.sqrt(2 * d)
    return {name: jnp.asarray(x, dtype if x.ndim == 4 else jnp.float32)
            for name, x in args.items()}


OPS = {
    "linear_attention": lambda a, **kw: linear_attention(a["q"], a["k"], a["v"], **kw),
    "gla": lambda a, **kw: gla(a["q"], a["k"], a["v"], a["gk"], **kw),
    "simple_gla": lambda a, **kw: simple_gla(a["q"], a["k"], a["v"], a["g"], **kw),
    "delta_rule": lambda a, **kw: delta_rule(a["q"], a["k"], a["v"], a["beta"], **kw),
    "gated_delta_rule": lambda a, **kw: gated_delta_rule(a["q"], a["k"], a["v"], a["g"],
                                                         a["beta"], **kw),
    "kda": lambda a, **kw: kda(a["q"], a["k"], a["v"], a["gk"], a["beta"], **kw),
    # Titans: the chunk size is part of the rule, and both backends run the same chunked rule.
    "titans": lambda a, **kw: titans_memory(a["q"], a["k"], a["v"], a["theta"], a["eta"],
                                            a["alpha"], memory0=(a["mem0"], a["mem1"]), **kw),
}


HEADER = ("| op | T | scan fwd ms | xla fwd ms | xla/scan fwd | xla fwd temp MB | "
          "scan fwd+bwd ms | xla fwd+bwd ms | xla/scan fwd+bwd | xla fwd+bwd temp MB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def _compiled(fn, args):
    """fn jitted and compiled for args, and its compiled temp bytes (XLA's memory analysis)."""
    compiled = jax.jit(fn).lower(args).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def measure(op: str, args: dict, repeats: int, chunk_size: int) -> dict:
    """Median seconds of the reference (token scan) and xla (chunked) forms, forward and
    forward+backward, timed side by side in shuffled rounds (common.time_side_by_side: a slow
    stretch of this shared machine hits every form alike), and each program's temp bytes."""
    call = OPS[op]
    progs = {}
    for backend in ("reference", "xla"):
        def forward(a, backend=backend):
            return call(a, backend=backend, chunk_size=chunk_size)[0]

        def loss(a, forward=forward):
            return jnp.sum(forward(a).astype(jnp.float32) ** 2)

        progs[(backend, "fwd")] = _compiled(forward, args)
        progs[(backend, "fwd_bwd")] = _compiled(jax.grad(loss), args)
    times = time_side_by_side({key: (lambda c=compiled: c(args)) for key, (compiled, _)
                               in progs.items()}, rounds=repeats)
    out = {}
    for (backend, mode), (_, temp) in progs.items():
        out[f"{backend}_{mode}_s"] = times[(backend, mode)]
        out[f"{backend}_{mode}_temp_bytes"] = int(temp)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--T", nargs="+", type=int, default=[512, 2048, 8192])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64, help="K = V head dim")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--chunk_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--rows_json", help=argparse.SUPPRESS)   # internal: one op per process
    a = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if a.rows_json is None:
        print(f"device {jax.devices()[0].device_kind} ({platform.machine()}),"
              f" B={a.B} H={a.H} K=V={a.D} {a.dtype}, chunk {a.chunk_size}, "
              f"median of {a.repeats} shuffled rounds (best of 2 calls each)\n{HEADER}", flush=True)
        if len(a.ops) > 1:
            return run_isolated(a, argv)

    rows = []
    lines = []
    for op in a.ops:
        for t in a.T:
            args = _inputs(op, a.B, t, a.H, a.D, jnp.dtype(a.dtype))
            got = measure(op, args, a.repeats, a.chunk_size)
            row = {"op": op, "T": t, "B": a.B, "H": a.H, "D": a.D, "dtype": a.dtype, **got}
            rows.append(row)
            line = (f"| {op} | {t} | {got['reference_fwd_s'] * 1e3:.1f} | "
                    f"{got['xla_fwd_s'] * 1e3:.1f} | "
                    f"{got['xla_fwd_s'] / got['reference_fwd_s']:.2f} | "
                    f"{got['xla_fwd_temp_bytes'] / 2**20:.0f} | "
                    f"{got['reference_fwd_bwd_s'] * 1e3:.1f} | "
                    f"{got['xla_fwd_bwd_s'] * 1e3:.1f} | "
                    f"{got['xla_fwd_bwd_s'] / got['reference_fwd_bwd_s']:.2f} | "
                    f"{got['xla_fwd_bwd_temp_bytes'] / 2**20:.0f} |")
            lines.append(line)
            print(line, flush=True)

    if a.rows_json is not None:
        Path(a.rows_json).write_text(json.dumps({"rows": rows, "lines": lines}))
        return 0
    save(a, argv, rows, lines)
    return 0


def run_isolated(a, argv) -> int:
    """One process per op: each op's T = 8192 programs keep their memory to themselves, and an
    op that fails or runs out of memory does not take the others' rows with it."""
    import subprocess
    import tempfile

    rows, lines = [], []
    for op in a.ops:
        with tempfile.TemporaryDirectory() as tmp:
            rows_file = Path(tmp) / "rows.json"
            proc = subprocess.run([sys.executable, __file__, "--ops", op, *_strip_ops(argv),
                                   "--rows_json", str(rows_file)], check=False)
            if proc.returncode != 0 or not rows_file.exists():
                print(f"{op}: benchmark process failed (exit {proc.returncode})", flush=True)
                continue
            got = json.loads(rows_file.read_text())
        rows += got["rows"]
        lines += got["lines"]
    save(a, argv, rows, lines)
    return 0


def _strip_ops(argv):
    """argv without the --ops list."""
    out, skipping = [], False
    for x in argv:
        if x == "--ops":
            skipping = True
            continue
        if skipping and not x.startswith("--"):
            continue
        skipping = False
        out.append(x)
    return out


def save(a, argv, rows, lines) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ops_{jax.devices()[0].platform}"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    # A "## Notes" section written by hand below the table (peer comparisons measured with
    # scripts outside the repo) survives a rerun.
    md = out / f"{stem}.md"
    notes = md.read_text().partition("\n## Notes")[2] if md.exists() else ""
    md.write_text(
        f"B={a.B} H={a.H} K=V={a.D} {a.dtype}, chunk {a.chunk_size}, median of {a.repeats} "
        "shuffled rounds (best of 2 calls each); xla/scan < 1: the chunked form is faster; "
        "temp: compiled temp bytes of the xla program "
        f"(`python benchmarks/ops.py {' '.join(argv)}`)\n\n"
        + HEADER + "\n" + "\n".join(lines) + "\n" + (f"\n## Notes{notes}" if notes else ""))
    print(f"saved {out / stem}.md and .json")


if __name__ == "__main__":
    sys.exit(main())
