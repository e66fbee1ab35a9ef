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

from models.config_check import load_config
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


def _truncate_largest_array_file(step_dir: Path) -> Path:
    """Cuts the largest params data file of a checkpoint in half, as a crash mid-write or a
    full disk leaves it; returns that file."""
    files = [f for f in (step_dir / "params").rglob("*") if f.is_file() and "/d/" in str(f)]
    f = max(files, key=lambda f: f.stat().st_size)
    os.truncate(f, f.stat().st_size // 2)
    return f


def test_unreadable_newest_checkpoint_resumes_from_the_previous_one(uninterrupted, tmp_path,
                                                                    capfd):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    _truncate_largest_array_file(run_dir / "checkpoints" / "12")
    bad = {k: v for k, v in _snapshot(run_dir).items() if k.startswith("checkpoints/12/")}
    # Stop at 10, short of the unreadable step: it must still be in place, untouched, and the
    # keep-2 policy must have kept two readable checkpoints beside it.
    cfg = _cfg(run_dir, "train.steps=12", "train.checkpoint_every=2", "train.keep_checkpoints=2")
    assert train(cfg, stop_at_step=10)["step"] == 10
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "checkpoint step 12" in warnings[0] and "truncated" in warnings[0], warnings[0]
    assert "using step 8" in warnings[0] and "left it in place" in warnings[0]
    assert "<bound method" not in err and "TensorStore(" not in err
    now = _snapshot(run_dir)
    assert {k: v for k, v in now.items() if k.startswith("checkpoints/12/")} == bad
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()) == [8, 10, 12]
    # The steps after the readable checkpoint are the uninterrupted run's.
    straight, resumed = _losses(uninterrupted), _losses(run_dir)
    for step in range(9, 11):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    # Resumed again, the run reaches step 12: the unreadable checkpoint is moved aside
    # (bytes intact), not overwritten, and the new step 12 is the uninterrupted run's.
    train(cfg)
    assert "moved the unreadable checkpoint step 12" in capfd.readouterr().err
    moved = _snapshot(run_dir / "unreadable_checkpoints" / "12")
    assert {f"checkpoints/12/{k}": v for k, v in moved.items()} == bad
    resumed = _losses(run_dir)
    for step in range(11, 13):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    _, _, step = restore_for_inference(str(run_dir))
    assert step == 12


def test_a_changed_array_is_caught_by_its_checksum(uninterrupted, tmp_path, capfd):
    """A file whose bytes still decode but hold other numbers: only the checksum saved with
    the arrays can tell. Editing the saved sums is the same mismatch, made deterministic."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    meta = run_dir / "checkpoints" / "12" / "checksums" / "metadata"
    sums = json.loads(meta.read_text())
    name = sorted(k for k in sums if k.startswith("params/"))[0]
    sums[name][1] = (sums[name][1] + 1) % 2**32
    meta.write_text(json.dumps(sums))
    cfg, _, step = restore_for_inference(str(run_dir))
    err = capfd.readouterr().err
    assert step == 8, err
    assert f"array '{name.split('/', 1)[1]}' of params does not match the checksum" in err
    with pytest.raises(CheckpointError, match="step 12 .* does not match the checksum"):
        restore_for_inference(str(run_dir), step=12)


def test_checksums_see_one_changed_or_moved_element():
    from training.checkpoint import checksums

    x = np.arange(24, dtype=np.float32).reshape(4, 6)
    base = checksums("p", {"x": x, "n": np.int32(7)})
    changed = x.copy()
    changed[2, 3] = np.nextafter(changed[2, 3], np.float32(np.inf))   # one bit
    swapped = x.copy()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert checksums("p", {"x": changed})["p/x"] != base["p/x"]
    assert checksums("p", {"x": swapped})["p/x"][0] == base["p/x"][0]   # same words ...
    assert checksums("p", {"x": swapped})["p/x"][1] != base["p/x"][1]   # ... elsewhere
    assert checksums("p", {"x": x.copy()})["p/x"] == base["p/x"]


def test_no_readable_checkpoint_is_an_error_and_nothing_is_lost(uninterrupted, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    _truncate_largest_array_file(run_dir / "checkpoints" / "12")
    # Corrupt every data file of the older checkpoint's params.
    for f in (run_dir / "checkpoints" / "8" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "METADATA" not in f.name:
            f.write_bytes(b"\x00garbage" * 4)
    before = _snapshot(run_dir)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be read .step 12: array "
                                              ".* truncated.*; step 8: .*left in place") as e:
        train(_cfg(run_dir, "train.steps=20"))
    assert "<bound method" not in str(e.value)
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
    # An unreadable newest checkpoint: one warning line, and the previous step decodes.
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "bad")
    _truncate_largest_array_file(tmp_path / "bad" / "checkpoints" / "12")
    fallback = run("--run_dir", str(tmp_path / "bad"), "--prompt_tokens", "1 2 3",
                   "--max_new_tokens", "4")
    assert fallback.returncode == 0, fallback.stderr
    lines = fallback.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint step 12"), lines
    assert "truncated" in lines[0] and f"{tmp_path / 'bad'} step 8 |" in fallback.stdout


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


def test_asyncio_echoes_of_a_failed_read_are_dropped_and_nothing_else():
    """After one unreadable array, Orbax's other reads end as futures whose exception nobody
    retrieves, and asyncio logs each: those (a TensorStore status in the exception) are
    dropped; any other asyncio record still gets through."""
    import logging

    from training.checkpoint import _AsyncioEchoFilter

    keep = _AsyncioEchoFilter().filter
    record = lambda msg, exc=None: logging.LogRecord(  # noqa: E731
        "asyncio", logging.ERROR, __file__, 1, msg, None,
        (type(exc), exc, None) if exc is not None else None)
    lost = "Future exception was never retrieved"
    assert not keep(record(f"{lost}\nfuture: <Future finished exception="
                           "ValueError('OUT_OF_RANGE: Error reading \"params\"')>"))
    assert not keep(record(lost, ValueError("DATA_LOSS: checksum")))
    assert keep(record(f"{lost}\nfuture: <Future finished exception=ValueError('boom')>"))
    assert keep(record("Task was destroyed but it is pending!"))
