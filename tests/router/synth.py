"""Synthetic outcome data with a learnable structure, written by the tests themselves.

Two models: `weak` answers chat and short arithmetic right but fails word problems with many
numbers and most code requests; `strong` fails only rarely. A router that reads the prompt can
learn when the weak model is enough, so held-out APGR well above 0.5 is expected.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
THINGS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "cookies"]
CODE = ["parse a CSV file", "merge two sorted lists", "reverse a linked list", "compute a checksum",
        "validate an email address", "flatten a nested dictionary", "implement an LRU cache"]
LANGS = ["Python", "Rust", "Go", "JavaScript", "C++"]
CHAT = ["hi {n}, how are you today?", "hello! what's up {n}", "thanks {n}, that was helpful",
        "good morning {n}, hope you slept well", "hey {n}, can we chat for a bit?"]


def make_record(i: int, rng: random.Random) -> dict:
    kind = rng.choice(["chat", "math", "math", "code"])
    name = rng.choice(NAMES)
    if kind == "chat":
        prompt = rng.choice(CHAT).format(n=name)
        weak, strong, cat = 1.0, 1.0, "chat"
    elif kind == "math":
        k = rng.randint(1, 6)
        nums = [rng.randint(2, 90) for _ in range(k)]
        parts = [f"{name} has {nums[0]} {rng.choice(THINGS)}."]
        parts += [f"Then {name} gets {x} more and gives away {x // 2}." for x in nums[1:]]
        prompt = " ".join(parts) + " How many are left in total?"
        weak, strong, cat = (1.0 if k <= 2 else 0.0), 1.0, "math"
    else:
        prompt = f"Write a {rng.choice(LANGS)} function to {rng.choice(CODE)}, with tests."
        weak, strong, cat = 0.0, 1.0, "code"
    if rng.random() < 0.08:
        weak = 1.0 - weak
    if rng.random() < 0.04:
        strong = 1.0 - strong
    n_in = len(prompt) / 4
    return {
        "id": f"synth-{i}",
        "prompt": prompt,
        "scores": {"weak": weak, "strong": strong},
        "costs": {"weak": round(n_in * 0.2e-6 + 200 * 0.2e-6, 9), "strong": round(n_in * 5e-6 + 200 * 15e-6, 9)},
        "category": cat,
        "source": "synthetic",
    }


def write_synthetic(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps(make_record(i, rng)) + "\n")
    return path
