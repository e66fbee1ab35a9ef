"""Per-token decode latency and decode-cache bytes against context length, for every mixer
family (one layer each), at batch sizes 1 and 16.

    python benchmarks/decode.py                                  # CPU-sized defaults
    python benchmarks/decode.py --families attn gated_deltanet --contexts 1024 4096 --batch 1
    python benchmarks/decode.py --d_model 1024 --n_heads 16 --window 4096 --repeats 50 \\
        --contexts 1024 4096 16384 65536 --batch 1 16 --mem_budget_gb 60    # GPU / TPU

Families (``--families``), each one layer of the registered mixer at ``--d_model`` /
``--n_heads``, bf16 cache (layers that keep a float32 state keep it):

- ``attn`` (MHA), ``swa`` (window ``--window``), ``swa_concat`` (the same layer with its
  one-token step on the chunk path, as before the in-place ring step: it concatenates ring
  and token and rebuilds every ring slot; the before/after of that change in one run),
  ``mla`` (benchmarks/cache.py's DeepSeek-ratio latent: 2 head dims + half a head of RoPE
  key), ``cca`` (compression 4, as cache.py),
  ``gated_deltanet``, ``gla``, ``based``, ``mom`` (4 memories, top-2, shared) and
  ``titans_mag`` (window ``--window``), ``kda``, ``mamba2`` and ``nsa`` (window ``--window``,
  the paper's blocks: a decode step reads C + n l' + w keys): configs/base.yaml settings
  otherwise.

For each context L in ``--contexts``, the layer's cache (``init_cache(batch, L + repeats + 4)``
slots) is filled with L tokens by a chunked prefill through the layer itself, as
benchmarks/cache.py does (``--prefill_chunk`` tokens a call, random bf16 inputs). The prefill
runs once per context at batch 1 and the filled cache is tiled along its batch axis to each
batch size (every per-sequence leaf of a cache leads with the batch axis; the script checks
this from ``init_cache`` shapes at batch 1 and 2), so a large batch costs no extra prefill.
Then single-token steps at positions L, L+1, ... are timed: one jitted step function per family
(compiled once per cache shape), cache buffers donated so each step updates in place as
generate.py's decode loop does, two warm-up steps, median wall time of ``--repeats`` steps
(``block_until_ready`` after each).

Reported per (family, batch, context): median step ms and the cache's bytes (``cache.nbytes``,
the whole layer cache at that batch: k/v or latent slots with their int32 positions, recurrent
states, conv tails), plus the marginal bytes per token per sequence
(``benchmarks/cache.py:bytes_per_token``; 0 for fixed-size states). A cell whose estimated
memory (2 x the cache at that batch, for the tiled copy and the attention step's concatenation,
plus the batch-1 cache) exceeds ``--mem_budget_gb`` is skipped and marked ``skip`` in the
table (``status`` in the JSON).

Each family runs in its own process by default (``--in_process``: all in this one). Prints a
markdown table and saves .md, .json and .png (latency against context, log-log, one line per
family, one panel per batch size) under ``--out`` (default benchmarks/results/).
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

FAMILY_NAMES = ["attn", "swa", "swa_concat", "gated_deltanet", "gla", "based", "mla", "cca", "mom",
                "titans_mag", "kda", "mamba2", "nsa"]


def families(d_model: int, n_heads: int, window: int) -> dict[str, tuple[str, dict]]:
    """family -> (registered mixer, mixer_args overrides) at width d_model with n_heads heads.

    Shared with benchmarks/throughput.py. MLA and CCA take benchmarks/cache.py's settings."""
    cache_entries = load_bench("cache").entries(d_model, n_heads)
    return {
        "attn": ("attn", {}),
        "swa": ("swa", {"window": window}),
        "gated_deltanet": ("gated_deltanet", {}),
        "gla": ("gla", {}),
        "based": ("based", {}),
        "mla": ("mla", cache_entries["MLA"][1]),
        "cca": ("cca", cache_entries["CCA (C=4)"][1]),
        "mom": ("mom", {}),
        "titans_mag": ("titans_mag", {"window": window}),
        "kda": ("kda", {}),
        "mamba2": ("mamba2", {}),
        "nsa": ("nsa", {"window": window}),
    }


def _nbytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "dtype")))


def batch_leaves(mixer, slots: int) -> list[bool]:
    """For each cache leaf: True when it has a leading batch axis (its shape at batch 2 is its
    shape at batch 1 with the first axis doubled), False when it has none (counters). Raises
    if a leaf changes any other way."""
    import jax
    import jax.numpy as jnp

    one, two = (jax.tree_util.tree_leaves(jax.eval_shape(
        lambda b=b, s=slots: mixer.init_cache(b, s, jnp.bfloat16))) for b in (1, 2))
    out = []
    for x1, x2 in zip(one, two, strict=True):
        if x1.shape == x2.shape:
            out.append(False)
        elif x1.shape[0] == 1 and x2.shape == (2, *x1.shape[1:]):
            out.append(True)
        else:
            raise ValueError(f"cache leaf {x1.shape} -> {x2.shape} at batch 2: no leading "
                             "batch axis to tile")
    return out


def tile(cache, batch: int, is_batch: list[bool]):
    """A batch-1 cache -> a new cache (own buffers) with every row a copy of that one."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten(cache)
    new = [jnp.array(jnp.broadcast_to(x, (batch, *x.shape[1:])) if b else x)
           for x, b in zip(leaves, is_batch, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def run_family(a, family: str) -> list[dict]:
    """Every (batch, context) cell of one family, in this process."""
    import layers.attention as attention

    if family != "swa_concat":
        return _run_family(a, family)
    # The ring step as it was: concatenate ring and token (read when the step is traced).
    cached_keys, attention.cached_keys = attention.cached_keys, attention.concat_keys
    try:
        return _run_family(a, family)
    finally:
        attention.cached_keys = cached_keys


def _run_family(a, family: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    cache_bench = load_bench("cache")
    name, overrides = families(a.d_model, a.n_heads, a.window)[
        "swa" if family == "swa_concat" else family]
    extra = a.repeats + 4   # slots past the context: the timed and warm-up steps
    # model.max_len only bounds config checks (windows); at least data.seq_len's default (64),
    # which load_config checks against it.
    max_len = max(max(a.contexts) + extra, 64)
    mixer = cache_bench.build(name, overrides, a.d_model, a.n_heads, max_len)
    per_token = cache_bench.bytes_per_token(mixer, 1)
    graphdef, state = nnx.split(mixer)
    call = lambda st, x, pos, c: nnx.merge(graphdef, st)(x, positions=pos, cache=c)  # noqa: E731
    prefill = jax.jit(call, donate_argnums=(3,))
    step = jax.jit(call, donate_argnums=(3,))
    rng = np.random.default_rng(0)
    d, budget = a.d_model, a.mem_budget_gb * 2**30
    rows = []
    for ctx in a.contexts:
        slots = ctx + extra
        size = {b: _nbytes(jax.eval_shape(
                    lambda b=b, s=slots: mixer.init_cache(b, s, jnp.bfloat16)))
                for b in {1, *a.batch}}
        est = {b: 2 * size[b] + size[1] for b in a.batch}
        base = {"family": family, "mixer": name, "args": overrides, "context": ctx,
                "bytes_per_token": per_token}
        todo = [b for b in a.batch if est[b] <= budget]
        for b in a.batch:
            if b not in todo:
                rows.append({**base, "batch": b, "status": "skipped", "step_ms": None,
                             "cache_bytes": size[b], "est_bytes": est[b],
                             "note": f"needs ~{est[b] / 2**30:.1f} GiB > --mem_budget_gb "
                                     f"{a.mem_budget_gb}"})
                print(f"{family:15s} ctx {ctx:6d} batch {b:3d}: skipped (~"
                      f"{est[b] / 2**30:.1f} GiB)", flush=True)
        if not todo:
            continue
        t0 = time.perf_counter()
        filled = mixer.init_cache(1, slots, jnp.bfloat16)
        start = 0
        while start < ctx:   # chunked prefill at batch 1: the cache then holds ctx tokens
            n = min(a.prefill_chunk, ctx - start)
            x = jnp.asarray(rng.standard_normal((1, n, d)), jnp.bfloat16)
            pos = jnp.arange(start, start + n, dtype=jnp.int32)[None]
            _, filled = prefill(state, x, pos, filled)
            start += n
        jax.block_until_ready(filled)
        fill_s = time.perf_counter() - t0
        is_batch = batch_leaves(mixer, slots)
        for b in todo:
            cache = tile(filled, b, is_batch)
            x1 = jnp.asarray(rng.standard_normal((b, 1, d)), jnp.bfloat16)
            times = []
            for i in range(a.repeats + 2):   # two warm-up steps (the first compiles)
                pos = jnp.full((b, 1), ctx + i, jnp.int32)
                t1 = time.perf_counter()
                y, cache = step(state, x1, pos, cache)
                y.block_until_ready()
                if i >= 2:
                    times.append(time.perf_counter() - t1)
            ms = 1e3 * statistics.median(times)
            finite = bool(np.isfinite(np.asarray(y, np.float32)).all())
            rows.append({**base, "batch": b, "status": "ok", "step_ms": ms,
                         "cache_bytes": int(cache.nbytes), "est_bytes": est[b],
                         "fill_s": fill_s, "output_finite": finite})
            print(f"{family:15s} ctx {ctx:6d} batch {b:3d}: {ms:9.3f} ms/step, cache "
                  f"{cache.nbytes / 2**20:9.2f} MiB", flush=True)
            del cache
        del filled
    return rows


def _cell(r: dict | None, key: str) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok" and key == "step_ms":
        return "skip"
    if key == "step_ms":
        return f"{r['step_ms']:.3f}"
    return f"{r['cache_bytes'] / 2**20:.3g}"


def table(rows: list[dict], a, header: str) -> list[str]:
    cols = "".join(f" ms @{c} |" for c in a.contexts) + "".join(
        f" MiB @{c} |" for c in a.contexts)
    lines = [header, "", f"| family | batch | cache bytes / token / seq |{cols}",
             "|---|---|---|" + "---|" * (2 * len(a.contexts))]
    at = {(r["family"], r["batch"], r["context"]): r for r in rows}
    for fam in dict.fromkeys(r["family"] for r in rows):
        bpt = next(r["bytes_per_token"] for r in rows if r["family"] == fam)
        for b in a.batch:
            cells = [at.get((fam, b, c)) for c in a.contexts]
            lines.append(f"| {fam} | {b} | {bpt:.0f} |"
                         + "".join(f" {_cell(r, 'step_ms')} |" for r in cells)
                         + "".join(f" {_cell(r, 'cache_bytes')} |" for r in cells))
    return lines


def plot(rows: list[dict], a, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(a.batch), figsize=(5.5 * len(a.batch), 4.2), squeeze=False)
    for ax, b in zip(axes[0], a.batch):
        for fam in dict.fromkeys(r["family"] for r in rows):
            pts = sorted((r for r in rows if r["family"] == fam and r["batch"] == b
                          and r["status"] == "ok"), key=lambda r: r["context"])
            if pts:
                ax.plot([r["context"] for r in pts], [r["step_ms"] for r in pts], marker="o",
                        label=fam)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens in the cache)")
        ax.set_ylabel("decode step (ms), one layer")
        ax.set_title(f"batch {b}")
        ax.legend(fontsize=7)
    fig.suptitle(f"per-token decode latency, d_model {a.d_model} ({_device()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _device() -> str:
    import jax

    return f"{jax.default_backend()}: {jax.devices()[0].device_kind}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=FAMILY_NAMES, choices=FAMILY_NAMES)
    p.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--window", type=int, default=1024, help="swa and titans_mag window")
    p.add_argument("--repeats", type=int, default=10, help="timed decode steps per cell")
    p.add_argument("--prefill_chunk", type=int, default=1024)
    p.add_argument("--mem_budget_gb", type=float, default=6.0,
                   help="skip cells whose estimated memory exceeds this (GiB)")
    add_runner_flags(p, "family")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a._row is not None:   # child: one family, rows to a file
        Path(a._row).write_text(json.dumps(run_family(a, a.families[0])))
        return 0
    rows, t_start = [], time.perf_counter()
    for fam in a.families:
        if a.in_process:
            rows += run_family(a, fam)
            continue
        got = run_child(__file__, [*strip_flags(argv, ("--families",)), "--families", fam], fam)
        if got is None:
            return 1
        rows += got

    import jax

    header = (f"Decode step latency (median of {a.repeats}) and cache size, one layer, "
              f"d_model {a.d_model}, {a.n_heads} heads, window {a.window} (swa, titans_mag), "
              f"bf16 cache; {_device()} ({platform.machine()}), "
              f"{time.perf_counter() - t_start:.0f} s in all; skip: over --mem_budget_gb "
              f"{a.mem_budget_gb} (`python benchmarks/decode.py {' '.join(argv)}`)")
    save_results(a.out, f"decode_{jax.default_backend()}", table(rows, a, header),
                 {"settings": settings_of(a), "rows": rows}, lambda path: plot(rows, a, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
