"""Smoke test of benchmarks/kernels.py: tiny shapes, one repeat, results saved to tmp_path."""

import importlib.util
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks" /
                                                  "kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_benchmark_smoke(tmp_path, monkeypatch):
    bench = _load_benchmark()
    # 'fla' must come out as skipped, not a crash: hide torch even where it is installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    rc = bench.main(["--shapes", "1x64x2x16", "--repeats", "1", "--attn_T", "128",
                     "--window", "32", "--attn_heads", "2", "--attn_kv_heads", "1",
                     "--attn_head_dim", "16", "--attn_backends", "auto",
                     "--backends", "xla", "fla", "flashqla", "--out", str(tmp_path)])
    assert rc == 0
    stem = tmp_path / f"kernels_{bench.jax.default_backend()}"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".md").exists()

    rows = {(r["op"], r["backend"]): r for r in data["rows"]}
    for op in ("gated_delta_rule", "delta_rule", "gla", "simple_gla"):
        row = rows[(op, "xla")]
        assert row["status"] == "ok", row
        for key in ("fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops"):
            assert math.isfinite(row[key]) and row[key] > 0, (op, key, row[key])
        assert row["x_fastest"] == {"fwd": 1.0, "fwd_bwd": 1.0}     # the only row that ran
        fla = rows[(op, "fla")]
        assert fla["status"] == "skipped" and "torch" in fla["note"], fla
        assert fla["fwd_ms"] is None
        qla = rows[(op, "flashqla")]
        assert qla["status"] == "skipped" and qla["fwd_ms"] is None
        assert ("torch" if op == "gated_delta_rule" else "has no") in qla["note"], qla

    (attn,) = data["attention"]
    for key in ("full_fwd_ms", "window_fwd_ms", "full_fwd_bwd_ms", "window_fwd_bwd_ms"):
        assert math.isfinite(attn[key]) and attn[key] > 0, (key, attn[key])
    assert attn["speedup_fwd_bwd"] > 0
    (nsa,) = data["nsa"]                       # NSA's op beside attention at the same T
    assert nsa["T"] == 128 and not nsa["note"], nsa
    assert math.isfinite(nsa["fwd_bwd_ms"]) and nsa["fwd_bwd_ms"] > 0
