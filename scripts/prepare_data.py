"""Tokenize a text dataset into EOS-separated token shards for `data.kind=tokens` training.

    # a local corpus, with a byte-level BPE tokenizer trained on its training documents
    python scripts/make_tiny_corpus.py --out corpus/tiny_stories.jsonl
    python scripts/prepare_data.py --files corpus/tiny_stories.jsonl --train_tokenizer 512 \\
        --out corpus/tiny_prepared
    # local files with an existing tokenizer (tokenizer.json, SentencePiece .model, or a dir)
    python scripts/prepare_data.py --files 'books/**/*.txt' --text_split blank_line \\
        --tokenizer tok/tokenizer.json --out corpus/books --num_proc 8
    # a Hugging Face hub dataset (needs network; untested offline)
    python scripts/prepare_data.py --hf_dataset HuggingFaceFW/fineweb-edu \\
        --hf_config sample-10BT --streaming --max_docs 2000000 --train_tokenizer 32000 \\
        --tokenizer_docs 200000 --out corpus/fineweb_edu --num_proc 16

Sources: --files takes files, directories (recursive, sorted) and globs of .txt/.md (a document
per file, line or blank-line paragraph: --text_split), .json/.jsonl (JSON lines or a JSON list
of objects; field --text_key) and .parquet (column --text_key), each optionally gzipped.
--hf_dataset reads Hugging Face `datasets` instead (a thin wrapper, untested offline). Empty or
whitespace-only documents are skipped and counted.

Output (OUT = --out):
  OUT/train/shard_00000.bin ...  flat little-endian uint16 ids (uint32 if the vocabulary
  OUT/val/shard_00000.bin ...    exceeds 65536); each document's ids then the eos id
  OUT/tokenizer.json             a copy of the tokenizer (or the SentencePiece .model)
  OUT/meta.json                  vocab_size, eos_id, token_dtype, counts per split, sources, args
A shard closes at the first document end past --shard_tokens tokens (no document spans two
files). The held-out split is --val_files, or --val_fraction F of the documents by systematic
sampling: every 1/F-th document from an offset set by --seed (exactly F of any stream, even a
streamed one of unknown length). The last line printed is the config overrides to train on it.

Resuming: shards are written under a temporary name and renamed when complete, and
OUT/progress.json records the complete shards. After an interruption, the same command skips the
documents already in complete shards and continues; the result is byte-identical to an
uninterrupted run (--num_proc does not change the output either). A different command into an
existing OUT is refused, naming what differs; --overwrite replaces OUT's train/, val/, meta.json,
progress.json and tokenizer copy (other files there are left alone). Bad input prints one
`error:` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import shlex
import shutil
import sys
import types
from collections import deque
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__" and "data" not in sys.modules:
    # data/__init__.py imports the training pipeline (grain, jax: ~3 s); this script needs only
    # data.errors and data.tokenizer, so as a script it imports them without the package init.
    sys.modules["data"] = types.ModuleType("data")
    sys.modules["data"].__path__ = [str(ROOT / "data")]

from data.errors import DataError  # noqa: E402
from data.tokenizer import EOS_NAMES, HF_FILE, load_tokenizer, tokenizer_file  # noqa: E402

EOS_TOKEN = "<|endoftext|>"
KINDS = {"text": (".txt", ".text", ".md"), "json": (".json", ".jsonl", ".ndjson"),
         "parquet": (".parquet",)}
ALLOWED = ".txt/.md, .json/.jsonl, .parquet (each optionally .gz)"
SPLITS = ("train", "val")
PROGRESS, META = "progress.json", "meta.json"
FORMAT = "mnemax-prepared-tokens-v1"
# Arguments that cannot change the output bytes, so a resume may change them.
NOT_COMPARED = ("out", "num_proc", "batch_docs", "overwrite", "no_progress")


class PrepareError(ValueError):
    """A bad command line or input, described in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and status 2, like every other user error
        raise PrepareError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prepare_data.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_argument_group("source (one of --files, --hf_dataset)")
    src.add_argument("--files", nargs="+", metavar="PATH",
                     help=f"files, directories or globs of {ALLOWED}")
    src.add_argument("--hf_dataset", metavar="NAME",
                     help="a hub dataset, e.g. HuggingFaceFW/fineweb-edu (untested offline)")
    src.add_argument("--hf_config", help="its configuration, e.g. sample-10BT")
    src.add_argument("--hf_split", default="train", help="its split (default train)")
    src.add_argument("--streaming", action="store_true", help="stream the hub dataset")
    src.add_argument("--text_key", default="text",
                     help="json field / parquet column / hub column of the text (default text)")
    src.add_argument("--text_split", choices=("file", "line", "blank_line"), default="file",
                     help=".txt: a document per file (default), line, or blank-line paragraph")
    src.add_argument("--max_docs", type=int, metavar="N", help="use only the first N documents")
    tok = p.add_argument_group("tokenizer (one of --tokenizer, --train_tokenizer)")
    tok.add_argument("--tokenizer", metavar="SPEC",
                     help="tokenizer.json, SentencePiece .model, a dir holding one, or 'bytes'")
    tok.add_argument("--train_tokenizer", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE tokenizer of this vocabulary (>= 258, "
                          f"including {EOS_TOKEN}) on the training documents")
    tok.add_argument("--tokenizer_docs", type=int, metavar="N",
                     help="train it on the first N training documents (default: all)")
    tok.add_argument("--eos_id", type=int, help="separator id (default: the tokenizer's eos)")
    split = p.add_argument_group("held-out split (one of --val_fraction, --val_files)")
    split.add_argument("--val_fraction", type=float,
                       help="fraction of the documents held out (default 0.01; 0: none)")
    split.add_argument("--val_files", nargs="+", metavar="PATH", help="held-out files instead")
    split.add_argument("--seed", type=int, default=0, help="chooses the held-out documents")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output directory")
    out.add_argument("--shard_tokens", type=int, default=100_000_000,
                     help="about this many tokens per shard (default 100M)")
    out.add_argument("--overwrite", action="store_true", help="replace an output in --out")
    out.add_argument("--num_proc", type=int, default=1, help="tokenizer processes (default 1)")
    out.add_argument("--batch_docs", type=int, default=256, help="documents per task (256)")
    out.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def check_args(a) -> None:
    if (a.files is None) == (a.hf_dataset is None):
        raise PrepareError("give exactly one source: --files PATH ... or --hf_dataset NAME")
    if (a.tokenizer is None) == (a.train_tokenizer is None):
        raise PrepareError("give exactly one of --tokenizer SPEC or --train_tokenizer VOCAB_SIZE")
    if a.val_files is not None and a.val_fraction is not None:
        raise PrepareError("give --val_fraction or --val_files, not both")
    if a.val_fraction is not None and not 0.0 <= a.val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be in [0, 1), got {a.val_fraction}")
    if a.train_tokenizer is not None and a.train_tokenizer < 258:
        raise PrepareError(f"--train_tokenizer must be >= 258 (256 bytes, {EOS_TOKEN} and at "
                           f"least one merge), got {a.train_tokenizer}")
    if a.tokenizer_docs is not None and a.train_tokenizer is None:
        raise PrepareError("--tokenizer_docs needs --train_tokenizer")
    for name in ("max_docs", "tokenizer_docs", "shard_tokens", "num_proc", "batch_docs"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise PrepareError(f"--{name} must be >= 1, got {v}")
    if a.eos_id is not None and not 0 <= a.eos_id < 2**32:
        raise PrepareError(f"--eos_id must be in [0, 2**32), got {a.eos_id}")


# ---- sources: paths -> files -> documents ----

def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((k for k, sfx in KINDS.items() if name.endswith(sfx)), None)


def expand_paths(specs: list[str], flag: str) -> list[Path]:
    """Files named by files, directories (recursive, sorted, hidden names skipped) and globs."""
    out: dict[Path, None] = {}  # ordered, without repeats
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file() and _kind(f)
                            and not any(s.startswith(".") for s in f.relative_to(p).parts)),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise PrepareError(f"{flag} '{spec}' is a directory without data files "
                                   f"(looked for {ALLOWED}, recursively)")
        elif p.is_file():
            if _kind(p) is None:
                raise PrepareError(f"{flag} '{spec}': unsupported file type (allowed: {ALLOWED})")
            found = [p]
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            found = [Path(m) for m in matches if Path(m).is_file() and _kind(Path(m))]
            if not found:
                raise PrepareError(f"{flag} '{spec}' matches no {ALLOWED} files")
        else:
            raise PrepareError(f"{flag} '{spec}' does not exist")
        out.update(dict.fromkeys(found))
    return list(out)


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _text_of(record, key: str, where: str) -> str:
    if not isinstance(record, dict):
        raise PrepareError(f"{where} is a JSON {type(record).__name__}, expected an object with "
                           f"a '{key}' field")
    if key not in record:
        keys = ", ".join(sorted(map(str, record))[:12]) or "none"
        raise PrepareError(f"{where} has no field '{key}' (--text_key); its fields: {keys}")
    text = record[key]
    if text is not None and not isinstance(text, str):
        raise PrepareError(f"{where}: field '{key}' is a {type(text).__name__}, expected a "
                           "string (--text_key)")
    return text or ""


def _iter_text(f, mode: str) -> Iterator[str]:
    if mode == "file":
        yield f.read()
        return
    para: list[str] = []
    for line in f:
        if mode == "line":
            yield line.rstrip("\r\n")
        elif line.strip():
            para.append(line)
        elif para:
            yield "".join(para).rstrip("\r\n")
            para = []
    if para:
        yield "".join(para).rstrip("\r\n")


def _iter_json(path: Path, f, key: str) -> Iterator[str]:
    head = ""
    while not head.strip():  # the first non-blank character: a JSON list, or JSON lines
        chunk = f.read(1)
        if not chunk:
            return
        head += chunk
    if head.strip() == "[":
        try:
            records = json.loads(head + f.read())
        except json.JSONDecodeError as e:
            raise PrepareError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno}); "
                               "expected a JSON list of objects or JSON lines") from None
        for i, rec in enumerate(records):
            yield _text_of(rec, key, f"'{path}' item {i}")
        return
    for lineno, line in enumerate(itertools.chain([head + f.readline()], f), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"'{path}' line {lineno} is not valid JSON ({e.msg}); expected "
                               "one JSON object per line or a JSON list of objects") from None
        yield _text_of(rec, key, f"'{path}' line {lineno}")


def _iter_parquet(path: Path, key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise PrepareError(f"'{path}' is not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if key not in names:
        raise PrepareError(f"'{path}' has no column '{key}' (--text_key); its columns: "
                           f"{', '.join(names[:12])}")
    for batch in pf.iter_batches(columns=[key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise PrepareError(f"'{path}': column '{key}' holds {type(text).__name__} "
                                   "values, expected strings (--text_key)")
            yield text or ""


def iter_file(path: Path, key: str, text_split: str) -> Iterator[str]:
    """The documents of one file, in file order."""
    kind = _kind(path)
    try:
        if kind == "parquet":
            yield from _iter_parquet(path, key)
            return
        with _open_text(path) as f:
            yield from (_iter_text(f, text_split) if kind == "text" else _iter_json(path, f, key))
    except UnicodeDecodeError as e:
        raise PrepareError(f"'{path}' is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise PrepareError(f"'{path}' cannot be read ({e.strerror or e})") from None


def iter_hf_dataset(a) -> Iterator[str]:
    """The texts of a Hugging Face hub dataset. Untested offline (no network in CI)."""
    import datasets

    where = f"--hf_dataset {a.hf_dataset}"
    try:
        ds = datasets.load_dataset(a.hf_dataset, a.hf_config, split=a.hf_split,
                                   streaming=a.streaming)
    except Exception as e:
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        raise PrepareError(f"{where}: cannot load it ({type(e).__name__}: {msg})") from None
    for i, rec in enumerate(ds):
        yield _text_of(rec, a.text_key, f"{where} record {i}")


class ValSelector:
    """Systematic held-out sampling: document i is held out when floor((i + offset) * F)
    steps up, so every window of 1/F documents holds out one (exact for any stream length)."""

    def __init__(self, fraction: float, seed: int):
        self.f = Fraction(str(fraction))  # exact: 0.01 is 1/100
        period = math.ceil(1 / self.f) if self.f else 1
        self.offset = random.Random(seed).randrange(period)

    def __call__(self, i: int) -> bool:
        n, d = self.f.numerator, self.f.denominator
        return bool(n) and (i + 1 + self.offset) * n // d > (i + self.offset) * n // d


def iter_documents(a, files, val_files, stats: dict) -> Iterator[tuple[str, str]]:
    """(split, text) for every non-empty document, in a fixed order. Counts go to stats."""
    texts = (iter_hf_dataset(a) if files is None else
             itertools.chain.from_iterable(iter_file(f, a.text_key, a.text_split)
                                           for f in files))
    is_val = ValSelector(0.0 if val_files else a.val_fraction, a.seed)
    n = 0
    for text in texts:
        if not text.strip():
            stats["empty_skipped"] += 1
            continue
        if a.max_docs is not None and n >= a.max_docs:
            break
        yield ("val" if is_val(n) else "train"), text
        n += 1
    for f in val_files or ():
        for text in iter_file(f, a.text_key, a.text_split):
            if text.strip():
                yield "val", text
            else:
                stats["empty_skipped"] += 1


# ---- tokenizers ----

def train_bpe(texts: Iterable[str], vocab_size: int, path: Path, progress: bool) -> None:
    """Trains a byte-level BPE tokenizer with EOS_TOKEN (id 0) and saves it to path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    it = iter(texts)
    batches = iter(lambda: list(itertools.islice(it, 1000)), [])
    tok.train_from_iterator(batches, trainer)
    if tok.get_vocab_size() <= 257:
        raise PrepareError("no training documents to train the tokenizer on")
    tmp = path.with_name("." + path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)


def encode_documents(tok, texts: list[str], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """uint32 ids of the documents, each followed by eos, and each document's length."""
    ids = (tok.encode_batch(texts) if hasattr(tok, "encode_batch")
           else [tok.encode(t) for t in texts])
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (eos,)) for x in ids),
                       dtype=np.uint32, count=int(lengths.sum()))
    return flat, lengths


_WORKER_TOK = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOK
    _WORKER_TOK = load_tokenizer(spec)


def _encode_in_worker(texts: list[str], eos: int):
    return encode_documents(_WORKER_TOK, texts, eos)


def tokenize_batches(batches: Iterator[list[tuple[str, str]]], tok, spec: str, eos: int,
                     num_proc: int) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """(splits, ids, lengths) per batch, in batch order whatever num_proc is."""
    if num_proc == 1:
        for b in batches:
            yield [s for s, _ in b], *encode_documents(tok, [t for _, t in b], eos)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    # Forked workers run single-threaded tokenizers (and the Rust side stays quiet about it).
    had = "TOKENIZERS_PARALLELISM" in os.environ
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(spec,))
    finally:
        if not had:
            os.environ.pop("TOKENIZERS_PARALLELISM")  # the forked workers keep their copy
    with pool:
        pending: deque = deque()  # bounded, unlike Pool.imap, which reads its input eagerly
        for b in batches:
            pending.append(([s for s, _ in b],
                            pool.apply_async(_encode_in_worker, ([t for _, t in b], eos))))
            if len(pending) >= 2 * num_proc:
                s, r = pending.popleft()
                yield s, *r.get()
        while pending:
            s, r = pending.popleft()
            yield s, *r.get()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- output: shards, progress, meta ----

def _write_json(path: Path, obj) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def _commit_progress(out: Path, progress: dict) -> None:
    _write_json(out / PROGRESS, progress)


class ShardWriter:
    """Appends documents to OUT/<split>/shard_NNNNN.bin, closing a shard at the first document
    end at or past shard_tokens; a shard is written under a hidden temporary name and renamed
    when complete, then on_commit() records it."""

    def __init__(self, folder: Path, state: dict, shard_tokens: int, dtype, on_commit):
        self.folder, self.state, self.shard_tokens = folder, state, shard_tokens
        self.dtype, self.on_commit = np.dtype(dtype).newbyteorder("<"), on_commit
        self._f = None
        self._tokens = self._docs = self._eos_inside = 0

    def _name(self) -> str:
        return f"shard_{len(self.state['shards']):05d}.bin"

    def add(self, ids: np.ndarray, eos_inside: int) -> None:
        if self._f is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._f = open(self.folder / f".{self._name()}.tmp", "wb", buffering=1 << 20)
        self._f.write(ids.astype(self.dtype).tobytes())
        self._tokens += ids.size
        self._docs += 1
        self._eos_inside += eos_inside
        if self._tokens >= self.shard_tokens:
            self.close_shard()

    def close_shard(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())  # the rename below must not publish a half-written file
        self._f.close()
        self._f = None
        name = self._name()
        os.replace(self.folder / f".{name}.tmp", self.folder / name)
        st = self.state
        st["shards"].append({"file": name, "documents": self._docs, "tokens": self._tokens})
        st["documents"] += self._docs
        st["tokens"] += self._tokens
        st["eos_inside_documents"] += self._eos_inside
        self._tokens = self._docs = self._eos_inside = 0
        self.on_commit()


def _describe_diff(old: dict, new: dict) -> str:
    parts = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            was, now = json.dumps(old.get(k)), json.dumps(new.get(k))
            parts.append(f"{k}: was {was[:120]}, now {now[:120]}")
    return "; ".join(parts)


def _clear(out: Path, progress: dict | None, keep: Path | None) -> None:
    """Removes an earlier output: its shards, records and (unless it is `keep`, the tokenizer
    this run reads) the tokenizer copy it made; a foreign directory keeps its tokenizer files."""
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
    for name in (PROGRESS, META):
        (out / name).unlink(missing_ok=True)
    copy = (progress or {}).get("tokenizer") or {}
    if copy.get("file") not in (None, "bytes"):
        f = out / copy["file"]
        if keep is None or not f.exists() or f.resolve() != keep.resolve():
            f.unlink(missing_ok=True)


def open_output(out: Path, fingerprint: dict, overwrite: bool, keep: Path | None) -> dict:
    """The progress record of OUT: a fresh one, or the earlier run's to resume."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out '{out}' exists and is not a directory")
    old = None
    if (out / PROGRESS).is_file():
        try:
            old = json.loads((out / PROGRESS).read_text())
        except (OSError, ValueError) as e:
            raise PrepareError(f"--out '{out}': {PROGRESS} is unreadable ({e}); use "
                               "--overwrite to start again") from None
    # An earlier attempt that completed no shard (it failed on bad input, say) holds nothing
    # worth keeping: with other arguments it is replaced, with the same ones resumed.
    empty = old is not None and not any(old.get("splits", {}).get(s, {}).get("shards")
                                        for s in SPLITS)
    same = old is not None and old.get("format") == FORMAT and old.get("args") == fingerprint
    if empty and not same:
        overwrite = True
    if old is not None and not overwrite:
        if not same:
            diff = _describe_diff(old.get("args", {}), fingerprint)
            raise PrepareError(f"--out '{out}' holds data prepared with other arguments "
                               f"({diff}); rerun the same command to resume, or use another "
                               "--out, or --overwrite to replace it")
        for split in SPLITS:
            folder = out / split
            for shard in old["splits"][split]["shards"]:
                f = folder / shard["file"]
                size = shard["tokens"] * np.dtype(old["token_dtype"]).itemsize
                if not f.is_file() or f.stat().st_size != size:
                    raise PrepareError(f"--out '{out}': {split}/{shard['file']} is missing or "
                                       "has the wrong size; use --overwrite to start again")
            done = {s["file"] for s in old["splits"][split]["shards"]}
            for f in folder.glob("*") if folder.is_dir() else ():
                if f.name not in done:  # a shard renamed just before an interruption, or a tmp
                    f.unlink()
        return old
    if old is None and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrepareError(f"--out '{out}' is not empty and holds no prepare_data output (no "
                           f"{PROGRESS}); use a new or empty directory, or --overwrite")
    if out.is_dir():
        _clear(out, old, keep)
    out.mkdir(parents=True, exist_ok=True)
    empty_split = {"documents": 0, "tokens": 0, "eos_inside_documents": 0, "shards": []}
    progress = {"format": FORMAT, "args": fingerprint, "tokenizer": None, "token_dtype": None,
                "complete": False, "splits": {s: dict(empty_split, shards=[])
                                              for s in SPLITS}}
    _commit_progress(out, progress)
    return progress


def fingerprint_of(a, files, val_files) -> dict:
    """Everything that determines the output bytes, as '--flag' -> JSON value."""
    d = {f"--{k}": v for k, v in sorted(vars(a).items()) if k not in NOT_COMPARED}
    if a.tokenizer is not None and a.tokenizer != "bytes":
        f = tokenizer_file(a.tokenizer, key="--tokenizer")  # DataError when it does not exist
        d["--tokenizer"] = str(f.resolve())
        d["--tokenizer (file sha256)"] = _sha256(f)
    for flag, specs, found in (("--files", a.files, files), ("--val_files", a.val_files,
                                                             val_files)):
        if specs is not None:
            d[flag] = [str(Path(s).absolute()) for s in specs]
            d[f"{flag} (file sizes)"] = [[str(f.resolve()), f.stat().st_size] for f in found]
    return d


def overrides_for(out: Path, meta: dict) -> list[str]:
    o = ["data.kind=tokens", f"data.path={out / 'train'}"]
    if meta["splits"]["val"]["documents"]:
        o.append(f"data.eval_path={out / 'val'}")
    tok = meta["tokenizer"] if meta["tokenizer"] == "bytes" else out / meta["tokenizer"]
    o += [f"data.token_dtype={meta['token_dtype']}", f"data.tokenizer={tok}",
          "data.packing=true", f"data.eos_id={meta['eos_id']}",
          f"model.vocab_size={meta['model_vocab_size']}"]
    return [shlex.quote(x) for x in o]


def _report(out: Path, meta: dict) -> None:
    parts = []
    for split in SPLITS:
        s = meta["splits"][split]
        n = len(s["shards"])
        parts.append(f"{split} {s['documents']} documents, {s['tokens']} tokens in {n} "
                     f"shard{'' if n == 1 else 's'}")
    print(f"prepared {out}: {'; '.join(parts)} ({meta['token_dtype']}, vocab "
          f"{meta['vocab_size']}, eos {meta['eos_id']})")
    inside = sum(meta["splits"][s]["eos_inside_documents"] for s in SPLITS)
    if inside:
        print(f"warning: {inside} documents contain the eos token's text themselves; they read "
              "as several documents", file=sys.stderr)
    if not meta["splits"]["val"]["documents"]:
        print("note: no held-out documents; the overrides hold out the tail of train "
              "(data.eval_fraction) instead", file=sys.stderr)
    print(f"train on it with (model.vocab_size is the vocabulary {meta['vocab_size']} rounded "
          "up to a multiple of 64):")
    print("  " + " ".join(overrides_for(out, meta)))


def _eos_of(tok, eos_id: int | None) -> int:
    if eos_id is None and tok.eos_id is None:
        raise PrepareError(f"tokenizer '{tok.source}' has no end-of-document token (looked for "
                           f"{', '.join(EOS_NAMES)}); name one with --eos_id ID")
    return tok.eos_id if eos_id is None else eos_id


def run(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    check_args(a)
    if a.val_files is None and a.val_fraction is None:
        a.val_fraction = 0.01
    files = expand_paths(a.files, "--files") if a.files is not None else None
    val_files = expand_paths(a.val_files, "--val_files") if a.val_files is not None else None
    if a.tokenizer is not None:  # an unreadable one, or one without eos, fails before OUT
        _eos_of(load_tokenizer(a.tokenizer, key="--tokenizer"), a.eos_id)
    probe = {"empty_skipped": 0}
    if next(iter_documents(a, files, val_files, probe), None) is None:
        where = "the hub dataset" if files is None else ", ".join(map(str, files[:3])) + (
            f" and {len(files) - 3} more files" if len(files) > 3 else "")
        empty = f" ({probe['empty_skipped']} empty or whitespace-only ones)"
        raise PrepareError(f"no documents found in {where}"
                           f"{empty if probe['empty_skipped'] else ''}")
    out = Path(a.out)
    keep = None if a.tokenizer in (None, "bytes") else tokenizer_file(a.tokenizer, "--tokenizer")
    progress = open_output(out, fingerprint_of(a, files, val_files), a.overwrite, keep)
    if progress["complete"]:
        print(f"{out} is already complete (same arguments); nothing to do")
        _report(out, json.loads((out / META).read_text()))
        return 0

    stats = {"empty_skipped": 0}
    if progress["tokenizer"] is None:  # first run: train or copy the tokenizer into OUT
        if a.train_tokenizer is not None:
            docs = (t for s, t in iter_documents(a, files, val_files, stats) if s == "train")
            train_bpe(itertools.islice(docs, a.tokenizer_docs), a.train_tokenizer,
                      out / HF_FILE, not a.no_progress)
            dest = out / HF_FILE
        elif a.tokenizer == "bytes":
            dest = None
        else:
            src = tokenizer_file(a.tokenizer, key="--tokenizer")
            dest = out / (HF_FILE if src.suffix == ".json" else src.name)
            if src.resolve() != dest.resolve():
                shutil.copyfile(src, dest)
        progress["tokenizer"] = ({"file": "bytes", "sha256": None} if dest is None else
                                 {"file": dest.name, "sha256": _sha256(dest)})
        _commit_progress(out, progress)
    name = progress["tokenizer"]["file"]
    spec = name if name == "bytes" else str(out / name)
    if name != "bytes" and _sha256(out / name) != progress["tokenizer"]["sha256"]:
        raise PrepareError(f"--out '{out}': {name} changed since this output was begun; use "
                           "--overwrite to start again")
    tok = load_tokenizer(spec, key=f"tokenizer copy '{spec}'")
    eos = _eos_of(tok, a.eos_id)
    vocab = max(tok.vocab_size, eos + 1)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    progress["token_dtype"] = dtype

    commit = lambda: _commit_progress(out, progress)  # noqa: E731
    writers = {s: ShardWriter(out / s, progress["splits"][s], a.shard_tokens, dtype, commit)
               for s in SPLITS}
    done = {s: progress["splits"][s]["documents"] for s in SPLITS}
    seen = dict.fromkeys(SPLITS, 0)
    stats = {"empty_skipped": 0}

    def todo() -> Iterator[tuple[str, str]]:
        for split, text in iter_documents(a, files, val_files, stats):
            seen[split] += 1
            if seen[split] > done[split]:  # the rest are in complete shards already
                yield split, text

    from tqdm import tqdm

    it = todo()
    batches = iter(lambda: list(itertools.islice(it, a.batch_docs)), [])
    bar = tqdm(unit=" docs", disable=a.no_progress, dynamic_ncols=True,
               desc="tokenizing", initial=sum(done.values()))
    tokens = sum(progress["splits"][s]["tokens"] for s in SPLITS)
    with bar:
        for splits, ids, lengths in tokenize_batches(batches, tok, spec, eos, a.num_proc):
            ends = np.cumsum(lengths)
            for split, lo, hi in zip(splits, ends - lengths, ends):
                doc = ids[lo:hi]
                writers[split].add(doc, int(np.count_nonzero(doc[:-1] == eos)))
            tokens += ids.size
            bar.update(len(splits))
            bar.set_postfix(tokens=tokens, refresh=False)
    for w in writers.values():
        w.close_shard()
    if not progress["splits"]["train"]["documents"]:
        raise PrepareError(f"no training documents: all {seen['val']} went to the held-out "
                           "split; use a smaller --val_fraction or more documents")
    meta = {
        "format": FORMAT, "vocab_size": vocab, "model_vocab_size": -(-vocab // 64) * 64,
        "eos_id": eos, "bos_id": tok.bos_id, "token_dtype": dtype, "tokenizer": name,
        "tokenizer_sha256": progress["tokenizer"]["sha256"],
        "splits": progress["splits"], "empty_documents_skipped": stats["empty_skipped"],
        "sources": {"files": [str(f) for f in files or ()],
                    "val_files": [str(f) for f in val_files or ()],
                    "hf_dataset": None if a.hf_dataset is None else
                    {"name": a.hf_dataset, "config": a.hf_config, "split": a.hf_split}},
        "args": progress["args"], "command": shlex.join(["prepare_data.py", *argv]),
    }
    meta["overrides"] = overrides_for(out, meta)
    _write_json(out / META, meta)
    progress["complete"] = True
    commit()
    _report(out, meta)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to continue after the last complete shard",
              file=sys.stderr)
        return 130
    except (PrepareError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
