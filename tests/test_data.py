"""Tests of the data package: MQAR structure, text/token sources, grain state, errors."""

from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np
import pytest

import data.text
from configs.schema import DataConfig
from data import DataError, describe, make_eval_batches, make_train_iterator
from data.mqar import TRAIN_SPLIT, MQARSource


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def check_batch_shape(batch, cfg):
    shape = (cfg.batch_size, cfg.seq_len)
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == shape
    assert batch["targets"].dtype == np.int32 and batch["targets"].shape == shape
    assert batch["loss_mask"].dtype == np.float32 and batch["loss_mask"].shape == shape


def rows(batches):
    """All rows of `batches` as tuples of (inputs + last target), i.e. the full window."""
    out = []
    for b in batches:
        for x, y in zip(b["inputs"], b["targets"], strict=True):
            out.append(tuple(x.tolist()) + (int(y[-1]),))
    return out


def windows_of(tokens, seq_len):
    """Expected windows (T + 1 tokens, stride T) of a token sequence."""
    tokens = list(tokens)
    return [tuple(tokens[i:i + seq_len + 1])
            for i in range(0, len(tokens) - seq_len, seq_len)]


# ----------------------------------------------------------------------------- MQAR


def random_mqar_configs(n):
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(n):
        pairs = int(rng.integers(1, 9))
        seq_len = 4 * pairs + int(rng.integers(0, 40))
        vocab = 2 * pairs + 2 + int(rng.integers(0, 60))
        power_a = float(rng.choice([0.01, 0.1, 0.5, 1.0]))
        out.append((DataConfig(kind="mqar", seq_len=seq_len, batch_size=4, num_kv_pairs=pairs,
                               seed=int(rng.integers(0, 2**31)), mqar_power_a=power_a), vocab))
    return out


def check_mqar_row(inputs, targets, mask, n, vocab):
    half = vocab // 2
    keys, values = inputs[0:2 * n:2], inputs[1:2 * n:2]
    assert np.all((keys >= 1) & (keys < half)), keys
    assert np.all((values >= half) & (values < vocab)), values
    assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
    pair = dict(zip(keys.tolist(), values.tolist(), strict=True))
    assert np.all(mask[:2 * n] == 0)
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
    scored = np.flatnonzero(mask)
    assert scored.size == n
    # Every key is queried exactly once, with its own value as the target.
    assert sorted(inputs[scored].tolist()) == sorted(keys.tolist())
    for t in scored:
        assert targets[t] == pair[int(inputs[t])]
    # The query region holds only filler and the queries; elsewhere targets are next tokens.
    query_region = np.ones(inputs.size, bool)
    query_region[:2 * n] = False
    query_region[scored] = False
    assert np.all(inputs[query_region] == 0)
    unscored = np.setdiff1d(np.arange(inputs.size - 1), scored)
    np.testing.assert_array_equal(targets[unscored], inputs[unscored + 1])


@pytest.mark.parametrize("cfg,vocab", random_mqar_configs(12))
def test_mqar_structure_random_configs(cfg, vocab):
    it = make_train_iterator(cfg, vocab)
    for batch in take(it, 2) + make_eval_batches(cfg, vocab, 2):
        check_batch_shape(batch, cfg)
        for x, y, m in zip(batch["inputs"], batch["targets"], batch["loss_mask"], strict=True):
            check_mqar_row(x, y, m, cfg.num_kv_pairs, vocab)


def test_mqar_determinism_and_seeds():
    cfg = DataConfig(kind="mqar", seq_len=64, batch_size=8, num_kv_pairs=8, seed=3)
    a = take(make_train_iterator(cfg, 128), 3)
    b = take(make_train_iterator(cfg, 128), 3)
    assert_batches_equal(a, b)
    assert_batches_equal(make_eval_batches(cfg, 128, 2), make_eval_batches(cfg, 128, 2))
    other = take(make_train_iterator(dataclasses.replace(cfg, seed=4), 128), 3)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])
    # Held out: no eval sequence is a training sequence (random streams, large space here).
    train_rows = set(rows(take(make_train_iterator(cfg, 128), 20)))
    eval_rows = set(rows(make_eval_batches(cfg, 128, 20)))
    assert len(train_rows) == 160 and len(eval_rows) == 160
    assert not train_rows & eval_rows


def test_mqar_map_style_source_matches_iterator():
    cfg = DataConfig(kind="mqar", seq_len=32, batch_size=4, num_kv_pairs=4, seed=9)
    batches = take(make_train_iterator(cfg, 64), 3)
    src = MQARSource(32, 64, 4, cfg.mqar_power_a, 9, TRAIN_SPLIT)
    for i in reversed(range(12)):  # any order: each example stands alone
        ex = src[i]
        b, j = divmod(i, 4)
        for k in ex:
            np.testing.assert_array_equal(batches[b][k][j], ex[k])


def test_mqar_power_law_places_queries_near_pairs():
    def mean_query_offset(power_a):
        cfg = DataConfig(kind="mqar", seq_len=256, batch_size=64, num_kv_pairs=4,
                         mqar_power_a=power_a)
        mask = next(make_train_iterator(cfg, 64))["loss_mask"]
        return float(np.mean(np.nonzero(mask)[1]))

    near, uniform = mean_query_offset(0.01), mean_query_offset(1.0)
    # ~1/g over 124 slots: mean position ~60; uniform over positions 8..254: ~131.
    assert near < 80 < 110 < uniform


@pytest.mark.parametrize("seq_len,pairs,vocab,power_a,match", [
    (15, 4, 64, 0.01, "seq_len >= 16"),
    (16, 4, 9, 0.01, "vocab_size >= 10"),
    (16, 4, 64, 0.0, "mqar_power_a"),
    (16, 0, 64, 0.01, "num_kv_pairs"),
])
def test_mqar_impossible_shapes(seq_len, pairs, vocab, power_a, match):
    cfg = DataConfig(kind="mqar", seq_len=seq_len, batch_size=2, num_kv_pairs=pairs,
                     mqar_power_a=power_a)
    for call in (lambda: make_train_iterator(cfg, vocab),
                 lambda: make_eval_batches(cfg, vocab, 1), lambda: describe(cfg, vocab)):
        with pytest.raises(DataError, match=match):
            call()


def test_mqar_edge_shape_is_buildable():
    # The tightest shape the config allows: T = 4N and V = 2N + 2.
    cfg = DataConfig(kind="mqar", seq_len=12, batch_size=16, num_kv_pairs=3)
    for x, y, m in zip(*next(make_train_iterator(cfg, 8)).values(), strict=True):
        check_mqar_row(x, y, m, 3, 8)


def test_mqar_state_json_round_trip():
    cfg = DataConfig(kind="mqar", seq_len=32, batch_size=4, num_kv_pairs=4)
    it = make_train_iterator(cfg, 64)
    assert isinstance(it, grain.DatasetIterator)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    fresh = make_train_iterator(cfg, 64)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)
    it.set_state(state)  # rewinding a running iterator drops what it had prefetched
    assert_batches_equal(take(it, 4), expected)


def test_describe_mqar():
    cfg = DataConfig(kind="mqar", seq_len=64, num_kv_pairs=8)
    assert describe(cfg, 128) == "mqar: 8 pairs, seq 64, vocab 128"


# ----------------------------------------------------------------------------- text sources


def text_cfg(path, **kw):
    return DataConfig(**{"kind": "bytes", "path": str(path), "seq_len": 8, "batch_size": 4,
                         "eval_fraction": 0.2, **kw})


def split_point(n, frac):
    return n - int(n * frac)


def test_bytes_file_windows_and_split(tmp_path):
    rng = np.random.default_rng(0)
    content = rng.integers(0, 256, size=1000, dtype=np.uint8).tobytes()
    f = tmp_path / "corpus.txt"
    f.write_bytes(content)
    cfg = text_cfg(f, seq_len=16, batch_size=4)
    split = split_point(len(content), 0.2)
    train_windows = windows_of(content[:split], 16)
    eval_windows = windows_of(content[split:], 16)

    it = make_train_iterator(cfg, 256)
    batches = take(it, len(train_windows) // 4)
    for b in batches:
        check_batch_shape(b, cfg)
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        assert np.all(b["loss_mask"] == 1.0)
    got = rows(batches)
    assert len(set(got)) == len(got) and set(got) <= set(train_windows)

    n_eval = len(eval_windows) // 4
    assert rows(make_eval_batches(cfg, 256, n_eval)) == eval_windows[:4 * n_eval]
    assert describe(cfg, 256).startswith("bytes: 1 file, 800 B train / 200 B eval")


def test_bytes_directory_sorted_recursive_skips_hidden(tmp_path):
    files = {"b.txt": b"second file " * 5, "a/z.txt": "dé".encode() * 20,
             "a/b/c.md": b"deep" * 9, "a/empty": b"",  # empty: no extra separator
             ".hidden": b"XXXX" * 50, ".git/config": b"YYYY" * 50}
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    stream = b"\n".join(files[n] for n in ("a/b/c.md", "a/z.txt", "b.txt"))
    cfg = text_cfg(tmp_path, seq_len=8, batch_size=2, eval_fraction=0.25)
    split = split_point(len(stream), 0.25)
    n_eval = len(windows_of(stream[split:], 8))
    got = rows(make_eval_batches(cfg, 256, n_eval // 2))
    assert got == windows_of(stream[split:], 8)[:2 * (n_eval // 2)]
    train = rows(take(make_train_iterator(cfg, 256), 10))
    assert set(train) <= set(windows_of(stream[:split], 8))
    assert all(88 not in r and 89 not in r for r in train)  # no X/Y from hidden files
    assert describe(cfg, 256).startswith("bytes: 4 files")


def test_eval_path_holds_out_a_separate_stream(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"a" * 100)
    (tmp_path / "eval.txt").write_bytes(bytes(range(40)))
    cfg = text_cfg(tmp_path / "train.txt", eval_path=str(tmp_path / "eval.txt"))
    train = take(make_train_iterator(cfg, 256), 5)
    assert all(np.all(b["inputs"] == ord("a")) for b in train)
    assert rows(make_eval_batches(cfg, 256, 1)) == windows_of(bytes(range(40)), 8)[:4]
    assert "eval_path" in describe(cfg, 256)


def test_eval_cycles_a_short_split(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(range(100)))
    # 10 held-out tokens: exactly one window of 9, repeated to fill 2 batches of 4.
    cfg = text_cfg(f, eval_fraction=0.1)
    got = rows(make_eval_batches(cfg, 256, 2))
    assert got == [tuple(range(90, 99))] * 8


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_tokens_round_trip(tmp_path, dtype):
    vocab = 60000 if dtype == "uint16" else 200000
    rng = np.random.default_rng(5)
    ids = rng.integers(0, vocab, size=500).astype("<u2" if dtype == "uint16" else "<u4")
    (tmp_path / "ids.bin").write_bytes(ids.tobytes())
    cfg = text_cfg(tmp_path / "ids.bin", kind="tokens", token_dtype=dtype, seq_len=10)
    split = split_point(ids.size, 0.2)
    got = rows(take(make_train_iterator(cfg, vocab), 6))
    assert len(set(got)) == 24 and set(got) <= set(windows_of(ids[:split].tolist(), 10))
    assert rows(make_eval_batches(cfg, vocab, 2)) == windows_of(ids[split:].tolist(), 10)[:8]
    assert describe(cfg, vocab).startswith(f"tokens: 1 file, {dtype}, 400 train / 100 eval")


def test_tokens_directory_reads_only_bin_files_in_order(tmp_path):
    (tmp_path / "b.bin").write_bytes(np.arange(100, 150, dtype="<u2").tobytes())
    (tmp_path / "a.bin").write_bytes(np.arange(0, 50, dtype="<u2").tobytes())
    (tmp_path / "README.txt").write_text("not tokens")
    cfg = text_cfg(tmp_path, kind="tokens", eval_fraction=0.1)
    # No separator between token files: eval is the last 10 ids of b.bin.
    assert rows(make_eval_batches(cfg, 200, 1))[0] == tuple(range(140, 149))


def test_train_and_eval_windows_are_disjoint(tmp_path):
    ids = np.arange(1000, dtype="<u4")  # every id is its own stream position
    (tmp_path / "ids.bin").write_bytes(ids.tobytes())
    cfg = text_cfg(tmp_path / "ids.bin", kind="tokens", token_dtype="uint32", seq_len=7,
                   eval_fraction=0.3)
    split = split_point(1000, 0.3)
    train = np.array(rows(take(make_train_iterator(cfg, 1000), 60)))  # > 1 epoch of 99
    evals = np.array(rows(make_eval_batches(cfg, 1000, 10)))
    assert train.max() < split <= evals.min()
    assert len(set(map(tuple, train))) == 99  # every train window seen, none extra


def test_text_state_round_trip_across_epochs(tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / "train.bin").write_bytes(rng.integers(0, 256, 4 * 256 + 1, dtype=np.uint8))
    (tmp_path / "eval.bin").write_bytes(b"e" * 20)
    # 256 train windows of 5 bytes, 8 batches of 32 per epoch.
    cfg = text_cfg(tmp_path / "train.bin", eval_path=str(tmp_path / "eval.bin"), seq_len=4,
                   batch_size=32, seed=11)
    it = make_train_iterator(cfg, 256)
    first = take(it, 16)
    epoch1, epoch2 = rows(first)[:256], rows(first)[256:]
    assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == 256
    assert epoch1 != epoch2  # reshuffled each epoch
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 3)
    for mid in (6, 7, 12):  # mid-epoch states whose following batches cross a boundary
        src = make_train_iterator(cfg, 256)
        take(src, mid)
        fresh = make_train_iterator(cfg, 256)
        fresh.set_state(json.loads(json.dumps(src.get_state())))
        assert_batches_equal(take(fresh, 3), take(src, 3))
    fresh = make_train_iterator(cfg, 256)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)
    other = take(make_train_iterator(dataclasses.replace(cfg, seed=12), 256), 1)
    assert rows(other) != rows(first[:1])


# ----------------------------------------------------------------------------- errors


def assert_data_error(cfg, vocab, *needles):
    for call in (lambda: make_train_iterator(cfg, vocab),
                 lambda: make_eval_batches(cfg, vocab, 1)):
        with pytest.raises(DataError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg
        for needle in needles:
            assert needle in msg, (needle, msg)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    assert_data_error(text_cfg(missing), 256, f"data.path '{missing}' does not exist")
    (tmp_path / "ok.txt").write_bytes(b"x" * 100)
    cfg = text_cfg(tmp_path / "ok.txt", eval_path=str(missing))
    assert_data_error(cfg, 256, f"data.eval_path '{missing}' does not exist")
    assert_data_error(DataConfig(kind="bytes"), 256, "data.path is required")


def test_empty_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_bytes(b"x" * 100)
    assert_data_error(text_cfg(tmp_path / "empty"), 256, str(tmp_path / "empty"),
                      "no data files")
    (tmp_path / "only_txt").mkdir()
    (tmp_path / "only_txt" / "a.txt").write_bytes(b"x" * 100)
    assert_data_error(text_cfg(tmp_path / "only_txt", kind="tokens"), 256, "*.bin")
    (tmp_path / "e.txt").write_bytes(b"")
    assert_data_error(text_cfg(tmp_path / "e.txt"), 256, str(tmp_path / "e.txt"),
                      "empty file")


def test_too_short_streams(tmp_path):
    f = tmp_path / "short.txt"
    f.write_bytes(b"x" * 8)
    assert_data_error(text_cfg(f, eval_fraction=0.01), 256, str(f),
                      "train split has 8 tokens", "need at least 9")
    f.write_bytes(b"x" * 40)
    assert_data_error(text_cfg(f, eval_fraction=0.1), 256, "eval split has 4 tokens",
                      "need at least 9", "eval_fraction")


def test_token_id_beyond_vocab(tmp_path):
    f = tmp_path / "ids.bin"
    ids = np.arange(300, dtype="<u2")
    f.write_bytes(ids.tobytes())
    assert_data_error(text_cfg(f, kind="tokens"), 256, str(f), "max token id 299",
                      "vocab_size 256")


def test_token_id_beyond_vocab_outside_sample_fails_when_read(tmp_path, monkeypatch):
    monkeypatch.setattr(data.text, "ID_SAMPLE", 4)
    ids = np.zeros(400, dtype="<u2")
    ids[150] = 999  # in the train split, outside the first/last 4 sampled tokens
    (tmp_path / "ids.bin").write_bytes(ids.tobytes())
    it = make_train_iterator(text_cfg(tmp_path / "ids.bin", kind="tokens"), 256)
    with pytest.raises(DataError, match="token id 999"):
        take(it, 20)  # 39 windows per epoch: the bad one comes up within 2 epochs


def test_bad_token_file_size(tmp_path):
    f = tmp_path / "ids.bin"
    f.write_bytes(b"\x01" * 101)
    assert_data_error(text_cfg(f, kind="tokens"), 256, str(f), "101 bytes",
                      "multiple of 2")
    f.write_bytes(b"\x01" * 102)
    assert_data_error(text_cfg(f, kind="tokens", token_dtype="uint32"), 256,
                      "multiple of 4", "uint32")


def test_unreadable_file(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_bytes(b"x" * 100)

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.text, "open", deny, raising=False)
    assert_data_error(text_cfg(f), 256, "cannot be read", str(f), "Permission denied")


def test_bytes_needs_vocab_256(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"x" * 100)
    assert_data_error(text_cfg(f), 255, "vocab_size >= 256")
