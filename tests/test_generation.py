"""Decoding: sampling rules, KV-cache decode vs. a cache-free forward, batching, stops, CLI.

One tiny float32 model serves most tests, and the prompts repeat so that XLA compiles few
shapes. init_std is large so that a random model's greedy continuations vary (with the
default 0.02 and tied embeddings it just repeats the last token, which would hide bugs).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import generate as cli
from models.config_check import load_config
from models.generation import cache_capacity, generate, sample_next
from models.lm import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dtype=float32", "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
        "model.max_len=64", "model.init_std=0.5", "model.mixers=[attn]"]
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [4, 4, 4, 4, 4, 4, 4, 4]]
N_NEW = 10


def tiny_model(*extra: str):
    cfg = load_config("configs/quickstart.yaml", [*TINY, *extra])
    return build_model(cfg.model, seed=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def swa_model():
    # Sliding window only: the ring buffer keeps 8 slots, so decode may run past max_len=32.
    return tiny_model("model.mixers=[swa]", "model.mixer_args.swa.window=8", "model.max_len=32",
                      "data.seq_len=32")


@pytest.fixture(scope="module")
def greedy(model):
    return generate(model, PROMPTS, max_new_tokens=N_NEW)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    # Jitted: one compile is cheaper than running the model op by op.
    return nnx.merge(graphdef, state)(tokens)[0]


def assert_greedy_consistent(model, prompts, outputs, tol=1e-4):
    """Each new token is the argmax of the logits a cache-free forward gives at its position.

    One forward over prompt + all new tokens gives, by causality, the same last-position
    logits as re-running the model on every prefix; rows are padded to one width so the
    check costs one call. `tol` absorbs float32 differences between the cached and the
    cache-free paths (a near tie may flip either way).
    """
    seqs = [list(p) + list(o) for p, o in zip(prompts, outputs, strict=True)]
    width = max(len(s) for s in seqs)
    arr = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        arr[i, :len(s)] = s
    graphdef, state = nnx.split(model)
    logits = np.asarray(_forward(graphdef, state, jnp.asarray(arr)))
    for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        for j, tok in enumerate(out):
            row = logits[i, len(prompt) + j - 1]
            assert row[tok] >= row.max() - tol, (i, j, tok, int(row.argmax()))


# ----------------------------------------------------------------------------- generate


def test_greedy_matches_cache_free_forward(model, greedy):
    assert [len(t) for t in greedy.tokens] == [N_NEW] * len(PROMPTS)
    assert greedy.new_tokens == N_NEW * len(PROMPTS)
    assert len({tuple(t) for t in greedy.tokens}) > 1  # the model does not just repeat itself
    assert_greedy_consistent(model, PROMPTS, greedy.tokens)
    assert greedy.cache_bytes == model.init_cache(len(PROMPTS), 64).nbytes
    assert greedy.prefill_seconds > 0 and greedy.decode_seconds > 0
    assert greedy.tokens_per_second == pytest.approx(greedy.new_tokens / greedy.decode_seconds)


def test_batch_of_different_lengths_matches_each_prompt_alone(model, greedy):
    # The longest prompt: in the batch, 5 of its tokens are fed by the decode loop (forced);
    # alone, all 8 go through prefill. (Every row is also checked against a cache-free
    # forward above.)
    alone = generate(model, [PROMPTS[2]], max_new_tokens=N_NEW)
    assert alone.tokens == [greedy.tokens[2]]


def test_top_k_1_sampling_is_greedy(model, greedy):
    out = generate(model, PROMPTS, max_new_tokens=N_NEW, temperature=1.3, top_k=1, seed=5)
    assert out.tokens == greedy.tokens


@pytest.mark.parametrize("stops", ["from_output", [4, 5]])
def test_stop_tokens_truncate_after_the_first_sampled_one(model, greedy, stops):
    # [4, 5] also sit in the prompts at positions the decode loop feeds (forced tokens): they
    # must not stop a row, only sampled ones do.
    stops = [greedy.tokens[0][3]] if stops == "from_output" else stops
    out = generate(model, PROMPTS, max_new_tokens=N_NEW, stop_tokens=stops)
    expected = []
    for row in greedy.tokens:
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        expected.append(row[:cut])
    assert out.tokens == expected
    assert out.new_tokens == sum(map(len, expected))


def test_zero_new_tokens(model):
    out = generate(model, PROMPTS, max_new_tokens=0)
    assert out.tokens == [[], [], []] and out.new_tokens == 0


def test_prompt_longer_than_cache_raises(model):
    with pytest.raises(ValueError, match=r"prompt of 60 tokens \+ max_new_tokens 10 = 70 "
                                         r"exceeds the cache length 64"):
        generate(model, [[1] * 60, [2]], max_new_tokens=10)
    with pytest.raises(ValueError, match=r"= 20 exceeds the cache length 16 \(raise --max_len"):
        generate(model, [[1] * 10], max_new_tokens=10, max_len=16)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, [[1]], max_new_tokens=1, max_len=65)


def test_windowed_model_decodes_past_max_len(swa_model):
    prompts = [[1, 2, 3, 4, 5], [7, 6]]
    out = generate(swa_model, prompts, max_new_tokens=40)
    assert [len(t) for t in out.tokens] == [40, 40]
    # The ring buffer (8 slots) must reproduce the windowed mask of a cache-free forward.
    assert_greedy_consistent(swa_model, prompts, out.tokens)


def test_cache_capacity(model, swa_model):
    shape = lambda m, n: jax.eval_shape(lambda: m.init_cache(2, n))  # noqa: E731
    assert cache_capacity(shape(model, 64)) == 64
    assert cache_capacity(shape(model, 16)) == 16
    assert cache_capacity(shape(swa_model, 32)) is None
    mixed = tiny_model("model.mixers=[swa, attn]", "model.mixer_args.swa.window=8")
    assert cache_capacity(shape(mixed, 48)) == 48


def test_every_growing_cache_reports_its_bound():
    """For each registered mixer: if its cache's bytes grow with max_len, it has one slot per
    position and generation must know where it ends (a prompt + new tokens beyond it would
    be clamped into the last slot, silently); a cache that does not grow is unbounded."""
    from layers.registry import MIXERS

    for name in MIXERS:
        m = tiny_model(f"model.mixers=[{name}]", "model.n_layers=1")
        shape = lambda n, m=m: jax.eval_shape(lambda: m.init_cache(1, n))  # noqa: E731
        small, large = shape(32), shape(64)
        grows = large.nbytes > small.nbytes
        assert cache_capacity(large) == (64 if grows else None), name
    # The quickstart (CCA, whose KV cache sits inside its own cache type) is bounded.
    assert cache_capacity(jax.eval_shape(
        lambda: build_model(load_config("configs/quickstart.yaml").model).init_cache(1, 40))) == 40


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "no prompts"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 128]], {}, "token id 128"),
    ([[-1]], {}, "token id -1"),
    ([[1]], {"stop_tokens": [500]}, "token id 500"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"temperature": -1.0}, "temperature"),
    ([[1]], {"max_new_tokens": -1}, "max_new_tokens"),
])
def test_bad_requests_raise(model, prompts, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, prompts, **kwargs)


# ----------------------------------------------------------------------------- sample_next


def draw(logits, n, **settings):
    """n samples per row of logits [R, V] -> [n, R] (one jitted call)."""
    fn = jax.jit(functools.partial(sample_next, **settings))
    batch = jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1))
    return np.asarray(fn(batch, jax.random.key(0))).reshape(n, -1)


def frequencies(samples, vocab):
    return np.bincount(samples.ravel(), minlength=vocab) / samples.size


RANDOM_LOGITS = np.random.default_rng(0).normal(size=(8, 50)) * 3


@pytest.mark.parametrize("settings", [
    {"temperature": 0.0, "top_k": 7, "top_p": 0.5},
    {"temperature": 1.0, "top_k": 1, "top_p": 1.0},
    {"temperature": 5.0, "top_k": 0, "top_p": 1e-6},
])
def test_degenerate_sampling_is_greedy(settings):
    out = draw(RANDOM_LOGITS, 16, **settings)
    assert (out == RANDOM_LOGITS.argmax(-1)).all()


def test_top_k_samples_only_the_k_best():
    out = draw(RANDOM_LOGITS, 512, temperature=2.0, top_k=5, top_p=1.0)
    top5 = np.argsort(-RANDOM_LOGITS, axis=-1)[:, :5]
    for r in range(RANDOM_LOGITS.shape[0]):
        assert set(out[:, r]) == set(top5[r])  # only the top 5, and (at 512 draws) all of them


# Loose bounds: with 20000 draws a frequency's standard error is <= 0.0036.
@pytest.mark.parametrize("settings, probs, expected", [
    # Plain temperature: softmax(logits / T).
    ({"temperature": 2.0, "top_k": 0, "top_p": 1.0}, [0.1, 0.2, 0.3, 0.4], None),
    # Nucleus: 0.4 + 0.3 >= 0.6 keeps two tokens, renormalized.
    ({"temperature": 1.0, "top_k": 0, "top_p": 0.6}, [0.1, 0.4, 0.2, 0.3], [0, 4 / 7, 0, 3 / 7]),
    # top_k=3 first (-> 4/9, 3/9, 2/9), then the nucleus of 0.6 over those keeps two.
    ({"temperature": 1.0, "top_k": 3, "top_p": 0.6}, [0.1, 0.4, 0.2, 0.3], [0, 4 / 7, 0, 3 / 7]),
    ({"temperature": 1.0, "top_k": 3, "top_p": 1.0}, [0.1, 0.4, 0.2, 0.3],
     [0, 4 / 9, 2 / 9, 3 / 9]),
])
def test_sampling_frequencies(settings, probs, expected):
    logits = np.log(np.array([probs]))
    if expected is None:
        expected = np.exp(logits[0] / settings["temperature"])
        expected /= expected.sum()
    freq = frequencies(draw(logits, 20000, **settings), 4)
    np.testing.assert_allclose(freq, expected, atol=0.02)


def test_sample_next_rejects_bad_settings():
    logits = jnp.zeros((1, 4))
    for bad in ({"temperature": -0.5}, {"top_k": -1}, {"top_p": 1.5}, {"top_p": 0.0}):
        settings = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **bad}
        with pytest.raises(ValueError):
            sample_next(logits, jax.random.key(0), **settings)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_runs_a_random_init_model():
    res = run_cli("--config", "configs/quickstart.yaml", "--prompt_tokens", "1 2 3",
                  "--max_new_tokens", "4")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "[0] prompt: 1 2 3"
    assert lines[1].startswith("[0] output: ") and len(lines[1].split()) == 2 + 4
    # The cache the CLI reports is the quickstart model's own, for its max_len (256) slots.
    cfg = load_config("configs/quickstart.yaml")
    nbytes = build_model(cfg.model).init_cache(1, cfg.model.max_len).nbytes
    assert "tokens/s" in lines[-1] and f"cache {cli.human_bytes(nbytes)}" in lines[-1]


def test_cli_prompt_too_long_is_one_error_line():
    res = run_cli("--config", "configs/quickstart.yaml", "--prompt_tokens", " ".join(["1"] * 250),
                  "--max_new_tokens", "10")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: prompt of 250 tokens"), res.stderr


@pytest.mark.parametrize("args, message", [
    (["--top_p", "1.5"], "--top_p"),
    (["--temperature", "-1"], "--temperature"),
    (["--max_new_tokens", "-3"], "--max_new_tokens"),
    (["--prompt", "hi"], "--prompt_tokens"),            # vocab 128: no text prompts
    (["--prompt_tokens", "1 x"], "'x' is not an integer"),
    (["--stop_token", "999"], "token id 999"),
    (["model.d_model=7"], "model.n_heads"),              # a ConfigError
    (["--step", "3"], "--step needs --run_dir"),
    (["--bogus"], "unrecognized arguments"),
])
def test_cli_user_errors(capsys, args, message):
    base = ["--config", "configs/quickstart.yaml", *TINY, "--max_new_tokens", "2"]
    if not any(a.startswith("--prompt") for a in args):
        base += ["--prompt_tokens", "1 2"]
    assert cli.main([*base, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_text_prompt_on_a_byte_vocabulary(capsys):
    argv = ["--config", "configs/quickstart.yaml", *TINY, "model.vocab_size=256",
            "--prompt", "héllo", "--prompt_tokens", "104,105", "--max_new_tokens", "3"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[0] prompt: 'héllo'" and out[1].startswith("[0] output: '")
    assert out[2] == "[1] prompt: 104 105"  # token prompts of a non-byte model stay ids


def test_cli_helpers():
    assert cli.parse_token_list(" 3, 17  5 ") == [3, 17, 5]
    assert cli.human_bytes(84_600) == "84.6 kB" and cli.human_bytes(999) == "999 B"
    assert cli.human_bytes(3.2e9) == "3.2 GB"
    assert cli.decode_bytes(list("hé".encode()) + [300, 0x41]) == "hé\ufffdA"
    assert cli.decode_bytes([0xC3]) == "\ufffd"  # a cut-off UTF-8 sequence


def test_cli_missing_run_dir_is_one_error_line(capsys, tmp_path):
    assert cli.main(["--run_dir", str(tmp_path / "nope"), "--prompt_tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0], err
