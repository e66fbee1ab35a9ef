"""grain pipelines over the data sources: the training iterator, eval batches and a summary.

Training: a map-style source -> (text only) ``shuffle`` -> ``repeat`` (infinite; grain reseeds
the shuffle every epoch) -> ``batch`` -> ``to_iter_dataset``. Because every stage is
map-style, the iterator's whole state is the index of the next batch (``{"next_index": n}``),
which is JSON-serializable and restores exactly into a freshly built iterator. Batches are
prefetched by a small thread pool in this process; there are no worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from data.errors import DataError
from data.mqar import EVAL_SPLIT, TRAIN_SPLIT, MQARSource, check_mqar_shape
from data.needle import NeedleSource, check_needle_shape
from data.stream import WindowSource
from data.text import TextSplits, open_splits

KINDS = ("mqar", "needle", "bytes", "tokens")
# Batches are assembled in prefetch threads; a few in flight hide the per-example Python cost
# behind the training step without holding many batches in memory.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


def stack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks example dicts into a batch: ``inputs``/``targets`` int32, ``loss_mask`` float32,
    and with packing ``segment_ids`` int32."""
    batch = {
        "inputs": np.stack([e["inputs"] for e in examples]).astype(np.int32, copy=False),
        "targets": np.stack([e["targets"] for e in examples]).astype(np.int32, copy=False),
        "loss_mask": np.stack([e["loss_mask"] for e in examples]).astype(np.float32,
                                                                         copy=False),
    }
    if "segment_ids" in examples[0]:
        batch["segment_ids"] = np.stack([e["segment_ids"] for e in examples]).astype(
            np.int32, copy=False)
    return batch


def _check_common(cfg, vocab_size: int) -> None:
    if cfg.kind not in KINDS:
        raise DataError(f"data.kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if cfg.seq_len < 1:
        raise DataError(f"data.seq_len must be >= 1, got {cfg.seq_len}")
    if cfg.batch_size < 1:
        raise DataError(f"data.batch_size must be >= 1, got {cfg.batch_size}")
    if vocab_size < 1:
        raise DataError(f"vocab_size must be >= 1, got {vocab_size}")


def _mqar_source(cfg, vocab_size: int, split: int) -> MQARSource:
    return MQARSource(cfg.seq_len, vocab_size, cfg.num_kv_pairs, cfg.mqar_power_a, cfg.seed,
                      split)


def _needle_source(cfg, vocab_size: int, split: int) -> NeedleSource:
    return NeedleSource(cfg.seq_len, vocab_size, cfg.needle_key_len, cfg.needle_value_len,
                        cfg.needle_filler, cfg.seed, split,
                        distractors=cfg.needle_distractors)


_SYNTHETIC = {"mqar": _mqar_source, "needle": _needle_source}


def _windows(splits: TextSplits, which: str, cfg, vocab_size: int) -> WindowSource:
    stream, lo, hi = splits.train if which == "train" else splits.eval
    key = "data.eval_path" if which == "eval" and cfg.eval_path is not None else "data.path"
    path = cfg.eval_path if key == "data.eval_path" else cfg.path
    # Bytes cannot exceed 255 and vocab_size >= 256 was checked, so only tokens need the
    # per-window id check.
    check = vocab_size if cfg.kind == "tokens" else None
    return WindowSource(stream, lo, hi, cfg.seq_len, check, f"{key} '{path}'",
                        packing=cfg.packing, eos_id=cfg.eos_id)


def make_train_iterator(cfg, vocab_size: int,
                        shard: tuple[int, int] = (0, 1)) -> grain.DatasetIterator:
    """Builds the infinite training iterator.

    MQAR and needle examples come in index order from the train split (each is already random,
    so no shuffle is needed). Text windows are shuffled with ``data.seed``, reshuffled every
    epoch.

    Multi-host (``shard = (index, count)``, one per process): process ``index`` reads examples
    ``index, index + count, ...`` of the (shuffled, repeated) example stream in batches of
    ``batch_size / count`` rows, so the ``count`` processes' n-th batches together hold exactly
    the single-process n-th batch's examples (in another row order), and no example is read
    twice.

    Args:
      cfg: The ``DataConfig``.
      vocab_size: Model vocabulary size.
      shard: ``(process index, process count)``; ``batch_size`` must be a multiple of the count.

    Returns:
      A grain ``DatasetIterator``; ``next(it)`` is a batch dict (``inputs``/``targets`` int32
      [B, T], ``loss_mask`` float32 [B, T]); ``it.get_state()`` is JSON-serializable and
      ``set_state`` on a fresh iterator from the same config resumes with the same batches.

    Raises:
      DataError: On bad data input (see ``data.text``, ``data.mqar`` and ``data.needle``).
    """
    _check_common(cfg, vocab_size)
    if cfg.kind in _SYNTHETIC:
        ds = grain.MapDataset.source(_SYNTHETIC[cfg.kind](cfg, vocab_size, TRAIN_SPLIT))
    else:
        windows = _windows(open_splits(cfg, vocab_size), "train", cfg, vocab_size)
        # grain's shuffle takes a 32-bit seed; it derives each epoch's seed from this one.
        ds = grain.MapDataset.source(windows).shuffle(seed=int(cfg.seed) % 2**32)
    index, count = shard
    if count < 1 or not 0 <= index < count or cfg.batch_size % count:
        raise DataError(f"data shard {index} of {count} is invalid for data.batch_size="
                        f"{cfg.batch_size} (need 0 <= index < count, batch a multiple of count)")
    ds = ds.repeat()
    if count > 1:
        ds = ds[index::count]
    ds = ds.batch(cfg.batch_size // count, drop_remainder=True, batch_fn=stack_examples)
    return iter(ds.to_iter_dataset(READ_OPTIONS))


def make_eval_batches(cfg, vocab_size: int, n_batches: int) -> list[dict[str, np.ndarray]]:
    """The first ``n_batches`` batches of the held-out split, in order (deterministic).

    MQAR and needle use the eval split's examples 0, 1, ...; text uses the held-out windows in
    stream order. If the held-out text has fewer than ``n_batches * batch_size`` windows it is
    cycled from the start, which also fills a batch when there is less than one batch of windows
    (repeated windows then carry extra weight in the eval mean).

    Args:
      cfg: The ``DataConfig``.
      vocab_size: Model vocabulary size.
      n_batches: Number of batches (>= 0).

    Returns:
      A list of batch dicts shaped like the training batches.

    Raises:
      DataError: On bad data input.
    """
    _check_common(cfg, vocab_size)
    if n_batches < 0:
        raise DataError(f"the number of eval batches must be >= 0, got {n_batches}")
    if cfg.kind in _SYNTHETIC:
        source = _SYNTHETIC[cfg.kind](cfg, vocab_size, EVAL_SPLIT)
        get = source.__getitem__
    else:
        windows = _windows(open_splits(cfg, vocab_size), "eval", cfg, vocab_size)
        def get(i: int) -> dict[str, np.ndarray]:
            return windows[i % len(windows)]  # cycles a split shorter than n_batches batches
    bs = cfg.batch_size
    return [stack_examples([get(b * bs + j) for j in range(bs)]) for b in range(n_batches)]


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe(cfg, vocab_size: int) -> str:
    """One-line summary of the data, e.g. ``"mqar: 8 pairs, seq 64, vocab 128"`` or
    ``"needle: key 1, value 1, random filler, seq 64, vocab 128"``.

    Text sizes come from the files (no token scan), e.g.
    ``"bytes: 3 files, 1.14 MB train / 60 kB eval (tail 5%), seq 256, vocab 256"``.

    Raises:
      DataError: On bad data input.
    """
    _check_common(cfg, vocab_size)
    if cfg.kind == "mqar":
        check_mqar_shape(cfg.seq_len, vocab_size, cfg.num_kv_pairs, cfg.mqar_power_a)
        return f"mqar: {cfg.num_kv_pairs} pairs, seq {cfg.seq_len}, vocab {vocab_size}"
    if cfg.kind == "needle":
        check_needle_shape(cfg.seq_len, vocab_size, cfg.needle_key_len, cfg.needle_value_len,
                           cfg.needle_filler, cfg.needle_distractors)
        return (f"needle: key {cfg.needle_key_len}, value {cfg.needle_value_len}, "
                f"{cfg.needle_filler} filler, {cfg.needle_distractors} distractors, "
                f"seq {cfg.seq_len}, vocab {vocab_size}")
    s = open_splits(cfg, vocab_size, check_ids=False)
    files = _plural(s.train_files, "file")
    held = (f"eval_path, {_plural(s.eval_files, 'file')}" if cfg.eval_path is not None
            else f"tail {cfg.eval_fraction:.0%}")
    if cfg.kind == "bytes":
        sizes = f"{_fmt_bytes(s.train_tokens)} train / {_fmt_bytes(s.eval_tokens)} eval"
    else:
        sizes = (f"{cfg.token_dtype}, {_fmt_count(s.train_tokens)} train / "
                 f"{_fmt_count(s.eval_tokens)} eval tokens")
    return f"{cfg.kind}: {files}, {sizes} ({held}), seq {cfg.seq_len}, vocab {vocab_size}"
