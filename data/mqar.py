"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology.

Reference: Arora et al., 2023, "Zoology: Measuring and improving recall in efficient language
models" (arXiv:2312.04927); the same task drives the Based experiments.

Layout of one example (a sequence of ``seq_len + 1`` tokens before the input/target shift)::

    k1 v1 k2 v2 ... kN vN | 0 0 k3 0 k1 0 0 0 ... k2 0 0 ...
    <--- pair region ---> <--------- query region --------->

* Token 0 is the filler ("noise") token and never a key or value.
* Keys are drawn without replacement from ``[1, V // 2)`` and values without replacement from
  ``[V // 2, V)``, so within an example every key and every value is distinct (as in Zoology):
  a value then identifies its key, and the answer to a query is unambiguous.
* Each key is queried exactly once. As in Zoology, the query region is divided into slots two
  tokens apart, ``space = (seq_len - 2N) // 2`` of them, and the N query slots are drawn without
  replacement from a power law over the gap ``g`` (slot index): ``p(g) ∝ a * (g + 1)**(a - 1)``
  with ``a = mqar_power_a``. Small ``a`` (the default 0.01) concentrates queries right after the
  pairs; ``a = 1`` spreads them uniformly over the query region.
* ``inputs`` is the sequence without its last token. ``targets`` is the next token everywhere
  except at query positions, where it is the queried key's value. The value is not written into
  the input stream (the slot after a query keeps the filler, as in Zoology), so the model sees
  a key and must produce its value. ``loss_mask`` is 1.0 exactly at the N query positions.

Every example is a pure function of ``(seed, split, index)``, so the source is map-style: any
example can be produced on its own, in any order, which is what makes the grain iterator state
a single integer.
"""

from __future__ import annotations

import numpy as np

from data.errors import DataError

TRAIN_SPLIT = 0
EVAL_SPLIT = 1
# Examples per split; far more than any run reads (2**40 / 64 = 1.7e10 steps of batch 64), yet
# still a plain int length for grain. The training pipeline repeats it anyway.
NUM_EXAMPLES = 2**40


def check_mqar_shape(seq_len: int, vocab_size: int, num_pairs: int, power_a: float) -> None:
    """Raises DataError unless an MQAR example with these numbers can be built.

    Args:
      seq_len: Model sequence length T.
      vocab_size: Model vocabulary size V.
      num_pairs: Number of key-value pairs N per example.
      power_a: Exponent of the query-placement power law.

    Raises:
      DataError: If N < 1, T < 4N (N pairs take 2N tokens and need N query slots two tokens
        apart), V < 2N + 2 (N distinct keys in [1, V//2) and N distinct values in [V//2, V)),
        or power_a <= 0.
    """
    if num_pairs < 1:
        raise DataError(f"data.num_kv_pairs must be >= 1 for MQAR, got {num_pairs}")
    if seq_len < 4 * num_pairs:
        raise DataError(
            f"MQAR with data.num_kv_pairs={num_pairs} needs data.seq_len >= {4 * num_pairs}, "
            f"got {seq_len}")
    if vocab_size < 2 * num_pairs + 2:
        raise DataError(
            f"MQAR with data.num_kv_pairs={num_pairs} needs vocab_size >= {2 * num_pairs + 2}, "
            f"got {vocab_size}")
    if not power_a > 0:
        raise DataError(f"data.mqar_power_a must be > 0, got {power_a}")


def query_gap_probs(seq_len: int, num_pairs: int, power_a: float) -> np.ndarray:
    """Zoology's power-law distribution over query slots (gaps after the pair region).

    Args:
      seq_len: Model sequence length T.
      num_pairs: Number of key-value pairs N.
      power_a: Exponent ``a`` of ``p(g) ∝ a * (g + 1)**(a - 1)``.

    Returns:
      float64 array of length ``(T - 2N) // 2`` summing to 1.
    """
    space = (seq_len - 2 * num_pairs) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def _distinct(rng: np.random.Generator, pool: int, n: int) -> np.ndarray:
    """n distinct integers from [0, pool), in random order."""
    # A permutation is ~3x cheaper than choice(replace=False) for small pools (this runs once
    # per example); choice's cost does not grow with the pool, so it wins for large ones.
    if pool <= 512:
        return rng.permutation(pool)[:n]
    return rng.choice(pool, size=n, replace=False)


class MQARSource:
    """Map-style source of MQAR examples: ``source[i]`` is example i of one split.

    Args:
      seq_len: Model sequence length T (examples hold T + 1 tokens before the shift).
      vocab_size: Model vocabulary size V.
      num_pairs: Key-value pairs per example N.
      power_a: Query-placement power-law exponent (Zoology's alpha).
      seed: Run seed (``data.seed``); any int, reduced mod 2**64.
      split: TRAIN_SPLIT or EVAL_SPLIT; the split id enters the per-example seed, so the two
        splits are independent random streams. That holds the eval sequences out in the sense
        that they are not the training sequences by construction; in a tiny task (few keys,
        short sequences) the same sequence can still occur in both by chance.
      length: Number of examples the source reports.

    Raises:
      DataError: If the shape is impossible (see ``check_mqar_shape``).
    """

    def __init__(self, seq_len: int, vocab_size: int, num_pairs: int, power_a: float,
                 seed: int, split: int, length: int = NUM_EXAMPLES):
        check_mqar_shape(seq_len, vocab_size, num_pairs, power_a)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.num_pairs = num_pairs
        self._seed = int(seed) % 2**64  # SeedSequence needs non-negative entropy
        self._split = int(split)
        self._length = int(length)
        self._probs = query_gap_probs(seq_len, num_pairs, power_a)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Builds example ``index``; see the module docstring for the layout.

        Returns:
          dict with ``inputs``/``targets`` int32 [T] and ``loss_mask`` float32 [T].
        """
        if not 0 <= index < self._length:
            raise IndexError(f"MQAR example index {index} out of range [0, {self._length})")
        rng = np.random.default_rng([self._seed, self._split, int(index)])
        n, half, T = self.num_pairs, self.vocab_size // 2, self.seq_len
        keys = _distinct(rng, half - 1, n) + 1
        values = _distinct(rng, self.vocab_size - half, n) + half
        # Weighted sampling without replacement by exponential race (Efraimidis & Spirakis):
        # the n smallest E_g / p(g) are distributed exactly as n successive draws without
        # replacement, as Zoology's np.random.choice(replace=False, p=p) does, at a fraction of
        # the cost (that choice loops in Python-level numpy calls: ~90 us per example).
        race = rng.exponential(size=self._probs.size) / self._probs
        gaps = np.argsort(race, kind="stable")[:n]
        query_pos = 2 * n + 2 * gaps  # input positions; at most T - 2, so always scored

        seq = np.zeros(T + 1, dtype=np.int32)
        seq[0:2 * n:2] = keys
        seq[1:2 * n:2] = values
        seq[query_pos] = keys
        inputs = seq[:-1]
        targets = seq[1:].copy()
        targets[query_pos] = values
        loss_mask = np.zeros(T, dtype=np.float32)
        loss_mask[query_pos] = 1.0
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}
