"""Each scorer on hand-written drafts whose right verdict is known; combine; specs from a policy."""

from __future__ import annotations

import json
import math

import pytest

from concilium.router.cascade import (
    AgreementScorer,
    ChecksScorer,
    Draft,
    LogprobScorer,
    RulesVerifier,
    Scorer,
    ScorerSpecError,
    build_scorer,
    combine,
    majority,
    run_checks,
)
from concilium.router.cascade.checks import SchemaError, validate
from concilium.router.cascade.logprobs import aggregate, token_logprobs

PROMPT = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2 each. How much?"
GOOD = "She has 16 - 3 - 4 = <<16-3-4=9>>9 eggs left.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
BAD_ARITHMETIC = "She has 16 - 3 - 4 = <<16-3-4=8>>8 eggs left.\nShe makes 8 * 2 = $<<8*2=16>>16.\n#### 16"
NON_INTEGER = "She has 16 / 3 = <<16/3=5.33>>5.33 eggs per friend.\n#### 5.33"
NO_FINAL = "She has 16 - 3 - 4 = 9 eggs left and sells them, which is a good business"


def completion(content: str = "", logprobs: list[tuple[str, float]] | None = None, tool_calls=None) -> dict:
    msg: dict = {"role": "assistant", "content": content}
    if tool_calls is not None:
        msg["tool_calls"] = tool_calls
    choice: dict = {"index": 0, "message": msg, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": t, "logprob": lp, "top_logprobs": []} for t, lp in logprobs]}
    return {"object": "chat.completion", "choices": [choice]}


# --- rules verifier -------------------------------------------------------------------------------
def test_rules_verifier_ranks_warning_signs_below_a_clean_answer():
    v = RulesVerifier()
    good = v.score(PROMPT, GOOD)
    for bad in (BAD_ARITHMETIC, NON_INTEGER, NO_FINAL):
        assert v.score(PROMPT, bad) < good
    assert v.signs(PROMPT, BAD_ARITHMETIC)["wrong_arithmetic"]
    assert v.signs(PROMPT, NON_INTEGER)["non_integer"]
    assert v.signs(PROMPT, NO_FINAL)["no_final"]
    assert not any(v.signs(PROMPT, GOOD).values())


def test_score_completion_reads_the_request_and_the_first_choice():
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]}
    v = RulesVerifier()
    assert v.score_completion(body, completion(GOOD)) == v.score(PROMPT, GOOD)
    d = Draft.from_openai(body, completion(GOOD))
    assert d.prompt.startswith(PROMPT) and d.answer == GOOD


# --- logprobs -------------------------------------------------------------------------------------
def test_logprob_aggregates():
    lps = [-0.1, -0.2, -3.0, -0.05]
    assert aggregate(lps, "min") == -3.0
    assert aggregate(lps, "mean") == pytest.approx(sum(lps) / 4)
    assert aggregate(lps, "quantile", 0.0) == -3.0 and aggregate(lps, "quantile", 1.0) == -0.05
    assert aggregate(lps, "quantile", 0.5) == pytest.approx(-0.15)


def test_logprob_scorer_prefers_confident_drafts_and_escalates_without_logprobs():
    sure = completion("18", [("18", -0.01), (" ", -5.0), (".", -0.02)])
    unsure = completion("17", [("17", -2.5), (".", -0.02)])
    for how in ("min", "mean", "quantile"):
        s = LogprobScorer(how)
        assert s.score_draft(Draft("q", "18", completion=sure)) > s.score_draft(Draft("q", "17", completion=unsure))
    assert LogprobScorer("min").score_draft(Draft("q", "18", completion=sure)) == pytest.approx(math.exp(-0.02))
    assert token_logprobs(sure) == [-0.01, -0.02]  # whitespace token skipped
    assert LogprobScorer().score_draft(Draft("q", "18", completion=completion("18"))) == 0.0
    assert LogprobScorer(missing=0.7).score("q", "18") == 0.7
    with pytest.raises(ValueError):
        LogprobScorer("median")


# --- agreement ------------------------------------------------------------------------------------
def test_agreement_share_over_normalised_answers():
    s = AgreementScorer("number")
    assert s.score("q", "#### 18", samples=["The answer is $18.00", "so 18"]) == 1.0
    assert s.score("q", "#### 18", samples=["#### 18", "#### 20"]) == pytest.approx(2 / 3)
    assert s.score("q", "no number here", samples=["#### 18"]) == 0.0
    assert s.score("q", "#### 18") == 0.5  # nothing to compare with
    opt = AgreementScorer("option")
    assert opt.score("q", "The answer is (B).", samples=["Answer: B", "B"]) == 1.0
    assert opt.score("q", "The answer is (B).", samples=["Answer: C"]) == 0.5
    code = AgreementScorer("code_output")
    assert code.score("q", "```\n[1, 2]\n```", samples=["Output:\n```\n[1,  2]\n```"]) == 1.0
    assert majority(["#### 3", "#### 4", "three is 3"], "number") == ("3", pytest.approx(2 / 3))


# --- checks ---------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("value,ok", [
    ({"name": "x", "age": 3}, True),
    ({"name": "x", "age": 3, "tags": ["a", "b"]}, True),
    ({"name": "x"}, False),
    ({"name": "x", "age": -1}, False),
    ({"name": "x", "age": 2.5}, False),
    ({"name": "x", "age": True}, False),
    ({"name": "x", "age": 3, "tags": ["c"]}, False),
    ({"name": "x", "age": 3, "extra": 1}, False),
    (["name"], False),
])
def test_schema_subset(value, ok):
    if ok:
        validate(value, SCHEMA)
    else:
        with pytest.raises(SchemaError):
            validate(value, SCHEMA)


def test_schema_refs_and_combinators():
    schema = {"$defs": {"p": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
              "type": "array", "items": {"$ref": "#/$defs/p"}, "minItems": 1}
    validate([{"x": 1}, {"x": 2.5}], schema)
    with pytest.raises(SchemaError, match=r"\$\[1\]"):
        validate([{"x": 1}, {"y": 2}], schema)
    with pytest.raises(SchemaError):
        validate([], schema)
    validate("a", {"anyOf": [{"type": "integer"}, {"type": "string"}]})
    with pytest.raises(SchemaError):
        validate(3, {"oneOf": [{"type": "integer"}, {"type": "number"}]})  # both match


def _fmt(schema=SCHEMA):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_checks_response_format():
    body = {"messages": [{"role": "user", "content": "who?"}], "response_format": _fmt()}
    s = ChecksScorer()
    assert s.score_completion(body, completion(json.dumps({"name": "Ann", "age": 40}))) == 1.0
    assert s.score_completion(body, completion('```json\n{"name": "Ann", "age": 40}\n```')) == 1.0
    assert s.score_completion(body, completion('{"name": "Ann"}')) == 0.0
    assert s.score_completion(body, completion("Ann is 40")) == 0.0
    obj = {"messages": body["messages"], "response_format": {"type": "json_object"}}
    assert s.score_completion(obj, completion("[1, 2]")) == 0.0
    assert s.score_completion(obj, completion("{}")) == 1.0
    (r,) = run_checks(Draft.from_openai(body, completion('{"name": "Ann"}')))
    assert r.check == "response_format" and "age" in r.reason


def test_checks_tool_calls():
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    body = {"messages": [{"role": "user", "content": "weather?"}], "tools": tools}
    s = ChecksScorer(["tool_calls"])

    def call(name, args):
        return completion("", tool_calls=[{"id": "c1", "type": "function", "function": {"name": name, "arguments": args}}])

    assert s.score_completion(body, call("weather", '{"city": "Oslo"}')) == 1.0
    assert s.score_completion(body, call("weather", '{"town": "Oslo"}')) == 0.0
    assert s.score_completion(body, call("weather", '{"city": ')) == 0.0
    assert s.score_completion(body, call("stocks", "{}")) == 0.0


def test_checks_python_blocks():
    s = ChecksScorer(["python"])
    assert s.score("q", "```python\ndef f(x):\n    return x + 1\n```") == 1.0
    assert s.score("q", "```python\ndef f(x)\n    return x\n```") == 0.0
    assert s.score("q", "```js\nfunction( {\n```") == 1.0  # not Python: not checked
    assert s.score("q", "plain text") == 1.0  # nothing applies


# --- combine and specs ----------------------------------------------------------------------------
class Const(Scorer):
    def __init__(self, v: float) -> None:
        self.v = v

    def score_draft(self, draft: Draft) -> float:
        return self.v


def test_combine_modes():
    a, b = Const(0.2), Const(0.8)
    assert combine(a, b).score("q", "a") == 0.2
    assert combine(a, b, how="max").score("q", "a") == 0.8
    assert combine(a, b, how="mean").score("q", "a") == pytest.approx(0.5)
    assert combine(a, b, how="product").score("q", "a") == pytest.approx(0.16)
    assert combine(a, b, how="weighted", weights=[3, 1]).score("q", "a") == pytest.approx(0.35)
    assert combine(Const(1.7)).score("q", "a") == 1.0  # parts are clipped to [0, 1]
    with pytest.raises(ValueError):
        combine(a, b, how="vote")
    with pytest.raises(ValueError):
        combine(a, b, weights=[1])


def test_build_scorer_from_specs():
    s = build_scorer({"combine": "min", "of": ["verifier-rules", {"name": "checks", "checks": ["python"]}]})
    assert s.score(PROMPT, GOOD) == RulesVerifier().score(PROMPT, GOOD)
    assert s.describe()["of"][1] == {"scorer": "checks", "checks": ["python"]}
    assert build_scorer({"name": "logprobs", "how": "min"}).how == "min"
    assert build_scorer("agreement").kind == "auto"


@pytest.mark.parametrize("spec,path", [
    ("nope", "name"),
    ({"name": "logprobs", "how": "median"}, ""),  # the scorer itself refused its options
    ({"name": "agreement", "colour": 1}, "colour"),
    ({"combine": "min", "of": ["verifier-rules", {"name": "bad"}]}, "of[1].name"),
    ({"combine": "vote", "of": ["checks"]}, "combine"),
    ({"combine": "min", "of": []}, "of"),
    ({"name": "verifier", "artifact": "/nonexistent/dir"}, "artifact"),
    (3, ""),
])
def test_build_scorer_errors_name_the_place(spec, path):
    with pytest.raises(ScorerSpecError) as e:
        build_scorer(spec)
    assert e.value.path == path
