"""Tests of the needle-in-a-haystack task: layout, determinism, depth, errors, grain state."""

from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np
import pytest

from configs.schema import CONFIG_DIR, ConfigError, DataConfig
from data import DataError, describe, make_eval_batches, make_train_iterator
from data.needle import TRAIN_SPLIT, NeedleSource, needle_start, token_ranges
from models.config_check import load_config

NEEDLE_YAML = CONFIG_DIR / "needle.yaml"


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def needle_cfg(**kw):
    return DataConfig(**{"kind": "needle", "seq_len": 32, "batch_size": 4, **kw})


def check_needle_row(inputs, targets, mask, cfg, vocab):
    T, K, L = cfg.seq_len, cfg.needle_key_len, cfg.needle_value_len
    r = token_ranges(vocab)
    seq = np.concatenate([inputs, targets[-1:]])  # the full T + 1 tokens
    np.testing.assert_array_equal(targets[:-1], inputs[1:])  # next token everywhere
    # Mask: exactly the L answer positions at the end.
    expected_mask = np.zeros(T, np.float32)
    expected_mask[T - L:] = 1.0
    np.testing.assert_array_equal(mask, expected_mask)
    # The needle is where the query's key first occurs; its key and value follow.
    s = int(needle_start(inputs, vocab, K, L))
    assert 0 <= s <= T + 1 - 2 * (K + L)
    key, value = seq[s:s + K], seq[s + K:s + K + L]
    assert np.all((key >= r["key"][0]) & (key < r["key"][1])), key
    assert np.all((value >= r["value"][0]) & (value < r["value"][1])), value
    # Query at the end repeats the key; the scored targets are the value after the needle key.
    np.testing.assert_array_equal(seq[T + 1 - K - L:T + 1 - L], key)
    np.testing.assert_array_equal(targets[mask == 1.0], value)
    # Everything else is filler from the filler range (token 0 for constant filler).
    rest = np.ones(T + 1, bool)
    rest[s:s + K + L] = False
    rest[T + 1 - K - L:] = False
    filler = seq[rest]
    if cfg.needle_filler == "constant":
        assert np.all(filler == 0)
    else:
        assert np.all((filler >= r["filler"][0]) & (filler < r["filler"][1]))
    # Key tokens appear only in the needle and the query.
    is_key = (seq >= r["key"][0]) & (seq < r["key"][1])
    assert is_key.sum() == 2 * K


def random_needle_configs(n):
    rng = np.random.default_rng(77)
    out = []
    for _ in range(n):
        k, v = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        seq_len = 2 * (k + v) - 1 + int(rng.integers(0, 40))
        vocab = 4 + int(rng.integers(0, 200))
        filler = str(rng.choice(["random", "constant"]))
        out.append((needle_cfg(seq_len=seq_len, needle_key_len=k, needle_value_len=v,
                               needle_filler=filler, seed=int(rng.integers(0, 2**31))), vocab))
    return out


@pytest.mark.parametrize("cfg,vocab", random_needle_configs(8))
def test_needle_structure_random_configs(cfg, vocab):
    for batch in take(make_train_iterator(cfg, vocab), 2) + make_eval_batches(cfg, vocab, 2):
        shape = (cfg.batch_size, cfg.seq_len)
        assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == shape
        assert batch["targets"].dtype == np.int32 and batch["targets"].shape == shape
        assert batch["loss_mask"].dtype == np.float32 and batch["loss_mask"].shape == shape
        for x, y, m in zip(batch["inputs"], batch["targets"], batch["loss_mask"], strict=True):
            check_needle_row(x, y, m, cfg, vocab)


def test_tightest_shape_and_tiny_vocab():
    # T = 2(K + L) - 1: the needle sits at 0 and the query follows it directly; V = 4.
    cfg = needle_cfg(seq_len=7, needle_key_len=2, needle_value_len=2, batch_size=8)
    for x, y, m in zip(*next(make_train_iterator(cfg, 4)).values(), strict=True):
        check_needle_row(x, y, m, cfg, 4)
        assert needle_start(x, 4, 2, 2) == 0


def test_determinism_seeds_and_held_out():
    cfg = needle_cfg(seq_len=64, batch_size=8, seed=3)
    a = take(make_train_iterator(cfg, 128), 3)
    assert_batches_equal(a, take(make_train_iterator(cfg, 128), 3))
    assert_batches_equal(make_eval_batches(cfg, 128, 2), make_eval_batches(cfg, 128, 2))
    other = take(make_train_iterator(dataclasses.replace(cfg, seed=4), 128), 1)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])
    train = {tuple(r) for b in a for r in b["inputs"].tolist()}
    evals = {tuple(r) for b in make_eval_batches(cfg, 128, 3) for r in b["inputs"].tolist()}
    assert len(train) == 24 and len(evals) == 24 and not train & evals


def test_map_style_source_matches_iterator():
    cfg = needle_cfg(seq_len=24, needle_key_len=2, needle_value_len=3, seed=9)
    batches = take(make_train_iterator(cfg, 64), 3)
    src = NeedleSource(24, 64, 2, 3, "random", 9, TRAIN_SPLIT)
    for i in reversed(range(12)):  # any order: each example stands alone
        b, j = divmod(i, 4)
        for k, v in src[i].items():
            np.testing.assert_array_equal(batches[b][k][j], v)
    with pytest.raises(IndexError):
        src[-1]


def test_depth_spreads_over_the_sequence():
    cfg = needle_cfg(seq_len=64, batch_size=512)
    inputs = next(make_train_iterator(cfg, 128))["inputs"]
    starts = needle_start(inputs, 128)
    last = 64 + 1 - 2 * 2  # the latest start that fits: 61
    assert starts.min() == 0 and starts.max() == last
    # Roughly uniform: each quarter of the depth range holds about a quarter of the needles.
    counts = np.histogram(starts, bins=4, range=(0, last + 1))[0]
    assert np.all(np.abs(counts - 128) < 40), counts


def test_other_lengths_for_eval():
    cfg = needle_cfg(seq_len=16, needle_value_len=2)
    for n in (16, 64, 256):
        long = dataclasses.replace(cfg, seq_len=n)
        (batch,) = make_eval_batches(long, 32, 1)
        assert batch["inputs"].shape == (4, n)
        for x, y, m in zip(batch["inputs"], batch["targets"], batch["loss_mask"], strict=True):
            check_needle_row(x, y, m, long, 32)


def test_state_json_round_trip():
    cfg = needle_cfg()
    it = make_train_iterator(cfg, 64)
    assert isinstance(it, grain.DatasetIterator)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    fresh = make_train_iterator(cfg, 64)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)


def test_describe():
    cfg = needle_cfg(seq_len=64, needle_value_len=2, needle_filler="constant",
                     needle_distractors=3)
    text = describe(cfg, 128)
    assert text.startswith("needle:") and "value 2" in text and "constant filler" in text
    assert "3 distractors" in text and "seq 64" in text and "vocab 128" in text


@pytest.mark.parametrize("kw,vocab,match", [
    ({"seq_len": 6, "needle_key_len": 2, "needle_value_len": 2}, 64, "data.seq_len >= 7"),
    ({}, 3, "vocab_size >= 4"),
    ({"needle_key_len": 0}, 64, "data.needle_key_len must be >= 1"),
    ({"needle_value_len": 0}, 64, "data.needle_value_len must be >= 1"),
    ({"needle_filler": "zeros"}, 64, "data.needle_filler must be one of random, constant"),
])
def test_impossible_shapes_are_one_line_data_errors(kw, vocab, match):
    cfg = needle_cfg(**kw)
    for call in (lambda: make_train_iterator(cfg, vocab),
                 lambda: make_eval_batches(cfg, vocab, 1), lambda: describe(cfg, vocab)):
        with pytest.raises(DataError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("override,match", [
    ("data.seq_len=8", "data.seq_len=8 is too short for the needle task"),
    ("model.vocab_size=3", "model.vocab_size=3 is too small for the needle task"),
    ("data.needle_key_len=0", "data.needle_key_len must be > 0"),
    ("data.needle_filler=zeros", "data.needle_filler: expected one of 'random', 'constant'"),
])
def test_bad_configs_are_one_line_config_errors(override, match):
    over = [override, "data.needle_key_len=2", "data.needle_value_len=3"]
    if override.startswith("data.needle_key_len"):
        over = [override]
    with pytest.raises(ConfigError, match=match) as info:
        load_config(NEEDLE_YAML, over)
    assert "\n" not in str(info.value)


def test_shipped_config():
    cfg = load_config(NEEDLE_YAML)
    assert cfg.data.kind == "needle" and cfg.model.mixers == ("swa",)
    assert cfg.model.max_len >= 16 * cfg.data.seq_len  # room for the 16x eval


@pytest.mark.parametrize("key_len,value_len,distractors", [(1, 1, 3), (2, 2, 2), (1, 3, 5)])
def test_distractors_are_distinct_needles_and_the_query_matches_one(key_len, value_len,
                                                                    distractors):
    T, V = 40, 64
    src = NeedleSource(T, V, key_len, value_len, "random", 5, TRAIN_SPLIT,
                       distractors=distractors)
    lo, hi = token_ranges(V)["key"]
    K, L = key_len, value_len
    for i in range(50):
        ex = src[i]
        seq = np.concatenate([ex["inputs"], ex["targets"][-1:]])
        hay = seq[:T + 1 - K - L]
        # Needles: maximal runs starting at key-range tokens, K keys then L values.
        is_key = (hay >= lo) & (hay < hi)
        starts = [p for p in range(len(hay)) if is_key[p] and (p == 0 or not is_key[p - 1])]
        assert len(starts) == distractors + 1
        keys = [tuple(hay[p:p + K]) for p in starts]
        assert len(set(keys)) == len(keys)
        query = tuple(seq[T + 1 - K - L:T + 1 - L])
        hit = keys.index(query)
        # The answer is the value of the needle whose key the query repeats.
        np.testing.assert_array_equal(seq[-L:], hay[starts[hit] + K:starts[hit] + K + L])
        assert needle_start(ex["inputs"], V, K, L) == starts[hit]


def test_too_many_distractors_is_one_clear_error():
    with pytest.raises(DataError, match="needle_distractors=9 needs data.seq_len >= 21"):
        NeedleSource(16, 64, 1, 1, "random", 0, TRAIN_SPLIT, distractors=9)
    with pytest.raises(DataError, match="distinct keys"):
        NeedleSource(64, 8, 1, 1, "random", 0, TRAIN_SPLIT, distractors=3)
