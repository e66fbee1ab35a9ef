"""scripts/prepare_data.py and scripts/make_tiny_corpus.py: text -> EOS-separated token shards.

Prepared shards are read back with numpy and decoded (byte-level BPE, SentencePiece, bytes) to
the input documents; they load through data.make_train_iterator with the printed overrides;
json / json list / jsonl.gz / txt (three splits) / parquet inputs; num_proc 1 and 2 and an
interrupted-then-resumed run give byte-identical output; a different command into an existing
output is refused; each bad input is one `error:` line. All in-process and offline (the hub
path is run against a stand-in `datasets.load_dataset`).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_tiny_corpus as corpus  # noqa: E402
import prepare_data as prep  # noqa: E402

EOS = "<|endoftext|>"


def call(*args) -> tuple[int, str, str]:
    """prepare_data.main in-process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = prep.main([str(a) for a in args] + ["--no_progress"])
    return rc, out.getvalue(), err.getvalue()


def ok(*args) -> str:
    rc, out, err = call(*args)
    assert rc == 0, err
    return out


def overrides(stdout: str) -> list[str]:
    return shlex.split(stdout.strip().splitlines()[-1])


def unicode_docs(n: int, seed: int) -> list[str]:
    """Random documents over accents, CJK, emoji (astral), tabs, CRLF and runs of spaces."""
    rng = random.Random(seed)
    alphabet = list("abcdefgh XYZ.,!?'\"\t\n") + ["\r\n", "é", "ß", "Ω", "漢", "字", "😀", "🦊",
                                                    "e\u0301", "  ", "\u00a0"]
    return ["w" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80)))
            for _ in range(n)]


def write_jsonl(path: Path, docs, key="text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def read_split(out: Path, split: str, dtype: str) -> np.ndarray:
    files = sorted((out / split).glob("*.bin"))
    return np.concatenate([np.fromfile(f, dtype=np.dtype(dtype).newbyteorder("<"))
                           for f in files])


def split_docs(ids: np.ndarray, eos: int) -> list[np.ndarray]:
    assert ids.size and ids[-1] == eos, "the stream must end with eos"
    ends = np.flatnonzero(ids == eos)
    return [ids[s:e] for s, e in zip(np.r_[0, ends[:-1] + 1], ends)]


def is_subsequence(part, whole) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def same_output(a: Path, b: Path) -> None:
    names = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert names(a) == names(b)
    for name in names(a):
        if name == "meta.json":  # the same but for the command line and the paths in it
            ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
            for m, d in ((ma, a), (mb, b)):
                assert m.pop("command") and m.pop("overrides")[1] == f"data.path={d}/train"
            assert ma == mb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def docs():
    return corpus.generate_corpus(150, seed=1) + unicode_docs(150, seed=2)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, docs):
    """A BPE-prepared output (vocab 384, several shards per split) and its stdout."""
    d = tmp_path_factory.mktemp("bpe")
    src = write_jsonl(d / "docs.jsonl", docs)
    out = d / "out"
    stdout = ok("--files", src, "--train_tokenizer", 384, "--out", out, "--val_fraction", 0.1,
                "--shard_tokens", 3000, "--seed", 3)
    return out, stdout


def test_bpe_round_trip_partition_and_meta(bpe, docs):
    from tokenizers import Tokenizer

    out, _ = bpe
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    assert meta["eos_id"] == eos and meta["vocab_size"] == tok.get_vocab_size() == 384
    assert meta["model_vocab_size"] == 384 and meta["token_dtype"] == "uint16"
    assert meta["tokenizer"] == "tokenizer.json"
    got = {}
    for split in ("train", "val"):
        ids = read_split(out, split, "uint16")
        pieces = split_docs(ids, eos)
        got[split] = [tok.decode(p.tolist(), skip_special_tokens=False) for p in pieces]
        s = meta["splits"][split]
        assert s["documents"] == len(pieces) == np.count_nonzero(ids == eos)
        assert s["tokens"] == ids.size == sum(sh["tokens"] for sh in s["shards"])
        # Shards close at the first document end past 3000 tokens: each ends with eos.
        shards = [np.fromfile(out / split / sh["file"], "<u2") for sh in s["shards"]]
        assert [sh.size for sh in shards] == [sh["tokens"] for sh in s["shards"]]
        assert all(sh[-1] == eos for sh in shards)
        assert all(sh.size >= 3000 for sh in shards[:-1])
    assert len(meta["splits"]["train"]["shards"]) > 3
    # Byte-level BPE is lossless: the documents come back exactly, each once, in order.
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    assert is_subsequence(got["train"], docs) and is_subsequence(got["val"], docs)
    assert len(got["val"]) in (29, 30, 31)  # 10% of 300, systematic sampling
    assert meta["empty_documents_skipped"] == 0
    assert meta["args"]["--seed"] == 3 and meta["args"]["--val_fraction"] == 0.1


def test_printed_overrides_load_through_the_pipeline(bpe):
    from data import make_eval_batches, make_train_iterator
    from models.config_check import load_config

    out, stdout = bpe
    o = overrides(stdout)
    assert o == ["data.kind=tokens", f"data.path={out}/train", f"data.eval_path={out}/val",
                 "data.token_dtype=uint16", f"data.tokenizer={out}/tokenizer.json",
                 "data.packing=true", "data.eos_id=0", "model.vocab_size=384"]
    cfg = load_config(None, o + ["data.seq_len=32", "data.batch_size=4"])
    batch = next(make_train_iterator(cfg.data, cfg.model.vocab_size))
    stream = read_split(out, "train", "uint16").astype(np.int32)
    assert batch["inputs"].shape == (4, 32) and "segment_ids" in batch
    for row in batch["inputs"]:  # each row is a window of the train shards
        starts = np.flatnonzero(stream[:-32] == row[0])
        assert any((stream[s:s + 32] == row).all() for s in starts)
    val = read_split(out, "val", "uint16").astype(np.int32)
    (ev,) = make_eval_batches(cfg.data, cfg.model.vocab_size, 1)
    assert (ev["inputs"][0] == val[:32]).all()


def test_sentencepiece_tokenizer(tmp_path, docs):
    import sentencepiece as spm

    lines = [ln for d in docs[:150] for ln in d.splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), vocab_size=200,
                                   model_prefix=str(tmp_path / "sp"), model_type="bpe",
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    src = write_jsonl(tmp_path / "d.jsonl", docs[:150])
    out = tmp_path / "out"
    stdout = ok("--files", src, "--tokenizer", tmp_path / "sp.model", "--out", out,
                "--val_fraction", 0)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "sp.model" and (out / "sp.model").is_file()
    assert meta["eos_id"] == sp.eos_id() and meta["vocab_size"] == 200
    ids = read_split(out, "train", "uint16")
    assert [p.tolist() for p in split_docs(ids, sp.eos_id())] == sp.encode(docs[:150])
    assert not (out / "val").exists() and meta["splits"]["val"]["documents"] == 0
    o = overrides(stdout)
    assert f"data.tokenizer={out}/sp.model" in o and not any("eval_path" in x for x in o)


def _formats(tmp: Path, docs: list[str]) -> dict:
    """name -> (--files and options, the documents they hold)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = [d.replace("\n", " ") for d in docs]
    (tmp / "list.json").write_text(json.dumps([{"body": d} for d in docs]))
    with gzip.open(tmp / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n")
    pq.write_table(pa.table({"n": list(range(len(docs))), "body": docs}), tmp / "d.parquet",
                   row_group_size=7)
    (tmp / "txt").mkdir()
    for i, d in enumerate(docs):
        (tmp / "txt" / f"{i:03d}.txt").write_text(d)
    (tmp / "txt" / ".hidden.txt").write_text("not a document")
    (tmp / "txt" / "notes.csv").write_text("not a document either")
    (tmp / "lines.txt").write_text("\n".join(lines) + "\n   \n")
    (tmp / "paras.txt").write_text("\n\n".join(lines) + "\n\n\n")
    return {"json list": (["--files", tmp / "list.json", "--text_key", "body"], docs),
            "jsonl.gz": (["--files", tmp / "d.jsonl.gz"], docs),
            "parquet": (["--files", tmp / "d.parquet", "--text_key", "body"], docs),
            "txt dir": (["--files", tmp / "txt"], docs),
            "txt glob": (["--files", str(tmp / "txt" / "0*.txt")], docs),
            "txt lines": (["--files", tmp / "lines.txt", "--text_split", "line"], lines),
            "txt paragraphs": (["--files", tmp / "paras.txt", "--text_split", "blank_line"],
                               lines)}


def test_input_formats(tmp_path, docs):
    sample = [d.replace("\r", "") for d in docs[::15]]  # text mode reads \r\n as is; keep \n
    for name, (args, want) in _formats(tmp_path, sample).items():
        out = tmp_path / name.replace(" ", "_")
        ok(*args, "--tokenizer", "bytes", "--eos_id", 0, "--out", out, "--val_fraction", 0)
        ids = read_split(out, "train", "uint16")
        assert [bytes(p.astype(np.uint8)).decode() for p in split_docs(ids, 0)] == want, name
        meta = json.loads((out / "meta.json").read_text())
        assert meta["vocab_size"] == 256 and meta["tokenizer"] == "bytes", name


def test_uint32_and_val_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["alpha beta", "gamma"])
    b = write_jsonl(tmp_path / "b.jsonl", ["held out", "", "also held out"])
    out = tmp_path / "out"
    stdout = ok("--files", a, "--val_files", b, "--tokenizer", "bytes", "--eos_id", 70000,
                "--out", out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["token_dtype"] == "uint32" and meta["vocab_size"] == 70001
    assert meta["model_vocab_size"] == 70016 and meta["empty_documents_skipped"] == 1
    val = read_split(out, "val", "uint32")
    assert val.tolist() == [*b"held out", 70000, *b"also held out", 70000]
    assert "data.token_dtype=uint32" in overrides(stdout)


def test_num_proc_gives_identical_output(tmp_path, bpe):
    src = next(bpe[0].parent.glob("*.jsonl"))
    tok = bpe[0] / "tokenizer.json"
    common = ["--files", src, "--tokenizer", tok, "--shard_tokens", 2000, "--batch_docs", 16]
    ok(*common, "--out", tmp_path / "p1", "--num_proc", 1)
    ok(*common, "--out", tmp_path / "p2", "--num_proc", 2)
    same_output(tmp_path / "p1", tmp_path / "p2")


@pytest.mark.parametrize("where", ["after_rename", "mid_shard"])
def test_resume_after_interruption_is_identical(tmp_path, bpe, monkeypatch, where):
    src = next(bpe[0].parent.glob("*.jsonl"))
    args = ["--files", src, "--train_tokenizer", 300, "--shard_tokens", 2500,
            "--val_fraction", 0.2, "--batch_docs", 8, "--out"]
    ok(*args, tmp_path / "ref")
    encoded = []
    real_encode = prep.encode_documents
    monkeypatch.setattr(prep, "encode_documents",
                        lambda tok, texts, eos: (encoded.append(len(texts)),
                                                 real_encode(tok, texts, eos))[1])
    if where == "after_rename":
        # Killed between a shard's rename and its record in progress.json: the shard on disk
        # is not counted, and the resumed run must write it again.
        real_commit, calls = prep._commit_progress, []

        def commit(out, progress):
            calls.append(1)
            if len(calls) == 6:
                raise KeyboardInterrupt
            real_commit(out, progress)
        monkeypatch.setattr(prep, "_commit_progress", commit)
    else:
        real_add, calls = prep.ShardWriter.add, []

        def add(self, ids, eos_inside):  # killed half-way through writing a shard
            calls.append(1)
            if len(calls) == 100:
                raise KeyboardInterrupt
            real_add(self, ids, eos_inside)
        monkeypatch.setattr(prep.ShardWriter, "add", add)
    rc, _, err = call(*args, tmp_path / "run")
    assert rc == 130 and "rerun" in err
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert not progress["complete"] and progress["splits"]["train"]["shards"]
    recorded = {f"{sp}/{sh['file']}" for sp, st in progress["splits"].items()
                for sh in st["shards"]}
    on_disk = {p.relative_to(tmp_path / "run").as_posix()
               for p in (tmp_path / "run").glob("*/shard_*.bin")}
    if where == "after_rename":  # a complete shard that progress.json does not know of
        assert len(on_disk - recorded) == 1 and recorded < on_disk
    else:  # a half-written shard
        assert list((tmp_path / "run").glob("*/.shard_*.bin.tmp")) and recorded == on_disk
    monkeypatch.undo()
    monkeypatch.setattr(prep, "encode_documents",
                        lambda tok, texts, eos: (encoded.append(len(texts)),
                                                 real_encode(tok, texts, eos))[1])
    encoded.clear()
    ok(*args, tmp_path / "run")
    same_output(tmp_path / "ref", tmp_path / "run")
    done = sum(s["documents"] for s in progress["splits"].values())
    assert done > 0 and sum(encoded) == 300 - done  # documents in complete shards were skipped


def test_existing_output_is_never_silently_replaced(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", corpus.generate_corpus(20, seed=4))
    out = tmp_path / "out"
    base = ["--files", src, "--tokenizer", "bytes", "--eos_id", 0, "--out", out]
    ok(*base)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra, flag in ((["--seed", 1], "--seed"), (["--shard_tokens", 10], "--shard_tokens"),
                        (["--val_fraction", 0.5], "--val_fraction")):
        rc, _, err = call(*base, *extra)
        assert rc == 2 and err.startswith("error:") and f"{flag}: was" in err, err
    src.write_text(src.read_text() + json.dumps({"text": "one more"}) + "\n")
    rc, _, err = call(*base)
    assert rc == 2 and "--files (file sizes)" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    ok(*base, "--seed", 1, "--overwrite")
    assert json.loads((out / "meta.json").read_text())["args"]["--seed"] == 1
    assert "already complete" in ok(*base, "--seed", 1, "--num_proc", 2)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc, _, err = call(*base[:-1], foreign)
    assert rc == 2 and "not empty" in err and (foreign / "notes.txt").read_text() == "keep me"


def test_bad_inputs(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ["some text"])
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "csv_dir").mkdir()
    (tmp_path / "csv_dir" / "a.csv").write_text("x")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  \n"}) + "\n")
    write_jsonl(tmp_path / "other_key.jsonl", ["x"], key="content")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "garbage.json").write_text("{not a tokenizer")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    tok = ["--tokenizer", "bytes", "--eos_id", "0"]
    cases = [
        (["--files", tmp_path / "nope.jsonl", *tok], "'{t}/nope.jsonl' does not exist"),
        (["--files", tmp_path / "empty_dir", *tok], "directory without data files"),
        (["--files", tmp_path / "csv_dir" / "a.csv", *tok], "unsupported file type"),
        (["--files", str(tmp_path / "*.xml"), *tok], "matches no"),
        (["--files", tmp_path / "blank.jsonl", *tok], "no documents found"),
        (["--files", tmp_path / "other_key.jsonl", *tok], "no field 'text' (--text_key); "
                                                          "its fields: content, id"),
        (["--files", tmp_path / "p.parquet", *tok], "no column 'text' (--text_key)"),
        (["--files", tmp_path / "bad.jsonl", *tok], "line 2 is not valid JSON"),
        (["--files", tmp_path / "num.jsonl", *tok], "is a int, expected a string"),
        (["--files", tmp_path / "latin1.txt", *tok], "is not UTF-8"),
        (["--files", good, "--tokenizer", tmp_path / "garbage.json"],
         "not a readable tokenizer.json"),
        (["--files", good, "--tokenizer", tmp_path / "none.json"], "--tokenizer"),
        (["--files", good, "--tokenizer", "bytes"], "--eos_id"),
        (["--files", good], "exactly one of --tokenizer"),
        ([*tok], "exactly one source"),
        (["--files", good, "--hf_dataset", "x", *tok], "exactly one source"),
        (["--files", good, *tok, "--val_fraction", 1.5], "--val_fraction must be in [0, 1)"),
        (["--files", good, "--train_tokenizer", 100], "--train_tokenizer must be >= 258"),
        (["--files", good, *tok, "--bogus"], "unrecognized arguments: --bogus"),
    ]
    for i, (args, want) in enumerate(cases):
        out = tmp_path / f"out{i}"
        rc, stdout, err = call(*args, "--out", out)
        assert rc == 2, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert want.format(t=tmp_path) in err, (want, err)
        if "line 2" not in want:  # all but an error deep in a file come before OUT is made
            assert not out.exists(), args
    # An error found part-way leaves no shard, and a rerun after the fix needs no --overwrite.
    assert not list((tmp_path / "out7").rglob("*.bin"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "fixed"}\n')
    assert call("--files", tmp_path / "bad.jsonl", *tok, "--out", tmp_path / "out7")[0] == 0


def test_hub_path_with_a_stand_in_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def load_dataset(name, config, split, streaming):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": "hub one", "url": "u"}, {"text": "hub two", "url": "v"}])
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "out"
    ok("--hf_dataset", "org/set", "--hf_config", "c", "--streaming", "--tokenizer", "bytes",
       "--eos_id", 0, "--out", out, "--val_fraction", 0)
    assert seen == {"name": "org/set", "config": "c", "split": "train", "streaming": True}
    assert read_split(out, "train", "uint16").tolist() == [*b"hub one", 0, *b"hub two", 0]


def test_script_mode(tmp_path):
    """As a script (its light import of data.tokenizer), a run and an error."""
    src = write_jsonl(tmp_path / "d.jsonl", ["a b c"] * 3)
    cmd = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--files", str(src),
           "--tokenizer", "bytes", "--eos_id", "0", "--no_progress", "--out"]
    p = subprocess.run([*cmd, str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert overrides(p.stdout)[0] == "data.kind=tokens"
    p = subprocess.run([*cmd[:3], str(tmp_path / "missing.jsonl"), *cmd[4:],
                        str(tmp_path / "o2")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "does not exist" in p.stderr


def test_tiny_corpus(tmp_path):
    stories = corpus.generate_corpus(300, seed=0)
    assert stories == corpus.generate_corpus(300, seed=0)
    assert stories != corpus.generate_corpus(300, seed=1)
    words = [len(s.split()) for s in stories]
    assert min(words) >= 50 and max(words) <= 300
    for s in stories:  # the hero's name comes back later: predictable from context
        first = s.split(".")[0]
        name = next(n for ns in corpus.NAMES.values() for n in ns if f" {n}" in f" {first}")
        assert s.count(name) >= 3, s
    assert len(set(stories)) == len(stories)
    out = tmp_path / "sub" / "tiny.jsonl"
    assert corpus.main(["--out", str(out), "--docs", "50", "--seed", "0"]) == 0
    assert [json.loads(ln)["text"] for ln in out.read_text().splitlines()] == stories[:50]
