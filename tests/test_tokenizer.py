"""data/tokenizer.py: Hugging Face tokenizer.json files and directories, SentencePiece models and
bytes behind one interface; what a run dir keeps; clear errors for a bad tokenizer path."""

import random

import pytest

from data import DataError
from data.tokenizer import (
    ByteTokenizer,
    load_tokenizer,
    save_to_run_dir,
    tokenizer_for_run,
)
from models.config_check import load_config

WORDS = ("the cat dog sat ran on under a big small red mat hat sun moon and then "
         "she he said café naïve über").split()


def _texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(300), trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("sp")
    (d / "corpus.txt").write_text("\n".join(_texts(400)))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "sp"),
                                   vocab_size=40, character_coverage=1.0,
                                   minloglevel=2)
    return d / "sp.model"


def test_hf_round_trip_from_file_and_directory(hf_file):
    for spec in (hf_file, hf_file.parent):
        tok = load_tokenizer(spec)
        assert tok.eos_id == tok.encode("<|endoftext|>")[0] and tok.bos_id is None
        assert tok.vocab_size == 300
        for text in _texts(20, seed=1):
            ids = tok.encode(text)
            assert max(ids) < tok.vocab_size and tok.decode(ids) == text
            # eos adds no text bytes; the rest are the text's UTF-8 bytes
            assert tok.text_bytes(ids + [tok.eos_id]) == len(text.encode("utf-8"))


def test_sentencepiece_round_trip(sp_file):
    tok = load_tokenizer(sp_file)
    assert tok.vocab_size == 40 and tok.eos_id is not None
    for text in _texts(20, seed=2):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.text_bytes(ids + [tok.eos_id]) == len(text.encode("utf-8"))
    assert load_tokenizer(sp_file.parent).vocab_size == 40   # the one *.model in a directory


def test_bytes_tokenizer():
    tok = load_tokenizer("bytes")
    text = "héllo ☃"
    assert tok.encode(text) == list(text.encode("utf-8")) and tok.decode(tok.encode(text)) == text
    assert tok.decode([0xC3]) == "\ufffd" and tok.text_bytes([1, 2, 300]) == 2


def test_run_dir_copy_wins_over_the_config_path(hf_file, tmp_path):
    cfg = load_config(None, [f"data.tokenizer={hf_file}"])
    run = tmp_path / "run"
    save_to_run_dir(str(hf_file), run)
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == hf_file.read_bytes()
    moved = load_config(None, [f"data.tokenizer={tmp_path / 'gone' / 'tokenizer.json'}"])
    assert tokenizer_for_run(moved, run).vocab_size == 300       # the corpus moved: still works
    assert tokenizer_for_run(cfg).vocab_size == 300
    assert isinstance(tokenizer_for_run(load_config(None, ["data.kind=bytes",
                                                           "data.path=x"])), ByteTokenizer)
    assert tokenizer_for_run(load_config(None, [])) is None       # MQAR: ids only


def test_bad_tokenizer_paths(tmp_path, hf_file):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without one tokenizer"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.model").write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
    (tmp_path / "vocab.txt").write_text("a b c")
    with pytest.raises(DataError, match="unknown tokenizer file type"):
        load_tokenizer(tmp_path / "vocab.txt")
