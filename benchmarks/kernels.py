"""Kernel throughput: the chunked linear-attention ops per backend, and softmax attention full
causal vs sliding window, forward and forward+backward, with achieved TFLOP/s.

    python benchmarks/kernels.py                                # CPU: small shapes, ~1-3 min
    python benchmarks/kernels.py --backends xla pallas jla fla flashqla   # GPU: all side by side
    python benchmarks/kernels.py --ops gla --shapes 4x4096x16x128 --repeats 10 --skip_attention

Linear ops (gated_delta_rule, delta_rule, gla, simple_gla; shapes BxTxHxK with V = K, chunk
C = 64) per backend: "xla" (chunked, lax.scan state sweep), "pallas" (the same with the Pallas
state-sweep kernel; GPU/TPU, or any platform with --interpret), "reference" (token-by-token
scan), the kernel libraries behind our signatures ("jla" on Hopper, "deltanet_tpu" on TPU;
pallas_kernels/libraries), and two torch peers: "fla" (flash-linear-attention's chunk_* Triton
kernels) and "flashqla" (FlashQLA's chunk_gated_delta_rule, TileLang; Gated DeltaNet only);
each needs torch, its package and a CUDA GPU, else its rows say "skipped". "x fastest" is
each row's time over the fastest row of its op and shape. Forward = jit(o); forward+backward =
jit(value_and_grad(sum(o * ct))) wrt q, k, v and the gates/betas. Each time is the median of
--repeats after one compile/warm-up call (JAX: wall clock around block_until_ready; torch: CUDA
events after torch.cuda.synchronize). A backend that fails on a shape (OOM, unsupported) is an
error row, not a crash.

FLOP model (model FLOPs, 2 per multiply-add, per batch row and head, per chunk of C tokens;
gates, exps, masks and other elementwise work not counted; causal masks not discounted):
    GLA, simple GLA: 2 C^2 (K + V)   intra-chunk scores Q K^T and their product with V
                   + 4 C K V         state read Q S and state update K^T V
    delta rules:     the above + 2 C^2 K (A = K K^T) + C^2 (K + V) (forward substitution for
                   W and U, both right-hand sides) + 2 C K V (the W S read of the new values)
    forward+backward is counted as 3x forward (not modelled separately).
NSA rows (pallas_kernels/nsa, the paper's blocks) sit beside attention at each --attn_T, in a
table of their own against the fastest full-causal attention backend (--skip_nsa: none), one
row per --nsa_backends form (default: the XLA gathered form, and the Pallas kernels on a GPU
or TPU).
Attention (useful FLOPs: visible query-key pairs only, whatever a backend computes): forward
4 B H D * pairs, pairs = T (T + 1) / 2 full causal or sum_t min(t + 1, window); forward+backward
as 3.5x forward (FlashAttention-2's count: backward = 2.5 forward). The dense "xla" backend
computes all T^2 scores either way, so its window run is not faster; "flash" skips blocks.

Prints a markdown table and saves it, the raw numbers (JSON) and a bar chart (PNG) as
benchmarks/results/kernels_<platform>.{md,json,png} (--out for another folder).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# torch may share the GPU (--backends fla): JAX must not grab 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import time_jax  # noqa: E402

from pallas_kernels.backends import interpret_kernels  # noqa: E402
from pallas_kernels.delta_rule import delta_rule  # noqa: E402
from pallas_kernels.gated_delta_rule import gated_delta_rule  # noqa: E402
from pallas_kernels.gla import gla, simple_gla  # noqa: E402

CHUNK = 64
GATES = {"gated_delta_rule": ("g", "beta"), "delta_rule": ("beta",), "gla": ("gk",),
         "simple_gla": ("g",)}
OPS = {
    "gated_delta_rule": lambda a, **kw: gated_delta_rule(a["q"], a["k"], a["v"], a["g"],
                                                         a["beta"], **kw),
    "delta_rule": lambda a, **kw: delta_rule(a["q"], a["k"], a["v"], a["beta"], **kw),
    "gla": lambda a, **kw: gla(a["q"], a["k"], a["v"], a["gk"], **kw),
    "simple_gla": lambda a, **kw: simple_gla(a["q"], a["k"], a["v"], a["g"], **kw),
}
TORCH_PEERS = {
    "fla": {"gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
            "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
            "gla": ("fla.ops.gla", "chunk_gla"), "simple_gla": ("fla.ops.simple_gla",
                                                                "chunk_simple_gla")},
    "flashqla": {"gated_delta_rule": ("flash_qla", "chunk_gated_delta_rule")},
}
LINEAR_BACKENDS = ("xla", "pallas", "reference", "jla", "deltanet_tpu", "fla", "flashqla")
ACCEL_SHAPES = ["8x2048x16x64", "4x4096x16x128", "1x16384x16x128"]
CPU_SHAPES = ["1x1024x4x64", "1x2048x4x64"]


def linear_flops(op: str, b: int, t: int, h: int, k: int, v: int, c: int = CHUNK) -> float:
    """Forward model FLOPs of a chunked op (module docstring)."""
    per_chunk = 2 * c * c * (k + v) + 4 * c * k * v
    if op in ("delta_rule", "gated_delta_rule"):
        per_chunk += 2 * c * c * k + c * c * (k + v) + 2 * c * k * v
    return float(b * h * math.ceil(t / c) * per_chunk)


def attention_flops(b: int, t: int, h: int, d: int, window: int | None) -> float:
    """Forward FLOPs over the visible (query, key) pairs."""
    w = t if window is None else min(window, t)
    pairs = w * (w + 1) // 2 + (t - w) * w
    return 4.0 * b * h * d * pairs


def make_inputs(op: str, b: int, t: int, h: int, d: int, seed: int = 0) -> dict:
    """Deterministic float32 numpy inputs: unit-norm keys for the delta rules, log gates
    -softplus(randn - 3) (decays near 1, as trained gates start), beta = sigmoid(randn)."""
    rng = np.random.default_rng(seed)
    x = {n: rng.standard_normal((b, t, h, d), np.float32) for n in ("q", "k", "v", "ct")}
    if op in ("delta_rule", "gated_delta_rule"):
        x["k"] /= np.linalg.norm(x["k"], axis=-1, keepdims=True)
    log_gate = lambda shape: -np.logaddexp(0, rng.standard_normal(shape) - 3).astype(np.float32)
    if op == "gla":
        x["gk"] = log_gate((b, t, h, d))
    if op in ("simple_gla", "gated_delta_rule"):
        x["g"] = log_gate((b, t, h))
    if op in ("delta_rule", "gated_delta_rule"):
        x["beta"] = (1 / (1 + np.exp(-rng.standard_normal((b, t, h))))).astype(np.float32)
    return x


def time_torch(fn, repeats: int) -> float:
    """Median seconds by CUDA events, after two warm-up calls (Triton autotuning)."""
    import torch
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bench_jax(op, backend, x, dtype, repeats, row) -> None:
    call = OPS[op]
    args = {n: jnp.asarray(x[n], dtype if n in ("q", "k", "v") else jnp.float32)
            for n in ("q", "k", "v", *GATES[op])}
    ct = jnp.asarray(x["ct"], dtype)
    kw = dict(backend=backend, chunk_size=CHUNK)
    forward = lambda a: call(a, **kw)[0]
    loss = lambda a, c: jnp.sum(forward(a).astype(jnp.float32) * c.astype(jnp.float32))
    row["fwd_ms"] = 1e3 * time_jax(jax.jit(forward), args, repeats=repeats)
    row["fwd_bwd_ms"] = 1e3 * time_jax(jax.jit(jax.value_and_grad(loss)), args, ct,
                                       repeats=repeats)


def peer_unavailable(peer: str) -> str | None:
    """Why the torch peer ("fla" / "flashqla") cannot run here, or None."""
    try:
        import torch
    except ImportError:
        return "torch not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU for torch"
    module = {"fla": "fla.ops", "flashqla": "flash_qla"}[peer]
    try:
        importlib.import_module(module)
    except Exception as e:   # ImportError, or a Triton/CUDA mismatch at import time
        return f"{module} not importable ({type(e).__name__}: {e})"
    return None


def bench_torch_peer(peer, op, x, dtype, repeats, row) -> None:
    """A torch peer's chunk_* op on [B, T, H, K] inputs (head_first=False), log-space gates,
    same scale K^-0.5; all inputs in the benchmark dtype, as in FLA's own examples."""
    import torch
    module, name = TORCH_PEERS[peer][op]
    fn = getattr(importlib.import_module(module), name)
    kw = {"scale": x["q"].shape[-1] ** -0.5}
    if "head_first" in inspect.signature(fn).parameters:   # older releases default to True
        kw["head_first"] = False
    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    ins = [torch.from_numpy(x[n]).to("cuda", tdt) for n in ("q", "k", "v", *GATES[op])]
    ct = torch.from_numpy(x["ct"]).to("cuda", tdt)
    leaves = [t.clone().requires_grad_(True) for t in ins]

    def forward():
        with torch.no_grad():
            return fn(*ins, **kw)[0]

    def forward_backward():
        (fn(*leaves, **kw)[0].float() * ct.float()).sum().backward()
        for t in leaves:
            t.grad = None

    try:
        row["fwd_ms"] = 1e3 * time_torch(forward, repeats)
        row["fwd_bwd_ms"] = 1e3 * time_torch(forward_backward, repeats)
    finally:   # free this op's tensors before the next (the closures hold the lists)
        ins.clear()
        leaves.clear()
        torch.cuda.empty_cache()


def _error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}"


def _tflops(row: dict, flops: float, bwd_factor: float) -> None:
    for key, mult in (("fwd", 1.0), ("fwd_bwd", bwd_factor)):
        ms = row.get(f"{key}_ms")
        row[f"{key}_tflops"] = flops * mult / (ms * 1e-3) / 1e12 if ms else None


def run_linear(a) -> list[dict]:
    rows = []
    peer_reason = {p: peer_unavailable(p) for p in TORCH_PEERS if p in a.backends}
    for shape in a.shapes:
        b, t, h, d = (int(s) for s in shape.split("x"))
        for op in a.ops:
            x = make_inputs(op, b, t, h, d)
            flops = linear_flops(op, b, t, h, d, d)
            for backend in a.backends:
                row = {"op": op, "backend": backend, "shape": shape, "dtype": a.dtype,
                       "fwd_flops": flops, "fwd_ms": None, "fwd_bwd_ms": None,
                       "status": "ok", "note": ""}
                if backend in TORCH_PEERS and op not in TORCH_PEERS[backend]:
                    row.update(status="skipped", note=f"{backend} has no {op}")
                elif peer_reason.get(backend):
                    row.update(status="skipped", note=peer_reason[backend])
                else:
                    try:
                        if backend in TORCH_PEERS:
                            bench_torch_peer(backend, op, x, a.dtype, a.repeats, row)
                        else:
                            bench_jax(op, backend, x, jnp.dtype(a.dtype), a.repeats, row)
                    except Exception as e:   # OOM, unsupported backend/dtype: record, go on
                        row.update(status="error", note=_error(e))
                _tflops(row, flops, 3.0)
                rows.append(row)
                print(f"  {op:16s} {backend:9s} {shape:16s} fwd {_ms(row['fwd_ms'])} ms, "
                      f"fwd+bwd {_ms(row['fwd_bwd_ms'])} ms {row['note']}", flush=True)
    for row in rows:   # each row over the fastest row of its op and shape
        same = [r for r in rows if r["status"] == "ok"
                and (r["op"], r["shape"], r["dtype"]) == (row["op"], row["shape"], row["dtype"])]
        if row["status"] == "ok":
            row["x_fastest"] = {key: row[f"{key}_ms"] / min(r[f"{key}_ms"] for r in same)
                                for key in ("fwd", "fwd_bwd")}
    return rows


def run_attention(a) -> list[dict]:
    try:
        from pallas_kernels.attention import attention
    except ImportError as e:
        print(f"attention: skipped, the dispatcher is not importable ({_error(e)})")
        return []
    rows = []
    for t in a.attn_T:
        rows += _run_attention_at(a, attention, t)
        if not a.skip_nsa:
            rows += [_run_nsa_at(a, t, backend) for backend in _nsa_backends(a)]
    return rows


def _nsa_backends(a) -> list[str]:
    if a.nsa_backends:
        return a.nsa_backends
    return ["xla", "pallas"] if jax.default_backend() in ("gpu", "tpu") else ["xla"]


def _is_nsa(row: dict) -> bool:
    return row["backend"].startswith("nsa (")


def _run_nsa_at(a, t: int, backend: str) -> dict:
    """NSA's op (pallas_kernels/nsa, the paper's blocks: compressed 32 / 16, 16 blocks of 64,
    window 512) at the attention rows' shape with `backend`, forward and forward+backward;
    its row beside the full-causal attention rows of the same T."""
    from pallas_kernels.nsa import nsa

    b, h, hkv, d = 1, a.attn_heads, a.attn_kv_heads, a.attn_head_dim
    rng = np.random.default_rng(1)
    dt = jnp.dtype(a.dtype)
    q, ct = (jnp.asarray(rng.standard_normal((b, t, h, d)), dt) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, t, hkv, d)), dt) for _ in range(2))
    gates = [jnp.full((b, t, h), 0.5, jnp.float32)] * 3
    row = {"backend": f"nsa ({backend})", "T": t, "B": b, "H": h, "Hkv": hkv, "D": d,
           "note": ""}

    def fwd(q, k, v):
        return nsa(q, k, v, *gates, backend=backend, window=512)

    def loss(q, k, v, c):
        return jnp.sum(fwd(q, k, v).astype(jnp.float32) * c.astype(jnp.float32))

    try:
        row["fwd_ms"] = 1e3 * time_jax(jax.jit(fwd), q, k, v, repeats=a.repeats)
        row["fwd_bwd_ms"] = 1e3 * time_jax(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
                                           q, k, v, ct, repeats=a.repeats)
    except Exception as e:
        row["note"] = _error(e)
    print(f"  {row['backend']}  T={t}: fwd {_ms(row.get('fwd_ms'))} ms, fwd+bwd "
          f"{_ms(row.get('fwd_bwd_ms'))} ms {row['note']}", flush=True)
    return row


def _run_attention_at(a, attention, t: int) -> list[dict]:
    b, h, hkv, d = 1, a.attn_heads, a.attn_kv_heads, a.attn_head_dim
    rng = np.random.default_rng(1)
    dt = jnp.dtype(a.dtype)
    q, ct = (jnp.asarray(rng.standard_normal((b, t, h, d)), dt) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, t, hkv, d)), dt) for _ in range(2))
    rows = []
    for backend in a.attn_backends:
        row = {"backend": backend, "B": b, "T": t, "H": h, "Hkv": hkv, "D": d,
               "window": a.window, "dtype": a.dtype, "note": ""}
        for mask, window in (("full", None), ("window", a.window)):
            fwd = lambda q, k, v, w=window, be=backend: attention(
                q, k, v, window=w, backend=be)
            loss = lambda q, k, v, c, f=fwd: jnp.sum(f(q, k, v).astype(jnp.float32)
                                                   * c.astype(jnp.float32))
            flops = attention_flops(b, t, h, d, window)
            sub = {"fwd_ms": None, "fwd_bwd_ms": None}
            try:
                sub["fwd_ms"] = 1e3 * time_jax(jax.jit(fwd), q, k, v, repeats=a.repeats)
                sub["fwd_bwd_ms"] = 1e3 * time_jax(
                    jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), q, k, v, ct,
                    repeats=a.repeats)
            except Exception as e:
                row["note"] += f"{mask}: {_error(e)} "
            _tflops(sub, flops, 3.5)
            row.update({f"{mask}_{key}": val for key, val in sub.items()})
        for key in ("fwd", "fwd_bwd"):
            full, win = row[f"full_{key}_ms"], row[f"window_{key}_ms"]
            row[f"speedup_{key}"] = full / win if full and win else None
        rows.append(row)
        print(f"  attention {backend:9s} T={t}: full fwd+bwd {_ms(row['full_fwd_bwd_ms'])} ms, "
              f"window {_ms(row['window_fwd_bwd_ms'])} ms {row['note']}", flush=True)
    return rows


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _g(x, suffix="") -> str:
    return "-" if x is None else f"{x:.3g}{suffix}"


def tables(rows: list[dict], attn: list[dict], a, header: str) -> str:
    lines = [header, "", "| op | backend | shape BxTxHxK | dtype | fwd ms | fwd+bwd ms | "
             "fwd TFLOP/s | fwd+bwd TFLOP/s | x fastest fwd, fwd+bwd | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("x_fastest")
        ratio = f"{ratio['fwd']:.2f}, {ratio['fwd_bwd']:.2f}" if ratio else "-"
        note = r["status"] if r["status"] != "ok" else ""
        note += f": {r['note']}" if r["note"] else ""
        lines.append(f"| {r['op']} | {r['backend']} | {r['shape']} | {r['dtype']} | "
                     f"{_ms(r['fwd_ms'])} | {_ms(r['fwd_bwd_ms'])} | {_g(r['fwd_tflops'])} | "
                     f"{_g(r['fwd_bwd_tflops'])} | {ratio} | {note.replace('|', '/')} |")
    nsa_rows = [r for r in attn if _is_nsa(r)]
    attn = [r for r in attn if not _is_nsa(r)]
    if attn:
        r0 = attn[0]
        lines += ["", f"Attention, B={r0['B']} H={r0['H']} Hkv={r0['Hkv']} "
                  f"D={r0['D']} {r0['dtype']}, window {r0['window']} vs full causal "
                  "(TFLOP/s over visible pairs; full/window = how much faster the window is):",
                  "", "| backend | T | full fwd ms | window fwd ms | full/window fwd | "
                  "full fwd+bwd ms | window fwd+bwd ms | full/window fwd+bwd | "
                  "full fwd+bwd TFLOP/s | window fwd+bwd TFLOP/s | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in attn:
            lines.append(
                f"| {r['backend']} | {r['T']} | {_ms(r['full_fwd_ms'])} | "
                f"{_ms(r['window_fwd_ms'])} | "
                f"{_g(r['speedup_fwd'], 'x')} | {_ms(r['full_fwd_bwd_ms'])} | "
                f"{_ms(r['window_fwd_bwd_ms'])} | {_g(r['speedup_fwd_bwd'], 'x')} | "
                f"{_g(r['full_fwd_bwd_tflops'])} | {_g(r['window_fwd_bwd_tflops'])} | "
                f"{r['note'].strip().replace('|', '/')} |")
        if jax.default_backend() == "gpu":
            lines += ["", "Target (T=16384, window 1024, GPU): window >= 5x faster than full "
                      f"causal; here window {r0['window']}."]
    if nsa_rows:
        lines += ["", "NSA (pallas_kernels/nsa; xla: the gathered form, pallas: the selected-"
                  "block kernels + flash / splash window; compressed 32 / 16, 16 blocks of 64, "
                  "window 512, gates 0.5) vs the fastest full-causal attention row of the same "
                  "T (NSA / attention < 1: NSA faster):", "",
                  "| T | NSA form | NSA fwd ms | NSA fwd+bwd ms | fastest full attention | "
                  "its fwd ms | its fwd+bwd ms | NSA / attention fwd | NSA / attention fwd+bwd "
                  "| note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in nsa_rows:
            same = [x for x in attn if x["T"] == r["T"] and x.get("full_fwd_bwd_ms")]
            best = min(same, key=lambda x: x["full_fwd_bwd_ms"]) if same else None
            ratio = lambda key, full, r=r, best=best: (  # noqa: E731
                "-" if best is None or r.get(key) is None or not best.get(full)
                else f"{r[key] / best[full]:.2f}")
            lines.append(
                f"| {r['T']} | {r['backend'][5:-1]} | {_ms(r.get('fwd_ms'))} | "
                f"{_ms(r.get('fwd_bwd_ms'))} | "
                f"{best['backend'] if best else '-'} | "
                f"{_ms(best['full_fwd_ms']) if best else '-'} | "
                f"{_ms(best['full_fwd_bwd_ms']) if best else '-'} | "
                f"{ratio('fwd_ms', 'full_fwd_ms')} | {ratio('fwd_bwd_ms', 'full_fwd_bwd_ms')} | "
                f"{r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _scale(ax, values) -> None:
    """Log y axis only when the bars span more than 20x (else the cut-off base misleads)."""
    values = [v for v in values if v]
    if values and max(values) > 20 * min(values):
        ax.set_yscale("log")


def plot(rows: list[dict], attn: list[dict], shapes: list[str], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    panels = len(shapes) + bool(attn)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    ops = list(dict.fromkeys(r["op"] for r in rows))
    width = 0.8 / max(1, len(backends))
    for ax, shape in zip(axes[0], shapes):
        for i, be in enumerate(backends):
            ms = {r["op"]: r["fwd_bwd_ms"] for r in rows
                  if r["shape"] == shape and r["backend"] == be}
            ax.bar([j + i * width for j in range(len(ops))],
                   [ms.get(op) or 0.0 for op in ops], width, label=be)
        ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(ops))], ops,
                      rotation=20)
        _scale(ax, [r["fwd_bwd_ms"] for r in rows if r["shape"] == shape])
        ax.set_title(f"{shape} (BxTxHxK)")
        ax.set_ylabel("fwd+bwd ms")
        ax.legend()
    attn = [r for r in attn if not _is_nsa(r)]      # NSA: its own table only
    if attn:
        ax = axes[0][-1]
        xs = range(len(attn))
        ax.bar([i - 0.2 for i in xs], [r["full_fwd_bwd_ms"] or 0.0 for r in attn], 0.4,
               label="full causal")
        ax.bar([i + 0.2 for i in xs], [r["window_fwd_bwd_ms"] or 0.0 for r in attn], 0.4,
               label=f"window {attn[0]['window']}")
        ax.set_xticks(list(xs), [f"{r['backend']}\nT={r['T']}" for r in attn])
        _scale(ax, [r[f"{m}_fwd_bwd_ms"] for r in attn for m in ("full", "window")])
        ax.set_title("attention")
        ax.set_ylabel("fwd+bwd ms")
        ax.set_ylim(top=ax.get_ylim()[1] * (3 if ax.get_yscale() == "log" else 1.25))
        ax.legend(loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    p.add_argument("--backends", nargs="+", choices=LINEAR_BACKENDS,
                   help="default: xla, plus pallas on GPU/TPU")
    p.add_argument("--shapes", nargs="+", help="BxTxHxK (V = K); default by platform")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="q/k/v dtype; default bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--repeats", type=int, help="timed calls per point (default 5; CPU 3)")
    p.add_argument("--interpret", action="store_true",
                   help="run Pallas backends in the interpreter (slow; lets them run on CPU)")
    p.add_argument("--skip_attention", action="store_true")
    p.add_argument("--skip_linear", action="store_true", help="attention rows only")
    p.add_argument("--attn_backends", nargs="+",
                   help="default: auto and each explicit backend of the platform")
    p.add_argument("--attn_T", type=int, nargs="+", help="default 16384 (CPU 4096)")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--skip_nsa", action="store_true", help="no NSA rows beside attention")
    p.add_argument("--nsa_backends", nargs="+", default=None,
                   help="NSA forms to time (default: xla, plus pallas on a GPU / TPU)")
    p.add_argument("--attn_heads", type=int, help="default 16 (CPU 4)")
    p.add_argument("--attn_kv_heads", type=int, help="default attn_heads // 4")
    p.add_argument("--attn_head_dim", type=int, help="default 128 (CPU 64)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder")
    a = p.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)

    plat = jax.default_backend()
    accel = plat in ("gpu", "tpu")
    a.backends = a.backends or (["xla", "pallas"] if accel else ["xla"])
    a.shapes = a.shapes or (ACCEL_SHAPES if accel else CPU_SHAPES)
    for s in a.shapes:
        if len(s.split("x")) != 4 or not all(x.isdigit() for x in s.split("x")):
            p.error(f"--shapes wants BxTxHxK, e.g. 4x4096x16x128; got {s!r}")
    a.dtype = a.dtype or ("bfloat16" if accel else "float32")
    a.repeats = a.repeats or (5 if accel else 3)
    a.attn_T = a.attn_T or [16384 if accel else 4096]
    a.attn_heads = a.attn_heads or (16 if accel else 4)
    a.attn_kv_heads = a.attn_kv_heads or max(1, a.attn_heads // 4)
    a.attn_head_dim = a.attn_head_dim or (128 if accel else 64)
    a.attn_backends = a.attn_backends or ["auto", "xla", *{"gpu": ["flash", "cudnn", "tokamax"],
                                                            "tpu": ["splash", "tokamax"]}
                                          .get(plat, [])]
    dev = jax.devices()[0]
    header = (f"{plat} ({getattr(dev, 'device_kind', '?')}, {platform.machine()}), jax "
              f"{jax.__version__}, {a.dtype}, chunk {CHUNK}, median of {a.repeats} after a "
              f"warm-up call; FLOP model in benchmarks/kernels.py (fwd+bwd = 3x fwd for the "
              f"linear ops) (`python benchmarks/kernels.py {' '.join(argv)}`)")
    print(header, flush=True)

    start = time.perf_counter()
    with interpret_kernels(a.interpret):
        rows = [] if a.skip_linear else run_linear(a)
        attn = [] if a.skip_attention else run_attention(a)
    text = tables(rows, attn, a, header)
    print("\n" + text + f"\n(total {time.perf_counter() - start:.0f} s)")

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels_{plat}"
    stem.with_suffix(".md").write_text(text)
    meta = {"platform": plat, "device": getattr(dev, "device_kind", "?"),
            "jax": jax.__version__, "argv": argv, "settings": vars(a)}
    nsa_rows = [r for r in attn if _is_nsa(r)]
    stem.with_suffix(".json").write_text(json.dumps(
        {**meta, "rows": rows, "attention": [r for r in attn if r not in nsa_rows],
         "nsa": nsa_rows}, indent=1))
    plot(rows, attn, [] if a.skip_linear else a.shapes, stem.with_suffix(".png"),
         f"fwd+bwd time, {plat} ({meta['device']}), {a.dtype}")
    print(f"saved {stem}.md/.json/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
