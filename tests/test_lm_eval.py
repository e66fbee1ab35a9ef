"""The lm-evaluation-harness adapter (evals/lm_eval_adapter.py) and CLI (evals/lm_eval.py).

Numbers are checked against a reference written here: the model's forward at each sequence's
exact length (no padding, no batching), log_softmax in float64 on the host. Models are random
tiny ones (init_std 0.3, so the argmax has margins well above float32 rounding); the local
tasks live in tests/fixtures/lm_eval_tasks/.
"""

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from data.tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402
from evals import lm_eval as cli  # noqa: E402
from evals.lm_eval_adapter import BYTE_PREFIX, AdapterError, MnemaxLM  # noqa: E402
from models.config_check import load_config  # noqa: E402
from models.generation import generate  # noqa: E402
from models.lm import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "fixtures" / "lm_eval_tasks"
MAX_LEN = 64
TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", f"model.max_len={MAX_LEN}",
        "model.dtype=float32", "model.init_std=0.3"]


def tiny_model(mixer: str = "attn"):
    return build_model(load_config(None, TINY + [f"model.mixers=[{mixer}]"]).model, seed=0)


def req(*args) -> Instance:
    return Instance("loglikelihood", {}, tuple(args), 0)


def read_jsonl(name: str) -> list[dict]:
    return [json.loads(s) for s in (TASKS / name).read_text(encoding="utf-8").splitlines() if s]


class Reference:
    """log p from the model's forward on one unpadded sequence at a time."""

    def __init__(self, model):
        graphdef, self.state = nnx.split(model)
        self.forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0])

    def logprobs(self, ids: list[int]) -> np.ndarray:
        """[n] ids -> [n, V] float64 log p(next token | ids[:i + 1])."""
        logits = np.asarray(self.forward(self.state, jnp.asarray([ids], jnp.int32))[0],
                            np.float64)
        top = logits.max(-1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))

    def score(self, seq: list[int], k: int) -> float:
        """Sum of log p of the last k tokens of seq, each given everything before it."""
        lp = self.logprobs(seq[:-1])
        n = len(seq) - 1
        return float(sum(lp[n - k + i, seq[n - k + i + 1]] for i in range(k)))

    def loglikelihood(self, ctx: list[int], cont: list[int]) -> float:
        """The adapter's rule: the last max_len + 1 tokens of ctx + cont."""
        return self.score((ctx + cont)[-(MAX_LEN + 1):], len(cont))

    def rolling(self, ids: list[int], prefix: int) -> float:
        """Every token once: the first MAX_LEN from the prefix on, then blocks of MAX_LEN,
        each read with the MAX_LEN tokens before its end (lm-eval's rolling windows)."""
        first = min(MAX_LEN, len(ids))
        total, done = self.score([prefix] + ids[:first], first), first
        while done < len(ids):
            end = min(done + MAX_LEN, len(ids))
            total += self.score(ids[end - MAX_LEN - 1:end], end - done)
            done = end
        return total


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ref(model):
    return Reference(model)


@pytest.fixture(scope="module")
def lm(model):
    return MnemaxLM(model, ByteTokenizer(), batch_size=4)


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    alphabet = "abcdefgh ijklmnop.,"
    text = lambda lo, hi: "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))
    pairs = [(text(1, 40), text(1, 20)) for _ in range(n)]
    return pairs + [(text(70, 80), text(5, 10))]        # longer than max_len + 1: cut on the left


# ----------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_matches_direct_forward_in_any_order_and_batch(model, ref, lm):
    pairs = random_pairs(5)
    expected = [ref.loglikelihood(list(c.encode()), list(x.encode())) for c, x in pairs]
    got = lm.loglikelihood([req(c, x) for c, x in pairs])
    np.testing.assert_allclose([g[0] for g in got], expected, rtol=1e-5, atol=1e-4)

    order = list(range(len(pairs)))
    random.Random(1).shuffle(order)
    for batch_size in (1, 3):
        other = MnemaxLM(model, ByteTokenizer(), batch_size=batch_size)
        shuffled = other.loglikelihood([req(*pairs[i]) for i in order])
        np.testing.assert_allclose([s[0] for s in shuffled], [got[i][0] for i in order],
                                   rtol=1e-5, atol=1e-4)
        assert [s[1] for s in shuffled] == [got[i][1] for i in order]


def test_is_greedy_and_empty_context(ref, lm):
    ctx = list(b"The answer is")
    cont = []
    for _ in range(5):            # the argmax continuation, one token at a time
        seq = ctx + cont          # read at one padded shape: the model is causal
        cont.append(int(ref.logprobs(seq + [0] * (MAX_LEN - len(seq)))[len(seq) - 1].argmax()))
    (lp, greedy), = lm._loglikelihood_tokens([(None, ctx, cont)])
    assert greedy and lp == pytest.approx(ref.score(ctx + cont, len(cont)), abs=1e-4)
    wrong = cont[:-1] + [(cont[-1] + 1) % 256]
    (_, greedy), = lm._loglikelihood_tokens([(None, ctx, wrong)])
    assert not greedy

    # An empty context conditions on the prefix token ("\n" for bytes).
    (lp, _), = lm.loglikelihood([req("", "abc")])
    assert lm.prefix_token_id == BYTE_PREFIX
    assert lp == pytest.approx(ref.score([BYTE_PREFIX] + list(b"abc"), 3), abs=1e-4)


def test_missing_prefix_token_and_long_continuation_are_errors(model):
    class NoPrefix(ByteTokenizer):
        source = "ids-only"

    lm = MnemaxLM(model, NoPrefix())
    with pytest.raises(AdapterError, match="no eos or bos"):
        lm.loglikelihood([req("", "abc")])
    with pytest.raises(AdapterError, match="no eos or bos"):
        lm.loglikelihood_rolling([req("abc")])
    with pytest.raises(AdapterError, match="does not fit"):
        lm.loglikelihood([req("a", "b" * (MAX_LEN + 1))])


# ----------------------------------------------------------------------------- rolling


def test_loglikelihood_rolling_short_and_windowed(ref, lm):
    short = "a short document."
    long = "A longer document, " * 8                  # 152 bytes: three windows of 64
    got = lm.loglikelihood_rolling([req(short), req(long), req("")])
    ids = list(short.encode())
    assert got[0] == pytest.approx(ref.score([BYTE_PREFIX] + ids, len(ids)), abs=1e-4)
    assert got[1] == pytest.approx(ref.rolling(list(long.encode()), BYTE_PREFIX), abs=1e-3)
    assert got[2] == 0.0


# ----------------------------------------------------------------------------- generation


def test_generate_until_matches_generate(model):
    # Batches of 2 (longest first): both prefill 8 tokens into a 32-token buffer.
    prompts = ["Once upon", "The quick brown fox", "It was a dark"]
    ids = [list(p.encode()) for p in prompts]
    full = [ByteTokenizer().decode(t) for t in generate(model, ids, max_new_tokens=12).tokens]
    # A stop string that occurs inside the first continuation (not at its start).
    stop = next(ch for ch in full[0][2:] if ch != "\ufffd")
    expected = [f[:f.find(stop)] if stop in f else f for f in full]
    assert len(expected[0]) < len(full[0])

    lm = MnemaxLM(model, ByteTokenizer(), batch_size=2, stop_check_every=4)
    kw = {"until": [stop], "max_gen_toks": 12}
    reqs = [Instance("generate_until", {}, (p, kw), 0) for p in prompts]
    reqs.append(Instance("generate_until", {}, (prompts[1], {"until": ["\x00"],
                                                              "max_gen_toks": 12}), 0))
    assert lm.generate_until(reqs) == expected + [full[1]]


def test_generate_until_stops_at_eos(model):
    prompts = ["Once upon", "ab"]
    ids = [list(p.encode()) for p in prompts]
    plain = generate(model, ids, max_new_tokens=12).tokens
    eos = plain[0][5]

    class EosBytes(ByteTokenizer):
        eos_id = eos

    lm = MnemaxLM(model, EosBytes(), batch_size=2)
    kw = {"until": [], "max_gen_toks": 12}
    got = lm.generate_until([Instance("generate_until", {}, (p, kw), 0) for p in prompts])
    stopped = generate(model, ids, max_new_tokens=12, stop_tokens=[eos]).tokens
    want = [EosBytes().decode(t[:-1] if t and t[-1] == eos else t) for t in stopped]
    assert got == want and len(got[0]) < len(EosBytes().decode(plain[0]))


# ----------------------------------------------------------------------------- a BPE tokenizer


def test_bpe_tokenizer_pairs_and_eos_prefix(model, ref, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat log big small red".split()
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9)))
                 for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<|endoftext|>", "<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path / "tokenizer.json")
    assert t.eos_id is not None and t.vocab_size <= 256

    lm = MnemaxLM(model, t, batch_size=4)
    assert lm.prefix_token_id == t.eos_id
    ctx, cont = "the cat sat", " on the red mat"
    c, whole = t.encode(ctx), t.encode(ctx + cont)
    assert whole[:len(c)] == c
    expected = ref.score(whole, len(whole) - len(c))
    # lm-eval's pair rule: a trailing space of the context belongs to the continuation.
    got = lm.loglikelihood([req(ctx, cont), req(ctx + " ", cont[1:]), req("", "the cat")])
    assert got[0][0] == pytest.approx(expected, abs=1e-4)
    assert got[1][0] == pytest.approx(expected, abs=1e-4)
    start = t.encode("the cat")
    assert got[2][0] == pytest.approx(ref.score([t.eos_id] + start, len(start)), abs=1e-4)
    doc = t.encode("the big dog ran under a log")
    rolled, = lm.loglikelihood_rolling([req("the big dog ran under a log")])
    assert rolled == pytest.approx(ref.score([t.eos_id] + doc, len(doc)), abs=1e-4)


# ----------------------------------------------------------------------------- bos and eos

WORDS = "the a cat dog sat ran on under mat log big small red".split()


def word_tokenizer(path: Path, specials: list[str], template: str | None):
    """A WordLevel tokenizer.json (one id per word, specials first) loaded through
    data/tokenizer.py; template: a TemplateProcessing single-sequence rule such as "<s> $A"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(specials + ["<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(specials + ["<unk>"])
    if template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return load_tokenizer(path / "tokenizer.json")


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory):
    """bos <s> (id 0) and eos </s> (id 1); its post-processor puts <s> before every text."""
    return word_tokenizer(tmp_path_factory.mktemp("bos_eos"), ["<s>", "</s>"], "<s> $A")


def recording(lm):
    """lm, with every (key, context ids, continuation ids) it scores appended to lm.seen."""
    lm.seen, score = [], lm._loglikelihood_tokens
    lm._loglikelihood_tokens = lambda reqs, *a, **k: (lm.seen.extend(reqs), score(reqs, *a, **k))[1]
    return lm


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_prefix_is_bos_by_default_and_eos_with_the_flag(model, ref, bos_tok):
    bos, eos = bos_tok.bos_id, bos_tok.eos_id
    assert (bos, eos, bos_tok.adds_bos) == (0, 1, True)
    doc = words(150, seed=3)                           # 150 tokens: windows of 64, 64 and 22
    ids = bos_tok.encode(doc)
    start = bos_tok.encode("the cat sat")
    got = {}
    for flag, prefix in ((None, bos), ("bos_else_eos", bos), ("eos", eos), (eos, eos)):
        lm = recording(MnemaxLM(model, bos_tok, batch_size=4, prefix_token_id=flag))
        assert lm.prefix_token_id == prefix
        (empty, _), = lm.loglikelihood([req("", "the cat sat")])
        assert lm.seen[0][1:] == ([prefix], start)    # no bos from the post-processor here
        lm.seen.clear()
        rolled, = lm.loglikelihood_rolling([req(doc)])
        # Disjoint windows: the first predicts ids[:64] from the prefix token alone (no bos
        # from the post-processor after it), the last reads the 64 tokens before its end.
        assert [c for _, c, _ in lm.seen] == [[prefix], ids[63:64], ids[85:128]]
        assert [x for _, _, x in lm.seen] == [ids[:64], ids[64:128], ids[128:]]
        assert empty == pytest.approx(ref.score([prefix] + start, len(start)), abs=1e-4)
        assert rolled == pytest.approx(ref.rolling(ids, prefix), abs=1e-3)
        got[prefix] = (empty, rolled)
    assert abs(got[bos][1] - got[eos][1]) > 1e-2      # the flag changes the numbers


def test_contexts_get_exactly_one_bos(model, ref, bos_tok):
    bos, eos = bos_tok.bos_id, bos_tok.eos_id
    lm = recording(MnemaxLM(model, bos_tok, batch_size=4))
    plain = bos_tok.encode("the cat sat")
    assert lm.tok_encode("the cat sat") == [bos] + plain
    assert lm.tok_encode("<s> the cat sat") == [bos] + plain          # not doubled
    assert lm.tok_encode("the cat sat", add_special_tokens=False) == plain
    ctx, cont = "the big dog", " ran under a log"
    whole = [bos] + bos_tok.encode(ctx + cont)
    n = len(bos_tok.encode(cont))
    got = lm.loglikelihood([req(ctx, cont), req("<s> " + ctx, cont)])
    assert [c for _, c, _ in lm.seen] == [whole[:-n]] * 2
    assert [x for _, _, x in lm.seen] == [whole[-n:]] * 2
    for lp, _ in got:
        assert lp == pytest.approx(ref.score(whole, n), abs=1e-4)

    # HFLM's tok_encode: a text starting with the prefix token's text gets no special tokens.
    by_eos = MnemaxLM(model, bos_tok, prefix_token_id="eos")
    assert by_eos.tok_encode("</s> the cat sat") == [eos] + plain
    assert by_eos.tok_encode("the cat sat") == [bos] + plain
    # add_bos_token overrides the tokenizer's rule either way.
    assert MnemaxLM(model, bos_tok, add_bos_token=False).tok_encode("the cat sat") == plain
    no_rule = word_tokenizer(Path(bos_tok.source).parent / "no_rule", ["<s>", "</s>"], None)
    assert not no_rule.adds_bos
    assert MnemaxLM(model, no_rule).tok_encode("the cat sat") == plain
    assert MnemaxLM(model, no_rule, add_bos_token=True).tok_encode("the cat sat") == [0] + plain


def test_tokenizer_without_bos_falls_back_to_eos(model, ref, tmp_path):
    tok = word_tokenizer(tmp_path, ["</s>"], None)
    assert (tok.bos_id, tok.eos_id, tok.adds_bos) == (None, 0, False)
    lm = MnemaxLM(model, tok, batch_size=4)
    assert lm.prefix_token_id == tok.eos_id
    doc = words(80, seed=4)
    ids = tok.encode(doc)
    assert lm.tok_encode(doc) == ids
    (empty, _), = lm.loglikelihood([req("", "the cat")])
    assert empty == pytest.approx(ref.score([0] + tok.encode("the cat"), 2), abs=1e-4)
    rolled, = lm.loglikelihood_rolling([req(doc)])
    assert rolled == pytest.approx(ref.rolling(ids, tok.eos_id), abs=1e-3)
    with pytest.raises(AdapterError, match="add_bos_token=True but tokenizer .* has no bos"):
        MnemaxLM(model, tok, add_bos_token=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"prefix_token_id": "bos"}, "prefix_token_id must be one of bos_else_eos, eos or a token"),
    ({"prefix_token_id": 256}, "prefix_token_id 256 is outside the vocabulary"),
    ({"prefix_token_id": "eos"}, "prefix_token_id='eos' but tokenizer 'bytes' has no eos"),
    ({"add_bos_token": "yes"}, "add_bos_token must be True, False or None"),
])
def test_bad_prefix_settings(model, kwargs, message):
    with pytest.raises(AdapterError, match=re.escape(message)):
        MnemaxLM(model, ByteTokenizer(), **kwargs)


# ----------------------------------------------------------------------------- through lm-eval


def test_simple_evaluate_on_local_tasks(ref, lm):
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["mnemax_tiny_mc", "mnemax_tiny_ppl"],
                                  task_manager=tm, bootstrap_iters=0, log_samples=False)

    docs = read_jsonl("mnemax_tiny_mc.jsonl")
    lls = lm.loglikelihood([req(f"Question: {d['question']}\nAnswer:", f" {c}")
                            for d in docs for c in d["choices"]])
    hits, i = [], 0
    for d in docs:
        mine = [ll for ll, _ in lls[i:i + len(d["choices"])]]
        i += len(d["choices"])
        hits.append(int(np.argmax(mine)) == d["label"])
    acc = out["results"]["mnemax_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(np.mean(hits))

    texts = [d["text"] for d in read_jsonl("mnemax_tiny_ppl.jsonl")]
    total = sum(ref.rolling(list(s.encode()), BYTE_PREFIX) for s in texts)
    n_bytes = sum(len(s.encode()) for s in texts)
    n_words = sum(len(re.split(r"\s+", s)) for s in texts)
    ppl = out["results"]["mnemax_tiny_ppl"]
    assert ppl["bits_per_byte,none"] == pytest.approx(-total / (math.log(2) * n_bytes),
                                                      rel=1e-5)
    assert ppl["byte_perplexity,none"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-5)
    assert ppl["word_perplexity,none"] == pytest.approx(math.exp(-total / n_words), rel=1e-4)


@pytest.mark.slow
def test_recurrent_mixer_loglikelihood_and_rolling():
    model = tiny_model("gated_deltanet")
    ref = Reference(model)
    pairs = random_pairs(3, seed=2)
    expected = [ref.loglikelihood(list(c.encode()), list(x.encode())) for c, x in pairs]
    for batch_size in (1, 4):
        got = MnemaxLM(model, ByteTokenizer(), batch_size=batch_size).loglikelihood(
            [req(c, x) for c, x in pairs])
        np.testing.assert_allclose([g[0] for g in got], expected, rtol=1e-5, atol=1e-4)
    long = "A longer document, " * 8
    rolled, = MnemaxLM(model, ByteTokenizer()).loglikelihood_rolling([req(long)])
    assert rolled == pytest.approx(ref.rolling(list(long.encode()), BYTE_PREFIX), abs=1e-3)


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    from training.loop import train

    root = tmp_path_factory.mktemp("lm_eval_run")
    corpus = root / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("\n".join(" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"])
                                         for _ in range(12)) for _ in range(120)))
    train(load_config(None, TINY + [
        "data.kind=bytes", f"data.path={corpus}", "data.tokenizer=bytes", "data.seq_len=32",
        "data.batch_size=4", "train.steps=2", "train.eval_every=2", "train.eval_batches=1",
        "train.checkpoint_every=2", "train.progress_bar=false", "optim.warmup_steps=1",
        f"run_dir={root / 'run'}"]))
    return root / "run"


@pytest.mark.slow
def test_cli_on_a_trained_run(byte_run, tmp_path, capsys):
    import lm_eval

    out = tmp_path / "sub" / "results.json"
    rc = cli.main(["--run_dir", str(byte_run), "--tasks", "mnemax_tiny_mc,mnemax_tiny_ppl",
                   "--include_path", str(TASKS), "--no_default_tasks", "--batch_size", "4",
                   "--limit", "4", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mnemax_tiny_mc" in printed and "bits_per_byte" in printed
    res = json.loads(out.read_text())
    acc = res["results"]["mnemax_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["n-samples"]["mnemax_tiny_mc"]["effective"] == 4
    assert res["config"]["step"] == 2 and res["config"]["run_dir"] == str(byte_run)
    assert "samples" not in res and res["results"]["mnemax_tiny_ppl"]["bits_per_byte,none"] > 0

    # The same through lm-eval's model registry (importing the adapter registered "mnemax").
    from lm_eval.tasks import TaskManager

    again = lm_eval.simple_evaluate(
        model="mnemax", model_args=f"run_dir={byte_run},batch_size=3", tasks=["mnemax_tiny_mc"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), limit=4,
        bootstrap_iters=0)
    assert again["results"]["mnemax_tiny_mc"]["acc,none"] == pytest.approx(acc)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("args, message", [
    (["--run_dir", "{tmp}/missing", "--tasks", "t"], "run dir '{tmp}/missing' does not exist"),
    (["--run_dir", "{tmp}"], "the following arguments are required: --tasks"),
    (["--run_dir", "{tmp}", "--tasks", "t", "--batch_size", "0"], "--batch_size must be >= 1"),
    (["--run_dir", "{tmp}", "--tasks", "t", "--limit", "2.5"], "whole number"),
    (["--run_dir", "{tmp}", "--tasks", "t", "--no_default_tasks"], "needs an --include_path"),
    (["--run_dir", "{tmp}", "--tasks", "t", "--prefix_token", "bos"],
     "--prefix_token must be bos_else_eos, eos or a token id, got 'bos'"),
])
def test_cli_bad_arguments(tmp_path, capsys, args, message):
    assert cli.main([a.format(tmp=tmp_path) for a in args]) == 2
    assert message.format(tmp=tmp_path) in _error(capsys)


def test_cli_unknown_task_lists_close_names(tmp_path, capsys):
    rc = cli.main(["--run_dir", str(tmp_path), "--tasks", "mnemax_tiny_mcq",
                   "--include_path", str(TASKS), "--no_default_tasks"])
    assert rc == 2
    line = _error(capsys)
    assert "unknown task 'mnemax_tiny_mcq'" in line and "close: mnemax_tiny_mc" in line


def test_cli_run_without_tokenizer(tmp_path, capsys, monkeypatch, model):
    import training.checkpoint

    cfg = load_config(None, TINY)                   # data.kind=mqar, no data.tokenizer
    monkeypatch.setattr(training.checkpoint, "restore_for_inference",
                        lambda run_dir, step=None: (cfg, model, 1))
    rc = cli.main(["--run_dir", str(tmp_path), "--tasks", "mnemax_tiny_mc",
                   "--include_path", str(TASKS), "--no_default_tasks"])
    assert rc == 2
    assert "this run has no tokenizer (data.tokenizer); lm-eval needs text" in _error(capsys)


def test_importing_evals_is_cheap():
    code = ("import sys, evals, evals.lm_eval; "
            "assert not {'lm_eval', 'jax'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
