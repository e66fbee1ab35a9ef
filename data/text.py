"""File-backed token streams: raw UTF-8 bytes ("bytes") and flat binary token ids ("tokens").

Both kinds read ``data.path``: a file, or a directory read recursively in sorted path order.
Hidden files and directories (names starting with ".") are skipped, so editor swap files and
``.git`` do not leak into a corpus, and so are symlinks to directories (not followed, which
rules out cycles); tokens also reads only ``*.bin`` files. Nothing else is skipped: an
unlistable folder or unreadable file is an error.

* bytes: every regular (non-hidden) file; the tokens are the raw bytes (vocabulary 256) and
  files are joined by one newline byte so a document never runs straight into the next
  (empty files add nothing). The bytes are not decoded, so any file works, UTF-8 or not.
* tokens: the ``*.bin`` files (or the single file given), each a flat little-endian array of
  ``data.token_dtype`` ids, joined with no separator (a tokenized corpus carries its own
  end-of-document tokens, and a byte 10 means nothing in token space).

Files are memory-mapped rather than read, so a large corpus is not copied into RAM.

Split: with ``data.eval_path`` the whole of ``path`` trains and the whole of ``eval_path`` is
held out; otherwise the last ``eval_fraction`` of the stream is held out. Train windows end
before the held-out part begins, so no target token is shared between the splits.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from data.errors import DataError
from data.stream import TokenStream

NEWLINE = np.frombuffer(b"\n", dtype=np.uint8)
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Tokens checked against the vocabulary at each end of the training stream; the held-out
# stream (usually small) is checked in full, and every window is checked again as it is read.
ID_SAMPLE = 1 << 20


@dataclasses.dataclass(frozen=True)
class TextSplits:
    """The train and held-out streams of a text source, as ``(stream, start, stop)`` ranges."""

    train: tuple[TokenStream, int, int]
    eval: tuple[TokenStream, int, int]
    train_files: int
    eval_files: int  # 0 when the held-out part is a tail of the training files

    @property
    def train_tokens(self) -> int:
        return self.train[2] - self.train[1]

    @property
    def eval_tokens(self) -> int:
        return self.eval[2] - self.eval[1]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_files(path: Path, key: str, kind: str) -> list[Path]:
    """The data files under ``path`` (or ``[path]`` for a file), sorted by path.

    Args:
      path: A file or a directory.
      key: Config key for error messages ("data.path" or "data.eval_path").
      kind: "bytes" (all non-hidden regular files) or "tokens" (non-hidden ``*.bin`` files).

    Raises:
      DataError: If the path does not exist, is neither file nor directory, or is a directory
        without data files.
    """
    if not path.exists():
        raise DataError(f"{key} '{path}' does not exist")
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{key} '{path}' is neither a regular file nor a directory")
    def unreadable(e: OSError) -> None:  # os.walk would otherwise skip such a folder silently
        raise DataError(f"{key} '{path}': cannot list '{e.filename}' ({e.strerror})")

    files = []
    for root, dirs, names in os.walk(path, onerror=unreadable):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]  # pruned in place: os.walk skips them
        for name in names:
            f = Path(root) / name
            if _is_hidden(name) or not f.is_file():
                continue
            if kind == "tokens" and f.suffix != ".bin":
                continue
            files.append(f)
    if not files:
        allowed = "*.bin files" if kind == "tokens" else "regular non-hidden files"
        raise DataError(f"{key} '{path}' is a directory with no data files (looked for "
                        f"{allowed}, recursively)")
    return sorted(files, key=lambda f: f.relative_to(path).as_posix())


def _map_file(f: Path, dtype: np.dtype, key: str, root: Path, token_dtype: str) -> np.ndarray:
    """Memory-maps one file as a flat array of ``dtype``; empty files give an empty array."""
    where = f"{key} '{root}'" if f == root else f"{key} '{root}': file '{f}'"
    try:
        nbytes = f.stat().st_size
        if nbytes % dtype.itemsize:
            raise DataError(
                f"{where} has {nbytes} bytes, not a multiple of "
                f"{dtype.itemsize} (data.token_dtype={token_dtype!r})")
        if nbytes == 0:
            return np.empty(0, dtype=dtype)  # np.memmap refuses empty files
        with open(f, "rb"):  # fail here with a clean message rather than inside numpy
            pass
        return np.memmap(f, dtype=dtype, mode="r")
    except OSError as e:
        raise DataError(f"{where} cannot be read ({e.strerror or type(e).__name__})") from None


def open_stream(path_str: str | None, key: str, kind: str,
                token_dtype: str) -> tuple[TokenStream, int]:
    """Opens ``path_str`` as one token stream.

    Args:
      path_str: The configured path (file or directory).
      key: Config key for error messages.
      kind: "bytes" or "tokens".
      token_dtype: "uint16" or "uint32" (tokens only).

    Returns:
      (stream, number of files).

    Raises:
      DataError: On a missing/unreadable path, a bad file size, or an empty stream.
    """
    if path_str is None:
        raise DataError(f"{key} is required for data.kind={kind!r}")
    if kind == "bytes":
        dtype = np.dtype(np.uint8)
    elif token_dtype in TOKEN_DTYPES:
        dtype = TOKEN_DTYPES[token_dtype]
    else:
        raise DataError(f"data.token_dtype must be one of {sorted(TOKEN_DTYPES)}, "
                        f"got {token_dtype!r}")
    root = Path(path_str)
    files = list_files(root, key, kind)
    parts: list[np.ndarray] = []
    doc_starts, size = [], 0
    for f in files:
        part = _map_file(f, dtype, key, root, token_dtype)
        if not part.size:
            continue  # an empty file contributes nothing, not even a separator
        if parts:
            doc_starts.append(size)   # bytes: the separator opens the next document
            if kind == "bytes":
                parts.append(NEWLINE)
                size += NEWLINE.size
        parts.append(part)
        size += part.size
    stream = TokenStream(parts, doc_starts)
    if stream.size == 0:
        what = "an empty file" if len(files) == 1 and root.is_file() else "only empty files"
        raise DataError(f"{key} '{root}' is {what} (need at least one window of "
                        "data.seq_len+1 tokens)")
    return stream, len(files)


def _need_window(key: str, path: str, split: str, have: int, seq_len: int,
                 hint: str = "") -> None:
    if have < seq_len + 1:
        raise DataError(
            f"{key} '{path}': the {split} split has {have} tokens, need at least "
            f"{seq_len + 1} (data.seq_len+1) for one window; use more data{hint} or a "
            "smaller data.seq_len")


def open_splits(cfg, vocab_size: int, check_ids: bool = True) -> TextSplits:
    """Opens the train and held-out streams of a bytes/tokens config.

    Args:
      cfg: A ``DataConfig`` with kind "bytes" or "tokens".
      vocab_size: Model vocabulary size.
      check_ids: Whether to scan for token ids >= vocab_size (the start and end of the train
        stream and all of the held-out stream); ``describe`` skips this.

    Raises:
      DataError: On any problem with the files, a split too short for one window, or an id
        beyond the vocabulary.
    """
    kind = cfg.kind
    if kind == "bytes" and vocab_size < 256:
        raise DataError(f"data.kind='bytes' needs vocab_size >= 256, got {vocab_size}")
    stream, n_files = open_stream(cfg.path, "data.path", kind, cfg.token_dtype)
    if cfg.eval_path is not None:
        eval_stream, n_eval = open_stream(cfg.eval_path, "data.eval_path", kind,
                                          cfg.token_dtype)
        train = (stream, 0, stream.size)
        held = (eval_stream, 0, eval_stream.size)
        eval_key, eval_path = "data.eval_path", cfg.eval_path
    else:
        if not 0.0 < cfg.eval_fraction < 1.0:
            raise DataError(f"data.eval_fraction must be in (0, 1), got {cfg.eval_fraction}")
        n_eval = 0
        split = stream.size - int(stream.size * cfg.eval_fraction)
        train, held = (stream, 0, split), (stream, split, stream.size)
        eval_key, eval_path = "data.path", cfg.path
    from_tail = cfg.eval_path is None
    _need_window("data.path", cfg.path, "train", train[2] - train[1], cfg.seq_len,
                 ", a smaller data.eval_fraction" if from_tail else "")
    _need_window(eval_key, eval_path, "eval", held[2] - held[1], cfg.seq_len,
                 ", a larger data.eval_fraction" if from_tail else "")
    if check_ids and kind == "tokens":
        s, lo, hi = train
        top = max(s.max_id(lo, min(hi, lo + ID_SAMPLE)), s.max_id(max(lo, hi - ID_SAMPLE), hi))
        _check_max(top, vocab_size, "data.path", cfg.path, "train")
        _check_max(held[0].max_id(held[1], held[2]), vocab_size, eval_key, eval_path, "eval")
    return TextSplits(train, held, n_files, n_eval)


def _check_max(top: int, vocab_size: int, key: str, path: str, split: str) -> None:
    if top >= vocab_size:
        raise DataError(f"{key} '{path}': max token id {top} in the {split} split is >= "
                        f"vocab_size {vocab_size} (ids must be < vocab_size; check "
                        "data.token_dtype and model.vocab_size)")
