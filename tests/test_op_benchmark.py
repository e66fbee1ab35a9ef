"""Smoke test of benchmarks/ops.py (the linear-family ops, scan vs chunked): it runs at a tiny
size and writes a table and JSON rows with times, ratios and compiled temp bytes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import load_bench  # noqa: E402


def test_ops_benchmark_smoke(tmp_path):
    bench = load_bench("ops")
    md = tmp_path / "ops_cpu.md"
    md.write_text("old table\n\n## Notes\nkept by hand\n")
    assert bench.main(["--ops", "gated_delta_rule", "--T", "32", "--B", "1", "--H", "1",
                       "--D", "8", "--chunk_size", "16", "--repeats", "1",
                       "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ops_cpu.json").read_text())
    assert [(r["op"], r["T"]) for r in rows] == [("gated_delta_rule", 32)]
    for key in ("reference_fwd_s", "xla_fwd_s", "reference_fwd_bwd_s", "xla_fwd_bwd_s"):
        assert rows[0][key] > 0
    assert rows[0]["xla_fwd_bwd_temp_bytes"] > 0
    text = md.read_text()
    assert "| gated_delta_rule | 32 |" in text and "xla/scan" in text
    assert text.endswith("## Notes\nkept by hand\n") and "old table" not in text
