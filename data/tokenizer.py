"""Tokenizers: text <-> token ids for training data, prompts, generation and evaluation.

`load_tokenizer(path)` opens
* a Hugging Face `tokenizers` file (`tokenizer.json`), or a directory holding one (what
  `save_pretrained` writes);
* a SentencePiece model (`*.model`), or a directory holding exactly one;
* the string "bytes": raw UTF-8 bytes, vocabulary 256 (what `data.kind=bytes` trains on).

Every tokenizer has the same small interface (`Tokenizer`): `encode(text) -> list[int]` (no
special tokens added), `decode(ids) -> str`, `vocab_size`, `eos_id` / `bos_id` (None when the
tokenizer has none), and `adds_bos`: whether the tokenizer's own rule for encoding a sequence
(a tokenizer.json post-processor) puts bos first. A run's tokenizer is `data.tokenizer` in its
config; training copies the file into the run dir (`RUN_DIR/tokenizer/`) so a run stays usable
after its corpus moves.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Protocol

from data.errors import DataError

# Names under which a tokenizer's end-of-document token is found, most specific first: GPT-2
# style byte BPE, Llama / SentencePiece, T5 / BERT-style vocabularies.
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
HF_FILE = "tokenizer.json"
RUN_DIR_NAME = "tokenizer"


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    adds_bos: bool     # its post-processor prepends bos_id (what Hugging Face encode() adds)
    source: str        # what was loaded, for messages

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def text_bytes(self, ids: list[int]) -> int:
        """UTF-8 bytes of the text `ids` stand for, special tokens (eos) counting none: the
        denominator of bits per byte."""
        ...


class ByteTokenizer:
    """UTF-8 bytes; decode shows invalid UTF-8 and ids >= 256 as U+FFFD."""

    vocab_size = 256
    eos_id = None
    bos_id = None
    adds_bos = False
    source = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        pieces, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            pieces.append(run.decode("utf-8", errors="replace") + "\ufffd")
            run = bytearray()
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def text_bytes(self, ids: list[int]) -> int:
        return sum(1 for i in ids if 0 <= i < 256)


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` from a tokenizer.json."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on a bad file
            raise DataError(f"tokenizer '{path}' is not a readable tokenizer.json "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.source = str(path)
        # get_vocab_size(with_added_tokens=True): added special tokens get ids past the base
        # vocabulary, and the model's embedding must cover them.
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find(EOS_NAMES)
        self.bos_id = self._find(BOS_NAMES)
        # What the post-processor wraps around an empty text, e.g. [bos] for "<s> $A".
        added = self._tok.encode("", add_special_tokens=True).ids
        self.adds_bos = self.bos_id is not None and added[:1] == [self.bos_id]

    def _find(self, names) -> int | None:
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def text_bytes(self, ids: list[int]) -> int:
        return len(self._tok.decode(list(ids), skip_special_tokens=True).encode("utf-8"))


class SentencePieceTokenizer:
    """A SentencePiece model file."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise DataError(f"tokenizer '{path}' is not a readable SentencePiece model "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.source = str(path)
        self.vocab_size = int(self._sp.get_piece_size())
        # SentencePiece reports -1 for a special token the model was trained without.
        self.eos_id = None if self._sp.eos_id() < 0 else int(self._sp.eos_id())
        self.bos_id = None if self._sp.bos_id() < 0 else int(self._sp.bos_id())
        # A .model file carries no rule for adding bos (Hugging Face keeps it in
        # tokenizer_config.json).
        self.adds_bos = False

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))

    def text_bytes(self, ids: list[int]) -> int:
        # SentencePiece's decode drops control pieces (</s>, <s>) already.
        return len(self._sp.decode(list(ids)).encode("utf-8"))


def _tokenizer_file(path: Path, key: str) -> Path:
    """The single tokenizer file a path names: itself, or the one inside a directory."""
    if not path.exists():
        raise DataError(f"{key} '{path}' does not exist (give a tokenizer.json, a "
                        "SentencePiece .model file, a directory holding one, or 'bytes')")
    if path.is_file():
        return path
    if (path / HF_FILE).is_file():
        return path / HF_FILE
    models = sorted(path.glob("*.model"))
    if len(models) == 1:
        return models[0]
    found = ", ".join(m.name for m in models) if models else "neither"
    raise DataError(f"{key} '{path}' is a directory without one tokenizer: looked for "
                    f"{HF_FILE} or a single *.model file, found {found}")


def load_tokenizer(spec: str | Path, key: str = "data.tokenizer") -> Tokenizer:
    """Opens a tokenizer (see the module docstring). key names the setting in errors."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    f = _tokenizer_file(Path(spec), key)
    if f.suffix == ".model":
        return SentencePieceTokenizer(f)
    if f.suffix == ".json":
        return HFTokenizer(f)
    raise DataError(f"{key} '{f}': unknown tokenizer file type (expected {HF_FILE} / *.json "
                    "from Hugging Face tokenizers or a SentencePiece *.model)")


def tokenizer_file(spec: str | Path, key: str = "data.tokenizer") -> Path | None:
    """The file behind a tokenizer spec (None for 'bytes')."""
    return None if str(spec) == "bytes" else _tokenizer_file(Path(spec), key)


def save_to_run_dir(spec: str, run_dir) -> None:
    """Copies the tokenizer file into RUN_DIR/tokenizer/ (nothing for 'bytes'). run_dir: a
    pathlib.Path or an etils.epath.Path (a bucket)."""
    f = tokenizer_file(spec)
    if f is None:
        return
    target = run_dir / RUN_DIR_NAME
    target.mkdir(parents=True, exist_ok=True)
    dest = target / f.name
    if isinstance(dest, Path):
        shutil.copyfile(f, dest)
    else:
        dest.write_bytes(f.read_bytes())


def tokenizer_for_run(cfg, run_dir=None) -> Tokenizer | None:
    """The tokenizer of a run: the copy in RUN_DIR/tokenizer/ when there is one, else the
    config's data.tokenizer, else bytes for a byte model, else None (token-id models)."""
    if run_dir is not None:
        saved = Path(str(run_dir)) / RUN_DIR_NAME
        if saved.is_dir() and any(saved.iterdir()):
            return load_tokenizer(saved, key=f"run dir tokenizer '{saved}'")
    spec = getattr(cfg.data, "tokenizer", None)
    if spec is not None:
        return load_tokenizer(spec)
    if cfg.data.kind == "bytes":
        return ByteTokenizer()
    return None
