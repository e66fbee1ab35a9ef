"""Training: exact resume (in-process stop and a real SIGTERM), checkpoint retention, and
one-line errors for unreadable or mismatched checkpoints that leave the run dir untouched."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs import load_config
from training.checkpoint import CheckpointError, restore_for_inference
from training.loop import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.d_model=32", "model.n_heads=2", "model.vocab_size=32", "model.max_len=32",
         "data.seq_len=32", "data.batch_size=8", "data.num_kv_pairs=4", "optim.warmup_steps=2",
         "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
         "train.progress_bar=false", "model.mixers=[swa, attn]", "model.mixer_args.swa.window=8"]


def _cfg(run_dir, *extra):
    return load_config("configs/quickstart.yaml", SMALL + [f"run_dir={run_dir}", *extra])


def _losses(run_dir) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]   # a resumed run rewrites steps after its checkpoint
    return out


def _snapshot(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    train(_cfg(run_dir, "train.steps=12", "train.checkpoint_every=4",
               "train.keep_checkpoints=2"))
    return run_dir


def test_resume_after_stop_is_exact(uninterrupted, tmp_path):
    cfg = _cfg(tmp_path, "train.steps=12", "train.checkpoint_every=4",
               "train.keep_checkpoints=2")
    out = train(cfg, stop_at_step=7)
    assert out["step"] == 7
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "7"]
    train(cfg)
    straight, resumed = _losses(uninterrupted), _losses(tmp_path)
    assert sorted(resumed) == list(range(1, 13))
    for step in range(8, 13):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    # The losses did change over these steps: the comparison is not between constants.
    assert len({round(straight[s], 6) for s in range(8, 13)}) > 1


def test_keeps_only_the_newest_checkpoints(uninterrupted):
    assert sorted(int(p.name) for p in (uninterrupted / "checkpoints").iterdir()) == [8, 12]


def test_restore_for_inference_returns_the_trained_params(uninterrupted):
    cfg, model, step = restore_for_inference(str(uninterrupted))
    assert step == 12 and cfg.model.d_model == 32
    fresh = nnx.state(load_and_build(cfg), nnx.Param)
    trained = nnx.state(model, nnx.Param)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                         fresh, trained))
    assert max(diffs) > 1e-4   # training moved the weights and restore brought them back
    with pytest.raises(CheckpointError, match="no checkpoint at step 5 .available: 8, 12"):
        restore_for_inference(str(uninterrupted), step=5)
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_for_inference(str(uninterrupted / "nope"))


def load_and_build(cfg):
    from models import build_model
    return build_model(cfg.model, seed=cfg.train.seed)


def test_unreadable_checkpoint_is_an_error_and_nothing_is_lost(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    # Corrupt every data file of the newest checkpoint's params.
    for f in (run_dir / "checkpoints" / "12" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
            f.write_bytes(b"\x00garbage" * 4)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="step 12 .* is unreadable .*left in place"):
        train(_cfg(run_dir, "train.steps=20"))
    assert _snapshot(run_dir) == before


def test_checkpoint_of_another_model_is_refused(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="different model .model.d_model: 32 there, 64"):
        train(_cfg(run_dir, "train.steps=20", "model.d_model=64"))
    assert _snapshot(run_dir) == before


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches(uninterrupted, tmp_path):
    args = [sys.executable, "train.py", "configs/quickstart.yaml", *SMALL,
            f"run_dir={tmp_path}", "train.steps=12", "train.checkpoint_every=4",
            "train.keep_checkpoints=2"]
    # Poll metrics.jsonl and signal as soon as two steps are logged, well before step 12.
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            os.kill(proc.pid, signal.SIGTERM)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
    assert 2 <= stopped < 12
    assert f"stopping at step {stopped} (checkpoint saved)" in out + err
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    straight, resumed = _losses(uninterrupted), _losses(tmp_path)
    for step in range(stopped + 1, 13):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step


@pytest.mark.slow
def test_wandb_offline_logs_into_the_run_dir(tmp_path):
    train(_cfg(tmp_path, "train.steps=3", "wandb.mode=offline"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (tmp_path / "wandb_id").read_text().strip() in runs[0].name
    assert len(_losses(tmp_path)) == 3


@pytest.mark.slow
def test_generate_cli_from_a_run_dir(uninterrupted, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "generate.py", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    ok = run("--run_dir", str(uninterrupted), "--prompt_tokens", "1 2 3",
             "--max_new_tokens", "4")
    assert ok.returncode == 0, ok.stderr
    assert "tokens/s" in ok.stdout + ok.stderr
    for args, pattern in [(["--run_dir", str(tmp_path / "none")], "does not exist"),
                          (["--run_dir", str(tmp_path)], "has no checkpoint"),
                          (["--run_dir", str(uninterrupted), "--max_new_tokens", "40"],
                           "exceeds the cache length")]:
        bad = run(*args, "--prompt_tokens", "1 2 3")
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1, bad.stderr
        assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]


def test_foreign_data_state_is_an_error(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    for f in (run_dir / "checkpoints" / "12" / "data").rglob("*"):
        if f.is_file():
            f.write_text(json.dumps({"something": "else"}))
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="data-iterator state"):
        train(_cfg(run_dir, "train.steps=20"))
    assert _snapshot(run_dir) == before
