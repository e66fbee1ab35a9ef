"""Needle in a haystack: one key-value needle hidden in filler, queried at the end.

A synthetic single-needle retrieval task (in the spirit of passkey retrieval, Mohtashami &
Jaggi 2023, and the needle-in-a-haystack tests of the Titans paper, Behrouz et al. 2024,
arXiv:2501.00663), built like ``data.mqar``: every example is a pure function of
``(seed, split, index)``, so the source is map-style and the grain iterator state is one int.

Shape legend: T = ``data.seq_len`` (model sequence length), V = vocabulary size,
K = ``data.needle_key_len``, L = ``data.needle_value_len``. One example is a sequence of
``T + 1`` tokens before the input/target shift::

    f f f ... f  k1..kK v1..vL  f f ... f  k1..kK  v1..vL
    <---------------- haystack: T + 1 - K - L tokens --->  <query>  <answer>
                 ^ needle at depth s

* Vocabulary split (disjoint ranges, so a token's range tells its role):
  filler ``[0, V // 4)``, key tokens ``[V // 4, V // 2)``, value tokens ``[V // 2, V)``.
  With V = 128: 32 filler, 32 key and 64 value tokens (chance accuracy on a value token 1/64).
* Filler (``data.needle_filler``): ``random`` draws every filler token i.i.d. uniformly from the
  filler range; ``constant`` uses token 0 throughout.
* The needle is K key tokens followed by L value tokens, each token i.i.d. uniform over its range
  (tokens may repeat within the key or the value). Its start ``s`` is uniform over every start
  that fits inside the haystack, ``[0, T + 1 - 2(K + L)]``, so depths spread evenly from the
  first token to right before the query. Key tokens occur only in the needle and the query, so
  the needle starts at the first key-range token of the sequence (``needle_start``).
* Distractors (``data.needle_distractors`` = D, default 0): D more key-value needles with keys
  different from the queried one, at random non-overlapping places in the haystack. With D = 0
  the first key-range token marks the needle, so a model need not compare keys at all; with
  D > 0 it must match the query's key against every needle it has read (harder, and closer
  to multi-key needle tests). ``needle_start`` finds the queried needle either way.
* The sequence ends with the query (the same K key tokens) followed by the answer (the same L
  value tokens).
* ``inputs`` is the sequence without its last token and ``targets`` the sequence without its
  first (the next token everywhere), as for MQAR. ``loss_mask`` is 1.0 exactly at the L input
  positions ``[T - L, T)`` whose targets are the answer tokens: the last query key token
  predicts v1, then v1 (teacher-forced) predicts v2, and so on. The last answer token is only a
  target, never an input, so with L = 1 the answer never appears after the query.

Eval at other lengths: the source (and ``data.pipeline.make_eval_batches``) builds examples of
any ``seq_len`` that holds the needle, query and answer, e.g.
``make_eval_batches(dataclasses.replace(cfg.data, seq_len=4 * cfg.data.seq_len), V, n)``.
"""

from __future__ import annotations

import numpy as np

from data.errors import DataError
from data.mqar import EVAL_SPLIT, NUM_EXAMPLES, TRAIN_SPLIT

__all__ = ["EVAL_SPLIT", "FILLERS", "TRAIN_SPLIT", "NeedleSource", "check_needle_shape",
           "needle_start", "token_ranges"]

FILLERS = ("random", "constant")


def token_ranges(vocab_size: int) -> dict[str, tuple[int, int]]:
    """The disjoint half-open token ranges: ``{"filler": (0, V//4), "key": (V//4, V//2),
    "value": (V//2, V)}``."""
    q, h = vocab_size // 4, vocab_size // 2
    return {"filler": (0, q), "key": (q, h), "value": (h, vocab_size)}


def check_needle_shape(seq_len: int, vocab_size: int, key_len: int, value_len: int,
                       filler: str, distractors: int = 0) -> None:
    """Raises DataError unless a needle example with these numbers can be built.

    Args:
      seq_len: Model sequence length T.
      vocab_size: Model vocabulary size V.
      key_len: Key tokens per needle K.
      value_len: Value tokens per needle L.
      filler: ``random`` or ``constant``.
      distractors: Extra needles D with other keys.

    Raises:
      DataError: If K < 1, L < 1, V < 4 (each of the three ranges needs a token),
        T < 2 (K + L) - 1 (the T + 1 tokens must hold the needle, the query and the answer),
        the filler kind is unknown, D < 0, the haystack cannot hold D + 1 needles, or the key
        range has fewer than D + 1 distinct keys.
    """
    if key_len < 1:
        raise DataError(f"data.needle_key_len must be >= 1, got {key_len}")
    if value_len < 1:
        raise DataError(f"data.needle_value_len must be >= 1, got {value_len}")
    if filler not in FILLERS:
        raise DataError(f"data.needle_filler must be one of {', '.join(FILLERS)}, "
                        f"got {filler!r}")
    if vocab_size < 4:
        raise DataError(f"the needle task needs vocab_size >= 4 (filler [0, V/4), keys "
                        f"[V/4, V/2), values [V/2, V) must each hold a token), got {vocab_size}")
    if distractors < 0:
        raise DataError(f"data.needle_distractors must be >= 0, got {distractors}")
    need = (distractors + 2) * (key_len + value_len) - 1
    if seq_len < need:
        raise DataError(
            f"the needle task with data.needle_key_len={key_len}, data.needle_value_len="
            f"{value_len} and data.needle_distractors={distractors} needs data.seq_len >= "
            f"{need} ({distractors + 1} needle(s), query and answer), got {seq_len}")
    lo, hi = token_ranges(vocab_size)["key"]
    if (hi - lo) ** key_len < distractors + 1:
        raise DataError(f"data.needle_distractors={distractors} needs {distractors + 1} distinct "
                        f"keys, but vocab_size={vocab_size} has only {hi - lo} key tokens")


def needle_start(inputs: np.ndarray, vocab_size: int, key_len: int = 1,
                 value_len: int = 1) -> np.ndarray:
    """Start position of the queried needle in each row: the first place its key occurs.

    Args:
      inputs: int [..., T] needle-task inputs.
      vocab_size: Vocabulary size V (unused; kept so callers need not change).
      key_len: Key tokens per needle K.
      value_len: Value tokens per needle L.

    Returns:
      int64 [...]: the queried needle's start index s in each row.
    """
    del vocab_size
    inputs = np.asarray(inputs)
    t = inputs.shape[-1]
    q0 = t + 1 - key_len - value_len                       # where the query key starts
    query = inputs[..., q0:q0 + key_len]                   # [..., K]
    windows = np.lib.stride_tricks.sliding_window_view(inputs[..., :q0], key_len, axis=-1)
    match = np.all(windows == query[..., None, :], axis=-1)  # [..., q0 - K + 1]
    return np.argmax(match, axis=-1)


class NeedleSource:
    """Map-style source of needle examples: ``source[i]`` is example i of one split.

    Args:
      seq_len: Model sequence length T (examples hold T + 1 tokens before the shift).
      vocab_size: Vocabulary size V.
      key_len: Key tokens per needle K.
      value_len: Value tokens per needle L.
      filler: ``random`` (i.i.d. filler tokens) or ``constant`` (token 0).
      distractors: Extra needles D with other keys (see the module docstring).
      seed: Run seed (``data.seed``); any int, reduced mod 2**64.
      split: TRAIN_SPLIT or EVAL_SPLIT; enters the per-example seed (independent streams).
      length: Number of examples the source reports.

    Raises:
      DataError: If the shape is impossible (see ``check_needle_shape``).
    """

    def __init__(self, seq_len: int, vocab_size: int, key_len: int, value_len: int,
                 filler: str, seed: int, split: int, length: int = NUM_EXAMPLES,
                 distractors: int = 0):
        check_needle_shape(seq_len, vocab_size, key_len, value_len, filler, distractors)
        self.distractors = distractors
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.key_len = key_len
        self.value_len = value_len
        self.filler = filler
        self._ranges = token_ranges(vocab_size)
        self._seed = int(seed) % 2**64  # SeedSequence needs non-negative entropy
        self._split = int(split)
        self._length = int(length)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Builds example ``index``; see the module docstring for the layout.

        Returns:
          dict with ``inputs``/``targets`` int32 [T] and ``loss_mask`` float32 [T].
        """
        if not 0 <= index < self._length:
            raise IndexError(f"needle example index {index} out of range [0, {self._length})")
        rng = np.random.default_rng([self._seed, self._split, int(index)])
        T, K, L = self.seq_len, self.key_len, self.value_len
        n = self.distractors + 1
        keys: list[tuple[int, ...]] = []
        while len(keys) < n:   # n distinct keys (checked possible at construction)
            key = tuple(rng.integers(*self._ranges["key"], size=K).tolist())
            if key not in keys:
                keys.append(key)
        values = rng.integers(*self._ranges["value"], size=(n, L), dtype=np.int32)
        # n non-overlapping needles in the haystack of T + 1 - K - L tokens: sorted offsets
        # into the free room, each shifted past the needles before it. With n = 1 the start is
        # uniform over [0, T + 1 - 2(K + L)].
        room = T + 1 - (n + 1) * (K + L)
        starts = np.sort(rng.integers(0, room + 1, size=n)) + np.arange(n) * (K + L)
        queried = int(rng.integers(0, n))
        if self.filler == "random":
            seq = rng.integers(*self._ranges["filler"], size=T + 1, dtype=np.int32)
        else:
            seq = np.zeros(T + 1, dtype=np.int32)
        for i, start in enumerate(starts.tolist()):
            seq[start:start + K] = keys[i]
            seq[start + K:start + K + L] = values[i]
        key, value = np.asarray(keys[queried], np.int32), values[queried]
        seq[T + 1 - K - L:T + 1 - L] = key
        seq[T + 1 - L:] = value
        loss_mask = np.zeros(T, dtype=np.float32)
        loss_mask[T - L:] = 1.0
        return {"inputs": seq[:-1], "targets": seq[1:].copy(), "loss_mask": loss_mask}
