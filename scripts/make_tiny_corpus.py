"""A small synthetic corpus of children's stories, generated from templates (no download).

    python scripts/make_tiny_corpus.py --out corpus/tiny_stories.jsonl [--docs 4000] [--seed 0]

This codebase ships no text dataset and its CPU text quickstart cannot download one, so this
script makes one: `--docs` short stories (50-300 words each) in the spirit of children's
stories, written as JSON lines `{"text": "..."}` that `scripts/prepare_data.py` reads. Each story
is assembled from sentence templates and word lists with a seeded RNG: a main character with a
name, a kind and a pronoun, a home, a favourite object, a friend, a problem and its solution,
some dialogue, and simple causal sentences ("Because it was windy, ...").

The stories have structure a small language model can learn beyond word statistics: the
character's name, pronoun, object and friend chosen at the start recur later in the same story
(so they are predictable from context but not from the corpus as a whole), dialogue opens and
closes quotes, and every story ends with its own kind of resolution. The same seed gives the
same file, byte for byte; 4000 stories are about 4 MB (0.8M words) and take under a second.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

NAMES = {
    "she": ["Lily", "Mia", "Emma", "Zoe", "Anna", "Lucy", "Sara", "Ruby", "Nora", "Ella",
            "Maya", "Ivy", "Rosa", "Hana", "Lena", "Tess"],
    "he": ["Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Finn", "Omar", "Theo", "Eli",
           "Noah", "Kai", "Luca", "Ravi", "Hugo", "Otto"],
}
KINDS = ["girl", "boy", "bunny", "fox", "bear", "cat", "dog", "mouse", "duck", "frog",
         "owl", "pig", "squirrel", "turtle"]
PLACES = ["the park", "the forest", "the beach", "the garden", "the river", "the farm",
          "the hill", "the library", "the market", "the meadow", "the pond", "the town"]
HOMES = ["a small house", "a big tree", "a cozy den", "a yellow house", "a little cabin",
         "a house by the sea", "a flat above a bakery", "a burrow under a rock"]
FAMILY = ["mom", "dad", "grandma", "grandpa", "big sister", "little brother", "aunt"]
OBJECTS = ["ball", "kite", "hat", "book", "drum", "boat", "key", "blanket", "shell", "bell",
           "scarf", "robot", "teddy bear", "paintbrush", "marble", "lantern"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "shiny", "old", "tiny"]
SPOTS = ["under a bush", "behind a rock", "in the tall grass", "next to a tree",
         "inside a box", "under a bench", "near the water", "on top of a hill"]
WEATHER = [("sunny", "they played outside all morning"),
           ("rainy", "the puddles were big and deep"),
           ("windy", "the leaves danced in the air"),
           ("snowy", "everything was white and quiet"),
           ("cloudy", "the sky looked grey and sleepy")]
FEELINGS = ["sad", "scared", "worried", "upset"]  # on losing the object
FOODS = ["apples", "cookies", "soup", "bread", "berries", "carrots", "honey", "pancakes"]
GAMES = ["hide and seek", "tag", "catch", "a counting game", "a guessing game"]
MORALS = ["It is good to help your friends.", "Sharing makes everyone happy.",
          "Being brave is not the same as not being scared.", "Kind words go a long way.",
          "It is fine to ask for help."]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class Story:
    """The cast and props of one story, drawn once so that later sentences can refer back."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pro = rng.choice(["she", "he"])
        self.name = rng.choice(NAMES[self.pro])
        kinds = [k for k in KINDS if k != {"she": "boy", "he": "girl"}[self.pro]]
        self.kind = rng.choice(kinds)
        self.fpro = rng.choice(["she", "he"])
        self.friend = rng.choice([n for n in NAMES[self.fpro] if n != self.name])
        self.fkind = rng.choice(KINDS[2:])
        self.place = rng.choice(PLACES)
        self.home = rng.choice(HOMES)
        self.family = rng.choice(FAMILY)
        self.obj = rng.choice(OBJECTS)
        self.color = rng.choice(COLORS)
        self.spot = rng.choice(SPOTS)
        self.weather = rng.choice(WEATHER)

    @property
    def pos(self) -> str:  # possessive pronoun
        return {"she": "her", "he": "his"}[self.pro]

    @property
    def obj_pro(self) -> str:
        return {"she": "her", "he": "him"}[self.pro]

    def opening(self) -> list[str]:
        s, r = self, self.rng
        adj = r.choice(["kind", "curious", "shy", "brave", "silly"])
        first = r.choice([
            f"Once upon a time, there was a little {s.kind} named {s.name}.",
            f"There once was {article(adj)} {adj} {s.kind} called {s.name}.",
            f"{s.name} was a little {s.kind} who loved to play.",
        ])
        return [first,
                f"{s.name} lived in {s.home} near {s.place} with {s.pos} {s.family}.",
                f"{s.pro.capitalize()} had {article(s.color)} {s.color} {s.obj}, and {s.pro} "
                "loved it very much."]

    def episodes(self) -> list[list[str]]:
        """Middle parts, any subset of which (in this order) makes a story."""
        s, r = self, self.rng
        w, wdo = s.weather
        food = r.choice(FOODS)
        feeling = r.choice(FEELINGS)
        return [
            [f"One {w} day, {s.name} went to {s.place}.", f"It was {w}, so {wdo}."],
            [f"At {s.place}, {s.name} met {article(s.fkind)} {s.fkind} named {s.friend}.",
             f'"Hello, I am {s.name}," said {s.name}. "Do you want to play with me?"',
             f'"Yes!" said {s.friend}. "I love to play {r.choice(GAMES)}."'],
            [f"{s.name} and {s.friend} played with the {s.color} {s.obj} all afternoon.",
             f"Because they played so much, they were very {r.choice(['tired', 'hungry'])}."],
            [f"Then {s.name} looked around, but the {s.obj} was gone!",
             f"{s.name} felt {feeling}. \"Where is my {s.obj}?\" {s.pro} asked.",
             f'"Do not worry," said {s.friend}. "We will find it together."',
             f"They looked {r.choice(SPOTS)}, but the {s.obj} was not there.",
             f"They looked {s.spot}, and there was the {s.color} {s.obj}!",
             f"{s.name} was so happy that {s.pro} jumped up and down."],
            [f"When they came home, {s.pos} {s.family} made {food}.",
             f"{s.name} shared the {food} with {s.friend}, because friends share.",
             f'"Thank you, {s.name}," said {s.friend}. "You are a good friend."'],
            [f"Later, a big dog ran toward them and {s.friend} was scared.",
             f"{s.name} stood still and said, \"Please stop, dog!\"",
             f"The dog stopped and wagged its tail, so {s.friend} was not scared anymore."],
        ]

    def later_episodes(self) -> list[list[str]]:
        """Further parts for longer stories, each usable once, in any order."""
        s, r = self, self.rng
        helper_pro = r.choice(["she", "he"])
        helper = r.choice([n for n in NAMES[helper_pro] if n not in (s.name, s.friend)])
        hkind = r.choice(KINDS[2:])
        thing = r.choice(["tower", "bridge", "castle", "little house", "boat"])
        things = r.choice(FOODS[:2] + ["shells", "stones", "flowers", "stickers"])
        n = r.randint(3, 9)
        k = r.randint(1, n - 1)
        return [
            [f"The next day, {s.name} and {s.friend} went to {r.choice(PLACES)}.",
             f"There they saw {article(hkind)} {hkind} named {helper} who was crying.",
             f'"What is wrong, {helper}?" asked {s.name}.',
             f'"I cannot find my way home," said {helper}.',
             f"So {s.name} and {s.friend} walked with {helper} all the way home.",
             f'"Thank you," said {helper}. "You are very kind." Then {helper_pro} waved '
             "goodbye."],
            [f"After lunch, {s.friend} wanted to build a {thing}.",
             "They used sticks, leaves and a lot of mud.",
             f"Because the mud was wet, the {thing} fell down twice.",
             f"But they tried again, and the third time the {thing} stood tall.",
             f'"We did it, {s.name}!" said {s.friend}.'],
            ["In the evening, it started to rain.",
             f"{s.name} and {s.friend} ran under a big tree and waited.",
             "When the rain stopped, they saw a rainbow in the sky.",
             f'"Look at all the colors!" said {s.name}.'],
            [f"{s.name} told {s.friend} a story about a {r.choice(COLORS[:5])} dragon.",
             f'"Was the dragon scary?" asked {s.friend}.',
             f'"No," said {s.name}. "The dragon only wanted a friend, just like me."'],
            [f"{s.name} had {n} {things}.",
             f"{s.pro.capitalize()} gave {k} {things} to {s.friend}.",
             f"Now {s.name} had {n - k} {things} and {s.friend} had {k} {things}."],
            [f"Before bed, {s.pos} {s.family} asked, \"What did you do today, {s.name}?\"",
             f'"I played with {s.friend} and my {s.obj}," said {s.name}.',
             f"{s.pos.capitalize()} {s.family} smiled, because {s.name} looked so "
             f"{r.choice(['happy', 'proud', 'sleepy'])}."],
        ]

    def ending(self) -> list[str]:
        s, r = self, self.rng
        last = r.choice([
            f"From that day on, {s.name} and {s.friend} were best friends.",
            f"That night, {s.name} went to sleep with the {s.obj} next to {s.obj_pro}.",
            f"{s.name} told {s.pos} {s.family} all about {s.friend} and the {s.obj}.",
        ])
        out = [last]
        if r.random() < 0.4:
            out.append(r.choice(MORALS))
        return out


def _words(sentences: list[str]) -> int:
    return sum(len(x.split()) for x in sentences)


def make_story(rng: random.Random, min_words: int = 50, max_words: int = 300) -> str:
    """One story of min_words to max_words words, in one or more paragraphs."""
    s = Story(rng)
    target = rng.randint(min_words, max_words)
    opening, ending = s.opening(), s.ending()
    parts = [opening]
    used = _words(opening) + _words(ending)
    # The first parts run in their logical order (the friend is always introduced); a longer
    # story continues with later parts in a random order while the cast and object stay.
    for i, ep in enumerate(s.episodes()):
        if used + _words(ep) > max_words or (used >= target and i > 1):
            break
        if i <= 1 or rng.random() < 0.8:
            parts.append(ep)
            used += _words(ep)
    later = s.later_episodes()
    rng.shuffle(later)
    for ep in later:
        if used >= target:
            break
        if used + _words(ep) <= max_words:
            parts.append(ep)
            used += _words(ep)
    parts.append(ending)
    paragraphs = [" ".join(p) for p in parts]
    # Merge into 1-3 paragraphs so the corpus has some newlines, too.
    cut = sorted(rng.sample(range(1, len(paragraphs)), min(2, len(paragraphs) - 1)))
    groups, prev = [], 0
    for c in [*cut, len(paragraphs)]:
        groups.append(" ".join(paragraphs[prev:c]))
        prev = c
    return "\n\n".join(groups)


def generate_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """n_docs stories; the same (n_docs, seed) gives the same list."""
    rng = random.Random(seed)
    return [make_story(rng) for _ in range(n_docs)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_tiny_corpus.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--out", required=True, help="output .jsonl file (parent dirs are created)")
    p.add_argument("--docs", type=int, default=4000, help="number of stories (default 4000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.docs < 1:
        print(f"error: --docs must be >= 1, got {args.docs}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stories = generate_corpus(args.docs, args.seed)
    with open(out, "w", encoding="utf-8") as f:
        for text in stories:
            f.write(json.dumps({"text": text}) + "\n")
    words = sum(len(t.split()) for t in stories)
    print(f"wrote {len(stories)} stories, {words} words, {out.stat().st_size} bytes to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
