"""A token stream over one or more arrays (usually memory maps) and its fixed-length windows.

Files are never concatenated in memory: a ``TokenStream`` keeps the per-file arrays (and the
separators between them) as parts and copies out only the slice a window asks for, so a
multi-gigabyte corpus costs address space, not RAM.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.errors import DataError


class TokenStream:
    """Read-only virtual concatenation of 1-D integer arrays.

    Args:
      parts: The arrays, in stream order (empty arrays are allowed and contribute nothing).
      doc_starts: Sorted stream positions where a new document begins (besides position 0):
        for bytes the separator joining two files, for tokens each later file's first token.
    """

    def __init__(self, parts: Sequence[np.ndarray], doc_starts: Sequence[int] = ()):
        self.doc_starts = np.asarray(doc_starts, dtype=np.int64)
        self._parts = [p for p in parts if p.size]
        sizes = np.array([p.size for p in self._parts], dtype=np.int64)
        # _ends[i] is one past the last stream position held by part i.
        self._ends = np.cumsum(sizes)
        self.size = int(self._ends[-1]) if sizes.size else 0

    def __len__(self) -> int:
        return self.size

    def read(self, start: int, stop: int) -> np.ndarray:
        """Returns a copy of stream positions ``[start, stop)`` in the parts' common dtype.

        Raises:
          IndexError: If the range is not inside the stream.
        """
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"stream range [{start}, {stop}) outside [0, {self.size})")
        if start == stop:
            return np.empty(0, dtype=self._parts[0].dtype if self._parts else np.uint8)
        # First part whose end lies beyond `start`; a window rarely spans more than two parts.
        i = int(np.searchsorted(self._ends, start, side="right"))
        pieces = []
        pos = start
        while pos < stop:
            part_start = int(self._ends[i]) - self._parts[i].size
            hi = min(stop, int(self._ends[i]))
            pieces.append(self._parts[i][pos - part_start:hi - part_start])
            pos = hi
            i += 1
        return np.array(pieces[0]) if len(pieces) == 1 else np.concatenate(pieces)

    def max_id(self, start: int, stop: int, chunk: int = 1 << 24) -> int:
        """Largest token id in ``[start, stop)``, read in chunks to bound memory.

        Returns:
          The maximum, or -1 for an empty range.
        """
        best = -1
        for lo in range(start, stop, chunk):
            best = max(best, int(self.read(lo, min(stop, lo + chunk)).max()))
        return best


class WindowSource:
    """Map-style source of next-token windows cut from ``stream[start:stop]``.

    Window i covers stream positions ``[start + i*T, start + i*T + T + 1)`` (stride T, so
    consecutive windows share one token and every token in range is a target once);
    ``inputs`` is the window without its last token, ``targets`` without its first, and every
    position is scored. Only whole windows are used: a tail shorter than T + 1 is dropped.

    Args:
      stream: The token stream.
      start: First stream position of this split.
      stop: One past the last stream position of this split.
      seq_len: Model sequence length T.
      vocab_size: If given, every window is checked against it as it is read, so an id beyond
        the vocabulary that escaped the up-front sample check still fails loudly instead of
        being silently clamped by the embedding lookup.
      where: Text naming the data for error messages, e.g. ``"data.path 'x'"``.
    """

    def __init__(self, stream: TokenStream, start: int, stop: int, seq_len: int,
                 vocab_size: int | None = None, where: str = "data", packing: bool = False,
                 eos_id: int | None = None):
        self._packing = packing
        self._eos_id = eos_id
        self._stream = stream
        self._start = start
        self._seq_len = seq_len
        self._vocab_size = vocab_size
        self._where = where
        self._count = max(0, (stop - start - 1) // seq_len)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Window ``index`` as a dict of ``inputs``/``targets`` int32 and ``loss_mask`` float32.

        Raises:
          IndexError: If ``index`` is outside ``[0, len(self))``.
          DataError: If the window holds an id >= vocab_size.
        """
        if not 0 <= index < self._count:
            raise IndexError(f"window index {index} out of range [0, {self._count})")
        lo = self._start + int(index) * self._seq_len
        window = self._stream.read(lo, lo + self._seq_len + 1)
        if self._vocab_size is not None:
            top = int(window.max())
            if top >= self._vocab_size:
                raise DataError(f"{self._where}: token id {top} at stream position >= {lo} is "
                                f">= vocab_size {self._vocab_size} (ids must be < vocab_size)")
        window = window.astype(np.int32)
        example = {"inputs": window[:-1], "targets": window[1:],
                   "loss_mask": np.ones(self._seq_len, dtype=np.float32)}
        if self._packing:
            example.update(self._documents(lo, window))
        return example

    def _documents(self, lo: int, window: np.ndarray) -> dict[str, np.ndarray]:
        """Packing: ``segment_ids`` int32 [T] (1, 2, ... per document in this window) and a
        ``loss_mask`` that scores a target only inside its input's document.

        A document starts at a stream document start (file boundary) or, with eos_id, at an
        eos token: the separator opens the next document, acting as its BOS, so a document's
        first token is predicted from the separator alone. The target that crosses into a new
        document (the token before a separator predicting it) is not scored. The first
        document of a window may be the tail of one that began earlier: it starts fresh here.
        """
        n = window.size                                             # T + 1
        starts = np.zeros(n, dtype=bool)
        s = self._stream.doc_starts
        inside = s[(s > lo) & (s < lo + n)] - lo
        starts[inside] = True
        if self._eos_id is not None:
            starts[1:] |= window[1:] == self._eos_id
        seg = 1 + np.cumsum(starts, dtype=np.int32)                 # [T + 1]
        return {"segment_ids": seg[:-1],
                "loss_mask": (seg[:-1] == seg[1:]).astype(np.float32)}
