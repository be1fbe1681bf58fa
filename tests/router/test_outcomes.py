"""Outcome records: parsing, errors, round trip, and the converters on small files in the published formats."""

from __future__ import annotations

import json

import pytest

from concilium.router import converters as conv
from concilium.router.outcomes import Outcome, OutcomeError, parse_outcome, read_outcomes, write_outcomes


def test_parse_and_round_trip(tmp_path):
    recs = [
        Outcome(prompt="2+2?", scores={"a": 1.0, "b": 0.5}, costs={"a": 0.001}, id="x", category="math"),
        Outcome(prompt="hi", scores={}, category="chat", weight=2.0),
    ]
    path = tmp_path / "o.jsonl"
    assert write_outcomes(recs, path) == 2
    back = read_outcomes(path)
    assert back == recs


@pytest.mark.parametrize(
    "obj, msg",
    [
        ({"scores": {"a": 1}}, "prompt"),
        ({"prompt": "p"}, "needs `scores`"),
        ({"prompt": "p", "scores": {"a": 1.5}}, "outside"),
        ({"prompt": "p", "scores": {"a": "yes"}}, "finite number"),
        ({"prompt": "p", "scores": {"a": 1}, "category": "poetry"}, "unknown category"),
        ({"prompt": "p", "scores": {"a": 1}, "difficulty": 3}, "difficulty"),
        ({"prompt": "p", "scores": {"a": 1}, "weight": 0}, "weight"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_records_say_what_is_wrong(obj, msg):
    with pytest.raises(OutcomeError, match=msg):
        parse_outcome(obj, "f.jsonl:3")


def test_messages_instead_of_prompt():
    r = parse_outcome({"messages": [{"role": "user", "content": "hello"}], "scores": {"m": 0}})
    assert r.prompt == "hello"


def test_bad_file_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "scores": {"m": 1}}\n{oops\n')
    with pytest.raises(OutcomeError, match="bad.jsonl:2"):
        read_outcomes(p)
    with pytest.raises(OutcomeError, match="no such file"):
        read_outcomes(tmp_path / "missing.jsonl")


def test_routellm_csv_and_contamination(tmp_path):
    d = tmp_path / "routellm"
    d.mkdir()
    (d / "gsm8k_responses.csv").write_text(
        "prompt,weak-m,strong-m,weak-m_response,strong-m_response\n"
        '"Q one",True,True,"short","a much longer answer"\n'
        '"Q two",False,True,"x","y"\n'
    )
    (d / "gsm8k_contaminated_prompts.jsonl").write_text(json.dumps({"train_prompt": "q", "eval_prompt": "Q  two"}) + "\n")
    recs = conv.convert("routellm-gsm8k", d / "gsm8k_responses.csv")
    assert [r.prompt for r in recs] == ["Q one"]  # the contaminated one is dropped (whitespace-insensitive)
    assert recs[0].scores == {"weak-m": 1.0, "strong-m": 1.0} and recs[0].category == "math"
    assert recs[0].output_tokens["strong-m"] > recs[0].output_tokens["weak-m"]
    assert len(conv.convert("routellm-gsm8k", d / "gsm8k_responses.csv", drop_contaminated=False)) == 2


def test_routellm_mmlu_subjects(tmp_path):
    d = tmp_path / "mmlu"
    d.mkdir()
    (d / "mmlu_college_mathematics.csv").write_text("prompt,w,s\n\"Integrate x\",False,True\n")
    (d / "mmlu_virology.csv").write_text("prompt,w,s\n\"What is a virus\",True,True\n")
    recs = conv.convert("routellm-mmlu", d)
    assert {r.category for r in recs} == {"math", "knowledge"}
    assert {r.source for r in recs} == {"routellm-mmlu-college_mathematics", "routellm-mmlu-virology"}


def test_llmrouter_join_and_prices(tmp_path):
    (tmp_path / "dcrouter_test.json").write_text(json.dumps([
        {"question": "def add(a, b):", "scores": {"m1": 1.0, "m2": 0.25}, "cluster_id": 0}]))
    (tmp_path / "query_test.jsonl").write_text(json.dumps({"task_name": "mbpp", "query": "def  add(a, b):"}) + "\n")
    (tmp_path / "llm_candidates.json").write_text(json.dumps({
        "m1": {"input_price": 1.0, "output_price": 2.0, "model": "org/m1"},
        "m2": {"input_price": 0.1, "output_price": 0.1, "model": "org/m2"}}))
    (r,) = conv.convert("llmrouter", tmp_path / "dcrouter_test.json")
    assert r.category == "code" and r.source == "llmrouter-mbpp"
    n_in = len("def add(a, b):") / 4
    assert r.costs["m1"] == pytest.approx((n_in * 1.0 + 256 * 2.0) / 1e6)
    assert conv.llmrouter_aliases(tmp_path / "llm_candidates.json") == {"m1": "org/m1", "m2": "org/m2"}


def test_unknown_source():
    with pytest.raises(OutcomeError, match="unknown source"):
        conv.convert("nope", "x")
