"""Training and evaluation data for mnemax.

Four sources, chosen by ``data.kind``:

* ``mqar``: multi-query associative recall, the synthetic recall task of Zoology (Arora et al.,
  2023, "Zoology: Measuring and improving recall in efficient language models"); see
  ``data.mqar``.
* ``needle``: needle in a haystack, one key-value needle in filler queried at the end (only the
  answer is scored); any ``seq_len``, so a model trained at one length is evaluated at others;
  see ``data.needle``.
* ``bytes``: raw bytes of a text file or directory (vocabulary 256); see ``data.text``.
* ``tokens``: a flat binary file (or directory of ``*.bin``) of uint16/uint32 token ids.

Public API::

    it = make_train_iterator(cfg.data, vocab_size)   # infinite grain iterator of batches
    state = it.get_state(); it.set_state(state)      # JSON-serializable, exact resume
    batches = make_eval_batches(cfg.data, vocab_size, n_batches)
    describe(cfg.data, vocab_size)                   # one-line summary

A batch is a dict of numpy arrays: ``inputs`` and ``targets`` int32 [B, T] and ``loss_mask``
float32 [B, T] (1.0 where the position is scored). Bad input raises ``DataError``.
"""

from data.errors import DataError
from data.pipeline import describe, make_eval_batches, make_train_iterator

__all__ = ["DataError", "describe", "make_eval_batches", "make_train_iterator"]
