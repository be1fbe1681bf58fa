"""Synthetic outcome records with responses, written by the tests themselves.

Word problems "X has a things, gets b more and gives away c" with the true answer a + b - c.
The `weak` model's recorded answer is right about 60% of the time; when wrong it makes one of the
mistakes a verifier can see (a wrong arithmetic step, a non-integer or missing final answer) or,
sometimes, one it cannot (a clean-looking wrong answer). The `strong` model is right ~90%.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ana", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
THINGS = ["apples", "marbles", "books", "coins", "stickers"]


def solution(a: int, b: int, c: int, mistake: str | None) -> tuple[str, float]:
    s1 = a + b
    total = s1 - c
    if mistake == "arithmetic":
        s1_written = s1 + 3
        return (f"First {a} + {b} = <<{a}+{b}={s1_written}>>{s1_written}.\n"
                f"Then {s1_written} - {c} = <<{s1_written}-{c}={s1_written - c}>>{s1_written - c}.\n"
                f"#### {s1_written - c}"), s1_written - c
    if mistake == "fraction":
        v = round(total / 3, 2)
        return f"Each share is {total} / 3 = <<{total}/3={v}>>{v}.\n#### {v}", v
    if mistake == "no_final":
        return f"First {a} + {b} = {s1}, and then some are given away, so about half remain", -1
    if mistake == "silent":
        return f"First {a} + {b} = <<{a}+{b}={s1}>>{s1}.\n#### {s1}", s1
    return (f"First {a} + {b} = <<{a}+{b}={s1}>>{s1}.\nThen {s1} - {c} = <<{s1}-{c}={total}>>{total}.\n"
            f"#### {total}"), total


def make_record(i: int, rng: random.Random) -> dict:
    a, b = rng.randint(5, 90), rng.randint(2, 40)
    c = rng.randint(1, a)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    prompt = f"{name} has {a} {thing}, gets {b} more and gives away {c}. How many {thing} does {name} have now?"
    mistake = None if rng.random() < 0.6 else rng.choice(["arithmetic", "fraction", "no_final", "silent"])
    weak_text, weak_value = solution(a, b, c, mistake)
    strong_ok = rng.random() < 0.9
    strong_text = (f"{name} ends with {a} + {b} - {c} = {a + b - c} {thing}." if strong_ok
                   else f"{name} ends with {a + b + c} {thing}.")
    truth = a + b - c
    return {"prompt": prompt, "id": f"synth-{i}", "category": "math", "reference": str(truth),
            "scores": {"weak": float(weak_value == truth), "strong": float(strong_ok)},
            "responses": {"weak": weak_text, "strong": strong_text}}


def write_cascade_synthetic(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps(make_record(i, rng)) + "\n")
    return path
