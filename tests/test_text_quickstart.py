"""The README's "Training on text" commands, end to end from an empty directory: make the corpus,
prepare it (a trained BPE tokenizer, packed shards), train the tiny text config and watch the
eval perplexity fall, generate text with the run's tokenizer, and evaluate the run with the
lm-eval adapter on a local task.

Each command is the README's, run as a subprocess as printed, plus size overrides that keep this
test at a minute (fewer documents and steps): the test reads the commands out of README.md, so a
README edit that changes one and not the other fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Extra arguments per command (matched by the command's first words): a small corpus and a short
# run. Everything else is the README's command as printed.
SMALLER = {
    "scripts/make_tiny_corpus.py": ["--docs", "600"],
    "scripts/prepare_data.py": ["--no_progress"],
    "train.py": ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=40",
                 "train.log_every=20", "train.eval_batches=2", "data.batch_size=16",
                 "model.n_layers=2", "train.progress_bar=false"],
    "generate.py": [],
    "evals.lm_eval": ["--limit", "8"],
}


def readme_commands() -> list[list[str]]:
    """The commands of README.md's text block: the ```bash block under "### Training on text"
    (a trailing backslash continues a line)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Training on text", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = block.replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _key(words: list[str]) -> str:
    return words[2] if words[1] == "-m" else words[1]


def test_readme_block_is_what_this_test_runs():
    cmds = readme_commands()
    assert [_key(c) for c in cmds] == list(SMALLER)
    assert all(c[0] == "python" for c in cmds)


@pytest.mark.slow
def test_text_quickstart_end_to_end(tmp_path):
    # A fresh working directory with the checkout's entry points (the packages are installed).
    for name in ("train.py", "generate.py", "scripts", "configs", "evals"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    outputs = {}
    for words in readme_commands():
        key = _key(words)
        argv = [sys.executable, *words[1:], *SMALLER[key]]
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, f"{shlex.join(words)} failed:\n{p.stdout}\n{p.stderr}"
        outputs[key] = p.stdout

    meta = json.loads((tmp_path / "corpus" / "tiny" / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["splits"]["val"]["documents"] > 0
    run = tmp_path / "runs" / "tiny_text"
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_ppl" in r]
    assert [r["step"] for r in evals] == [20, 40]
    # Perplexity falls, from near the uniform 512 at init; bits per byte is reported beside it.
    assert evals[-1]["eval_ppl"] < evals[0]["eval_ppl"] < 512
    assert all(0 < r["eval_bpb"] < 9 for r in evals)
    assert (run / "tokenizer" / "tokenizer.json").is_file()

    # The generated text is decoded by the run's tokenizer: words, not ids.
    out = re.search(r"\[0\] output: '(.*)'", outputs["generate.py"]).group(1)
    assert re.search(r"[a-z]{2,} [a-z]{2,}", out), outputs["generate.py"]

    # lm-eval's results table has both local tasks with finite numbers: an accuracy in [0, 1]
    # (the multiple-choice hero question) and bits per byte of held-out stories.
    table = outputs["evals.lm_eval"]
    acc = re.search(r"\|tiny_stories_names\s*\|.*?\|acc\s*\|[^|]*\|\s*([\d.]+)\|", table)
    bpb = re.search(r"\|tiny_stories_ppl\s*\|.*?\|bits_per_byte\s*\|[^|]*\|\s*([\d.]+)\|", table)
    assert acc and bpb, table
    assert 0.0 <= float(acc.group(1)) <= 1.0 and 0.0 < float(bpb.group(1)) < 9.0
