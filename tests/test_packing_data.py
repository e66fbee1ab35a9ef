"""Packed documents from the data pipelines to a trained LM: segment ids and loss masks of the
bytes / tokens windows, the config checks, and an LM trained on packed byte text whose
first token of each document has the loss of a fresh context (nothing leaks across).

Shape legend: B batch, T sequence length.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ConfigError
from configs.schema import DataConfig
from data.pipeline import make_eval_batches
from data.stream import WindowSource
from data.text import open_stream
from models.config_check import load_config


def test_bytes_windows_mark_files_as_documents(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"aaaa")
    (tmp_path / "b.txt").write_bytes(b"bbbbbb")
    stream, _ = open_stream(str(tmp_path), "data.path", "bytes", "uint16")
    win = WindowSource(stream, 0, stream.size, 8, packing=True)[0]
    # Stream: a a a a \n b b b b b b; the newline joining the files opens document 2.
    assert bytes(win["inputs"].astype(np.uint8)) == b"aaaa\nbbb"
    assert list(win["segment_ids"]) == [1, 1, 1, 1, 2, 2, 2, 2]
    # Only the target that crosses into document 2 ('a' -> '\n') is not scored.
    assert list(win["loss_mask"]) == [1, 1, 1, 0, 1, 1, 1, 1]
    # Without packing: one segment and every target scored (the default path is unchanged).
    plain = WindowSource(stream, 0, stream.size, 8)[0]
    assert "segment_ids" not in plain and plain["loss_mask"].all()


def test_token_windows_split_at_eos_and_files(tmp_path):
    np.array([5, 6, 0, 7, 8], "<u2").tofile(tmp_path / "a.bin")
    np.array([9, 3, 0, 4], "<u2").tofile(tmp_path / "b.bin")
    stream, _ = open_stream(str(tmp_path), "data.path", "tokens", "uint16")
    win = WindowSource(stream, 0, stream.size, 8, packing=True, eos_id=0)[0]
    # Tokens 5 6 | 0 7 8 | 9 3 | 0 (4): eos opens a document, and so does the second file.
    assert list(win["inputs"]) == [5, 6, 0, 7, 8, 9, 3, 0]
    assert list(win["segment_ids"]) == [1, 1, 2, 2, 2, 3, 3, 4]
    assert list(win["loss_mask"]) == [1, 0, 1, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("over, message", [
    (["data.packing=true"], "data.packing needs data.kind 'bytes' or 'tokens'"),
    (["data.kind=tokens", "data.path=x", "data.eos_id=3"], "data.eos_id separates documents"),
    (["data.kind=tokens", "data.path=x", "data.packing=true", "data.eos_id=999",
      "model.vocab_size=64"], "data.eos_id=999 must be in"),
])
def test_packing_config_errors(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.yaml", over)


def packing_bench():
    """benchmarks/packing.py as a module (benchmarks/common.py loads the scripts)."""
    import sys
    from pathlib import Path

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    from common import load_bench

    return load_bench("packing")


def corpus(path):
    """Short byte documents (benchmarks/packing.py's corpus)."""
    return packing_bench().short_documents(path, 60)


@pytest.mark.slow
def test_trained_packed_lm_first_tokens_see_a_fresh_context(tmp_path):
    from flax import nnx

    from training.checkpoint import restore_for_inference
    from training.loop import train

    text = corpus(tmp_path / "docs")
    over = ["data.kind=bytes", f"data.path={text}", "data.packing=true", "data.seq_len=64",
            "data.batch_size=8", "model.vocab_size=256", "model.d_model=32", "model.n_heads=2",
            "model.d_ff=64", "model.max_len=64", "model.dtype=float32",
            "model.mixers=[gated_deltanet,swa]", "model.n_layers=2",
            "model.mixer_args.swa.window=16", "model.mixer_args.gated_deltanet.chunk_size=16",
            "train.steps=60", "train.eval_every=60", "train.eval_batches=1",
            "train.progress_bar=false", "optim.lr=1e-2", "optim.warmup_steps=5",
            f"run_dir={tmp_path / 'run'}"]
    cfg = load_config("configs/quickstart.yaml", over)
    train(cfg)
    cfg, model, _ = restore_for_inference(str(tmp_path / "run"))
    graphdef, params = nnx.split(model)
    batch = make_eval_batches(cfg.data, cfg.model.vocab_size, 1)[0]
    tokens, targets, seg = (jnp.asarray(batch[k]) for k in ("inputs", "targets", "segment_ids"))

    @jax.jit
    def token_losses(params, tokens, targets, seg):
        logits, _ = nnx.merge(graphdef, params)(tokens, segment_ids=seg)
        logz = jax.nn.logsumexp(logits, -1)
        return logz - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]

    packed = token_losses(params, tokens, targets, seg)
    unpacked = token_losses(params, tokens, targets, jnp.ones_like(seg))
    fresh = []
    for r in range(tokens.shape[0]):
        s = np.asarray(seg[r])
        for start in np.flatnonzero(np.diff(s)) + 1:   # each document start inside the row
            stop = start + int((s == s[start]).sum())
            alone = token_losses(params, tokens[r:r + 1, start:stop],
                                 targets[r:r + 1, start:stop], jnp.ones((1, stop - start), int))
            fresh.append((float(packed[r, start]), float(alone[0, 0]),
                          float(unpacked[r, start])))
    assert len(fresh) >= 8
    got, want, leaky = np.array(fresh).T
    # The first token of every document: the loss of the document alone (fresh context)...
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # ...which the same rows run as one sequence do not give (the previous document leaks).
    assert np.abs(leaky - want).max() > 1e-2
    # Eval is scored over real targets only: the crossing targets are masked.
    assert float(batch["loss_mask"].sum()) < batch["loss_mask"].size


def test_packing_benchmark_smoke(tmp_path):
    import json

    bench = packing_bench()
    assert bench.main(["--docs", "30", "--steps", "4", "--repeats", "1", "--seq_len", "32",
                       "--batch", "4", "--d_model", "32", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "packing_cpu.json").read_text())
    assert res["ratio"] > 0 and len(res["tokens_per_s"]["True"]) == 1


def test_data_config_has_packing_defaults():
    d = DataConfig()
    assert d.packing is False and d.eos_id is None
