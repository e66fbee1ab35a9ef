"""Datasets of the tiny-stories lm-eval tasks, generated on the fly (no files, no download).

The stories come from scripts/make_tiny_corpus.py with seed EVAL_SEED, never the training
corpus's seed 0 (the templates are shared, the stories' casts and orders are not).

* tiny_stories_names: in-context recall. The first character a story names ("... a little fox
  named Sam.", usually its hero) comes back later; the context is the story up to one later
  mention of that name, and the choices are the name and three other names of the same
  pronoun list, so the grammar gives nothing away and only the context does. Chance is 0.25.
* tiny_stories_ppl: whole-story likelihood (word / byte perplexity, bits per byte).
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

EVAL_SEED = 20261203
N_DOCS = 200
_GENERATOR = Path(__file__).resolve().parents[3] / "scripts" / "make_tiny_corpus.py"


def _generator():
    spec = importlib.util.spec_from_file_location("make_tiny_corpus", _GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def name_questions(n_docs: int = N_DOCS, seed: int = EVAL_SEED) -> list[dict]:
    """[{"context", "choices", "label"}]: a story before a later mention of its first-named
    character."""
    gen = _generator()
    rng = random.Random(seed + 1)
    out = []
    for story in gen.generate_corpus(n_docs, seed):
        m = re.search(r"named (\w+)\.", story)
        if m is None:
            continue
        name = m.group(1)
        later = [k.start() for k in re.finditer(rf"\b{name}\b", story) if k.start() > m.end()]
        if not later:
            continue
        cut = rng.choice(later)
        pronoun = "she" if name in gen.NAMES["she"] else "he"
        others = rng.sample([x for x in gen.NAMES[pronoun] if x != name], 3)
        choices = [name, *others]
        rng.shuffle(choices)
        out.append({"context": story[:cut].rstrip(" "), "choices": choices,
                    "label": choices.index(name)})
    return out


def _dataset(rows: list[dict]) -> dict:
    import datasets

    return {"test": datasets.Dataset.from_list(rows)}


def names(**metadata) -> dict:
    return _dataset(name_questions())


def stories(**metadata) -> dict:
    return _dataset([{"text": s} for s in _generator().generate_corpus(N_DOCS // 4, EVAL_SEED)])
