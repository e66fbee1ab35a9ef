"""Smoke tests of benchmarks/recall.py, decode.py and throughput.py at tiny sizes (results saved
to tmp_path), plus the pieces they rest on: decode.py's tiled cache equals a batched prefill,
throughput.py's peak table."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from common import load_bench as _load  # noqa: E402


def _positive(x) -> bool:
    return x is not None and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_recall_smoke(tmp_path):
    bench = _load("recall")
    # The default path: each run trains in its own process, two side by side (--jobs 2).
    args = ["--families", "attn", "gated_deltanet", "--widths", "16", "--steps", "3",
            "--batch", "8", "--eval_batches", "1", "--lrs", "1e-2", "--seeds", "0",
            "--seq_len", "64", "--kv_pairs", "8", "--vocab", "128", "--out", str(tmp_path)]
    assert bench.main(args) == 0
    stem = tmp_path / "recall_cpu"
    assert stem.with_suffix(".md").exists() and stem.with_suffix(".png").exists()
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [(r["family"], r["d_model"]) for r in rows] == [("attn", 16), ("gated_deltanet", 16)]
    for r in rows:
        for key in ("state_bytes", "params", "train_s", "lr"):
            assert _positive(r[key]), (r["family"], key, r[key])
        assert 0.0 <= r["eval_acc"] <= 1.0 and math.isfinite(r["train_loss"])
        assert r["steps"] == 3
    attn, gdn = rows
    # 2 layers x 64 slots x (k + v: 16 bf16 values each) + int32 positions, plus counters:
    # a full KV cache outgrows Gated DeltaNet's [4, 4, 4] float32 state per layer.
    assert attn["state_bytes"] >= 2 * 64 * (2 * 16 * 2 + 4)
    assert gdn["state_bytes"] < attn["state_bytes"]

    # --resume reuses the finished runs of the same settings (none retrains: train_s equal) ...
    assert bench.main([*args, "--resume"]) == 0
    again = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [r["train_s"] for r in again] == [r["train_s"] for r in rows]
    # ... and not those of other settings: a changed --steps trains again, in this process.
    assert bench.main([*args, "--resume", "--steps", "2", "--families", "gated_deltanet",
                       "--in_process"]) == 0
    (other,) = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert other["steps"] == 2


def test_recall_summary_picks_the_best_median_lr():
    bench = _load("recall")
    accs = {1e-3: [0.2, 0.9, 0.3], 3e-3: [0.5, 0.6, 0.4], 1e-2: [1.0, 0.1, 0.0]}
    rows = [{"family": "f", "d_model": 8, "label": "F", "state_bytes": 10, "params": 5,
             "lr": lr, "seed": seed, "eval_acc": acc, "steps": 100 * (seed + 1)}
            for lr, got in accs.items() for seed, acc in enumerate(got)]
    (s,) = bench.summarize(rows)
    # medians 0.3, 0.5, 0.1: lr 3e-3 wins though single runs of the others score higher
    assert s["best_lr"] == 3e-3 and s["median_acc"] == 0.5
    assert (s["min_acc"], s["max_acc"], s["median_steps"], s["seeds"]) == (0.4, 0.6, 200, 3)
    assert s["median_acc_by_lr"] == {"0.001": 0.3, "0.003": 0.5, "0.01": 0.1}


def test_decode_tile_matches_batched_prefill():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    bench = _load("decode")
    cache_bench = bench.load_bench("cache")
    fams = bench.families(16, 2, 8)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 12, 16)), jnp.bfloat16)
    pos = jnp.arange(12, dtype=jnp.int32)[None]
    x1 = jnp.asarray(rng.standard_normal((3, 1, 16)), jnp.bfloat16)
    p1 = jnp.full((3, 1), 12, jnp.int32)
    for family in ("attn", "titans_mag"):   # MAG: a ring with sinks and an MLP memory
        name, over = fams[family]
        mixer = cache_bench.build(name, over, 16, 2, 64)
        graphdef, state = nnx.split(mixer)
        call = jax.jit(lambda st, x, p, c, g=graphdef: nnx.merge(g, st)(x, positions=p,
                                                                         cache=c))
        _, one = call(state, x, pos, mixer.init_cache(1, 20, jnp.bfloat16))
        _, three = call(state, jnp.repeat(x, 3, 0), jnp.repeat(pos, 3, 0),
                        mixer.init_cache(3, 20, jnp.bfloat16))
        tiled = bench.tile(one, 3, bench.batch_leaves(mixer, 20))
        y_ref, _ = call(state, x1, p1, three)
        y, _ = call(state, x1, p1, tiled)
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                                      err_msg=family)


def test_decode_smoke(tmp_path):
    import jax
    import jax.numpy as jnp

    bench = _load("decode")
    # A budget between attn's estimate at batch 2 for 64 and for 128 tokens: that cell skips.
    mixer = bench.load_bench("cache").build("attn", {}, 16, 2, 256)
    extra = 2 + 4   # --repeats 2

    def est(ctx, b):
        size = lambda n: bench._nbytes(jax.eval_shape(  # noqa: E731
            lambda: mixer.init_cache(n, ctx + extra, jnp.bfloat16)))
        return 2 * size(b) + size(1)

    budget = (est(64, 2) + est(128, 2)) / 2 / 2**30
    rc = bench.main(["--families", "attn", "gated_deltanet", "--contexts", "64", "128",
                     "--batch", "1", "2", "--d_model", "16", "--n_heads", "2", "--window", "32",
                     "--repeats", "2", "--prefill_chunk", "64", "--mem_budget_gb", str(budget),
                     "--in_process", "--out", str(tmp_path)])
    assert rc == 0
    stem = tmp_path / "decode_cpu"
    assert stem.with_suffix(".png").exists()
    assert "skip" in stem.with_suffix(".md").read_text()
    rows = {(r["family"], r["batch"], r["context"]): r
            for r in json.loads(stem.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {(f, b, c) for f in ("attn", "gated_deltanet") for b in (1, 2)
                         for c in (64, 128)}
    skipped = rows.pop(("attn", 2, 128))
    assert skipped["status"] == "skipped" and skipped["step_ms"] is None
    for key, r in rows.items():
        assert r["status"] == "ok" and r["output_finite"], key
        assert _positive(r["step_ms"]) and _positive(r["cache_bytes"]), (key, r)
    # A full KV cache grows with the context and the batch; the recurrent state does not grow.
    assert rows[("attn", 1, 128)]["cache_bytes"] > rows[("attn", 1, 64)]["cache_bytes"]
    assert rows[("attn", 2, 64)]["cache_bytes"] > rows[("attn", 1, 64)]["cache_bytes"]
    assert (rows[("gated_deltanet", 1, 128)]["cache_bytes"]
            == rows[("gated_deltanet", 1, 64)]["cache_bytes"])
    assert rows[("attn", 1, 64)]["bytes_per_token"] > 0
    assert rows[("gated_deltanet", 1, 64)]["bytes_per_token"] == 0


def test_throughput_peaks():
    bench = _load("throughput")
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "gpu", None) == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", "gpu", None) == 756.0
    assert bench.peak_tflops("NVIDIA H200", "gpu", None) == 989.0
    assert bench.peak_tflops("TPU v4", "tpu", None) == 275.0
    assert bench.peak_tflops("TPU v5 lite", "tpu", None) == 197.0
    assert bench.peak_tflops("TPU v5p", "tpu", None) == 459.0
    assert bench.peak_tflops("cpu", "cpu", None) is None
    assert bench.peak_tflops("Some GPU", "gpu", None) is None
    assert bench.peak_tflops("cpu", "cpu", 1.5) == 1.5


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    bench = _load("throughput")
    rc = bench.main(["--families", "attn", "mom", "--params", "3e4", "--n_layers", "1",
                     "--n_heads", "2", "--seq_len", "32", "--batch", "2", "--repeats", "1",
                     "--in_process", "--out", str(tmp_path)])
    assert rc == 0
    stem = tmp_path / "throughput_cpu"
    assert stem.with_suffix(".md").exists() and stem.with_suffix(".png").exists()
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [r["family"] for r in rows] == ["attn", "mom"]
    for r in rows:
        for key in ("d_model", "params", "active_params", "tokens_per_s", "step_ms",
                    "flops_per_token", "model_tflops"):
            assert _positive(r[key]), (r["family"], key, r[key])
        assert 0.5 < r["params_ratio"] < 2.0, r
        assert r["mfu"] is None and r["peak_tflops"] is None   # CPU: no MFU
        assert math.isfinite(r["loss"])
    attn, mom = rows
    assert attn["active_params"] == attn["params"]
    assert mom["active_params"] < mom["params"]   # routed memories count at k / M
    # attention FLOPs come on top of 6 N for attn only
    assert attn["flops_per_token"] > 6 * attn["params"]
    assert mom["flops_per_token"] == 6 * mom["active_params"]


def test_based_forms_smoke(tmp_path):
    """benchmarks/based_forms.py at one tiny length: both forms timed, the table saved."""
    import based_forms

    assert based_forms.main(["--lens", "8", "--batch", "1", "--d_model", "16", "--n_heads", "2",
                             "--feature_dim", "4", "--dtypes", "float32", "--rounds", "1",
                             "--repeats", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "based_forms_cpu.json").read_text())["rows"]
    assert [r["T"] for r in rows] == [8]
    assert rows[0]["quadratic_ms"] > 0 and rows[0]["features_ms"] > 0
    assert "| float32 | 8 |" in (tmp_path / "based_forms_cpu.md").read_text()


def test_mla_ablation_baseline_is_mla_and_variants_train(tmp_path):
    """benchmarks/mla_ablation.py: its 'mla' variant computes MLA's numbers (same weights, same
    outputs), every variant refuses a decode cache, and a tiny run trains attention and two
    MLA variants and probes both layers' heads."""
    import jax
    import jax.numpy as jnp
    import mla_ablation
    from flax import nnx

    from layers.mla import MLA, MLAArgs
    from models.config_check import load_config

    cfg = load_config(None, ["model.d_model=32", "model.n_heads=4", "model.max_len=64",
                             "model.dtype=float32"]).model
    args = MLAArgs(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    x = jax.random.normal(jax.random.key(0), (2, 12, 32))
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    ref, _ = MLA(cfg, args, rngs=nnx.Rngs(3))(x, positions=pos)
    same = mla_ablation.variant_class("mla")(cfg, args, rngs=nnx.Rngs(3))
    got, _ = same(x, positions=pos)
    assert float(jnp.max(jnp.abs(got - ref))) <= 1e-5 * float(jnp.max(jnp.abs(ref)))
    for name in (v for v in mla_ablation.VARIANTS if v != "attention"):
        layer = mla_ablation.variant_class(name)(cfg, args, rngs=nnx.Rngs(3))
        assert layer(x, positions=pos)[0].shape == ref.shape
        with pytest.raises(ValueError, match="training-only"):
            layer(x, positions=pos, cache=layer.init_cache(2, 12))
    with pytest.raises(SystemExit, match="recall.py's"):
        mla_ablation.main(["--lrs", "1e-3"])

    assert mla_ablation.main(["--variants", "attention", "mla", "values_from_x", "--seeds", "0",
                              "--steps", "4", "--eval_every", "4", "--eval_batches", "1",
                              "--batch", "4", "--in_process", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mla_ablation_cpu.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["attention", "mla", "values_from_x"]
    for r in rows:   # 4 heads; attention probabilities
        assert len(r["prev"]) == len(r["value"]) == 4
        assert all(0 <= p <= 1 for p in r["prev"] + r["value"])
    assert "| values_from_x |" in (tmp_path / "mla_ablation_cpu.md").read_text()
    from layers.registry import MIXERS
    assert MIXERS["mla"].cls is MLA   # the registry is restored after the in-process runs


@pytest.mark.slow
def test_train_step_smoke(tmp_path):
    """benchmarks/train_step.py on a tiny gdn_swa preset: one row per variant, "auto" resolved
    and named for each mixer, the variant's backend applied to every mixer that takes it."""
    bench = _load("train_step")
    args = ["configs/presets/gdn_swa_125m.yaml", "--seq_len", "32", "--batch", "2",
            "--repeats", "1", "--variants", "auto", "xla", "tokamax", "--out", str(tmp_path),
            "--set", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
            "model.vocab_size=64", "model.mixer_args.gated_deltanet.n_heads=2",
            "model.mixer_args.swa.window=16"]
    assert bench.main(args) == 0
    rows = json.loads((tmp_path / "train_step_cpu.json").read_text())["rows"]
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"auto", "xla", "tokamax"}
    assert by["auto"]["backends"] == "gated_deltanet: xla, swa: xla"      # auto on this CPU
    assert by["tokamax"]["overrides"] == ["model.mixer_args.swa.backend=tokamax"]
    assert by["tokamax"]["backends"] == "gated_deltanet: xla, swa: tokamax"
    for r in rows:
        assert _positive(r["tokens_per_s"]) and math.isfinite(r["loss"])
    with pytest.raises(SystemExit, match="no mixer of this config takes that backend"):
        bench.main(args[:8] + ["splash_typo"] + args[11:])
