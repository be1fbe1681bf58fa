"""Labelled prompt sets: readers on small files in the published formats, the stable train/test
split, and how their labels reach the category and difficulty heads."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from concilium.cli import main
from concilium.router.labelled import half, read_labelled, split_of
from concilium.router.outcomes import Outcome, OutcomeError, read_outcomes
from concilium.router.predictor import Predictor
from concilium.router.train import TrainConfig, load_embedder, train


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_each_reader_maps_labels(tmp_path):
    mt = _jsonl(tmp_path / "mt.jsonl", [
        {"question_id": 81, "category": "writing", "turns": ["Write a poem about rain.", "Now shorter."]},
        {"question_id": 82, "category": "stem", "turns": ["What is entropy?"]},
    ])
    assert [(r.prompt, r.category) for r in read_labelled("mt-bench", mt)] == [
        ("Write a poem about rain.", "creative"), ("What is entropy?", "knowledge")]

    ah = _jsonl(tmp_path / "ah.jsonl", [
        {"uid": "a", "category": "hard_prompt", "subcategory": "coding", "prompt": "Write a zig parser"},
        {"uid": "b", "category": "creative_writing", "subcategory": "creative_writing", "prompt": "A sonnet"},
        {"uid": "c", "category": "other", "subcategory": "unknown", "prompt": "no label here"},
    ])
    assert [(r.prompt, r.category) for r in read_labelled("arena-hard", ah)] == [
        ("Write a zig parser", "code"), ("A sonnet", "creative")]  # unlabelled prompts are skipped

    math = _jsonl(tmp_path / "math.jsonl", [
        {"problem": "Find x if 2x=4.", "level": "Level 1", "type": "Algebra"},
        {"problem": "Prove it.", "level": "Level 5", "type": "Number Theory"},
        {"problem": "Odd one.", "level": "Level ?", "type": "Geometry"},
    ])
    got = [(r.category, r.difficulty) for r in read_labelled("math", math)]
    assert got == [("math", 0.0), ("math", 1.0), ("math", None)]

    he = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(he, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def add(a, b):\n"}) + "\n")
    assert [(r.prompt, r.category) for r in read_labelled("humaneval", he)] == [("def add(a, b):\n", "code")]

    wiz = _jsonl(tmp_path / "wiz.jsonl", [
        {"idx": "1", "Skill": "Math", "Difficulty": "1", "Instruction": "2+2?"},
        {"idx": "2", "Skill": "Philosophy", "Difficulty": "10", "Instruction": "What is being?"},
    ])
    got = [(r.category, r.difficulty) for r in read_labelled("wizardlm", wiz)]
    assert got == [("math", 0.0), (None, 1.0)]  # an unmapped skill still carries its difficulty

    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": "Tom has 3 apples...", "answer": "... #### 5"}])
    assert read_labelled("gsm8k", gsm)[0].category == "math"


@pytest.mark.parametrize(
    "source, rows, msg",
    [
        ("math", [{"level": "Level 2"}], r"math.jsonl:1: missing `problem`"),
        ("math", [{"problem": "x", "level": "Level 1"}, {"problem": "y", "level": "Level 9"}],
         r"math.jsonl:2: level 9 is outside 1..5"),
        ("math", [{"problem": "x", "level": "-3"}], r"math.jsonl:1: level -3 is outside 1..5"),
        ("arena-hard", [{"prompt": "", "subcategory": "math"}], r"math.jsonl:1: the prompt must be a non-empty"),
        ("mt-bench", [{"category": "writing", "turns": []}], r"math.jsonl:1: the prompt must be a non-empty"),
        ("math", [[1, 2]], r"math.jsonl:1: expected a JSON object"),
        ("arena-hard", [{"prompt": "hi", "subcategory": "nothing"}], "math.jsonl: no labelled prompts"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, source, rows, msg):
    p = _jsonl(tmp_path / "math.jsonl", rows)
    with pytest.raises(OutcomeError, match=msg):
        read_labelled(source, p)


def test_levels_that_say_nothing_are_no_label(tmp_path):
    p = _jsonl(tmp_path / "m.jsonl", [
        {"problem": "a", "level": ""}, {"problem": "b", "level": "   "}, {"problem": "c", "level": "Level \u00b2"},
        {"problem": "d"}, {"problem": "e", "level": 4},
    ])
    assert [r.difficulty for r in read_labelled("math", p)] == [None, None, None, None, 0.75]


def test_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"problem": "a", "level": "Level 1"}\n{"problem": "\xff\xfe"}\n')
    with pytest.raises(OutcomeError, match=r"m.jsonl:2: not UTF-8"):
        read_labelled("math", p)


def test_not_json_and_unknown_source(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"problem": "a", "level": "Level 1"}\n{nope\n')
    with pytest.raises(OutcomeError, match="x.jsonl:2: not valid JSON"):
        read_labelled("math", p)
    with pytest.raises(OutcomeError, match="unknown labelled source"):
        read_labelled("poems", p)
    with pytest.raises(OutcomeError, match="no such file"):
        read_labelled("math", tmp_path / "missing.jsonl")


def test_split_is_stable_and_near_half():
    prompts = [f"prompt number {i}" for i in range(4000)]
    a = [split_of(p) for p in prompts]
    assert a == [split_of(p) for p in prompts]
    assert split_of("Hello   World") == split_of("hello world")  # normalised like prompt_key
    share = a.count("test") / len(a)
    assert 0.47 < share < 0.53
    recs = [Outcome(prompt=p, scores={}, category="chat") for p in prompts]
    train_half, test_half = half(recs, "train"), half(recs, "test")
    assert len(train_half) + len(test_half) == len(recs)
    assert not {r.prompt for r in train_half} & {r.prompt for r in test_half}


def test_convert_cli_writes_labelled_records(tmp_path):
    src = _jsonl(tmp_path / "math.jsonl", [{"problem": "Find x.", "level": "Level 3"}])
    out = tmp_path / "o.jsonl"
    assert main(["router", "convert", "math", str(src), "--out", str(out)]) == 0
    (r,) = read_outcomes(out)
    assert (r.prompt, r.category, r.difficulty, r.scores) == ("Find x.", "math", 0.5, {})
    assert main(["router", "convert", "poems", str(src), "--out", str(out)]) == 2


def _difficulty_records(n: int, seed: int) -> list[Outcome]:
    """Short prompts labelled easy, long multi-step ones hard; outcome records say the opposite."""
    rng = np.random.default_rng(seed)
    words = "apples trains minutes dollars pages boxes".split()
    out = []
    for i in range(n):
        k = int(rng.integers(1, 4))
        easy = f"What is {k} plus {k + i % 7}?"
        hard = " ".join(f"Then {rng.choice(words)} grow by {j + 2} each step and {k} are removed." for j in range(8))
        out.append(Outcome(prompt=easy, scores={}, category="math", difficulty=0.0))
        out.append(Outcome(prompt=f"A long task. {hard} How many are left?", scores={}, category="math",
                           difficulty=1.0))
    return out


def test_explicit_difficulty_labels_win_over_outcomes():
    emb = load_embedder(None)
    labelled = _difficulty_records(60, 0)
    # Outcomes where the short questions are the ones models fail: derived difficulty points the other way.
    outcomes = [Outcome(prompt=f"What is {i} plus {i + 1}?", scores={"m": 0.0}) for i in range(60)]
    outcomes += [Outcome(prompt=f"A long task about {i} trains. " * 6, scores={"m": 1.0}) for i in range(60)]
    probe = ["What is 2 plus 9?", "A long task. Then boxes grow by 3 each step and 2 are removed. " * 5]

    art_out, rep_out = train(outcomes, emb, TrainConfig())
    art_lab, rep_lab = train(outcomes + labelled, emb, TrainConfig())
    assert rep_out.difficulty_from == "outcomes" and rep_lab.difficulty_from == "labels"

    def hardness(art):
        p = Predictor(art)
        _, _, dif = p.forward_batch(p.features_batch(probe))
        return dif @ np.array([0.0, 0.5, 1.0])

    d_out, d_lab = hardness(art_out), hardness(art_lab)
    assert d_out[0] > d_out[1]  # learned from outcomes: short question "hard"
    assert d_lab[1] > d_lab[0]  # learned from the explicit labels: the long multi-step task is hard


def test_a_few_difficulty_labels_do_not_take_over():
    """Below `min_difficulty_labels` (or with one class only) the labels join the outcome-derived
    targets instead of replacing them."""
    emb = load_embedder(None)
    outcomes = [Outcome(prompt=f"What is {i} plus {i + 1}?", scores={"m": float(i % 2)}) for i in range(80)]
    few = _difficulty_records(10, 1)  # 20 labels, two classes
    one_class = [Outcome(prompt=f"Sum {i} and {i}.", scores={}, difficulty=0.0) for i in range(60)]
    assert train(outcomes + few, emb, TrainConfig())[1].difficulty_from == "outcomes"
    assert train(outcomes + one_class, emb, TrainConfig())[1].difficulty_from == "outcomes"
    assert train(outcomes + few, emb, TrainConfig(min_difficulty_labels=20))[1].difficulty_from == "labels"
