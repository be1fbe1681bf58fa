"""Routing by request features: a routed request skips a model that cannot serve what it asks for
(tools it must call, JSON output, images), with the reason, and goes to one that can; a pinned
request to that model gets a 400 naming the field."""

from __future__ import annotations

import openai
import pytest

from concilium.policy.loader import parse_policy
from concilium.router.decide import DecisionError, decide
from tests.gateway.policies import two_models

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
POLICY = parse_policy(two_models("http://127.0.0.1:1/v1"))


def _no_tools(model, body):
    return ("tool_choice", "does not call tools") if model == "primary" and body.get("tool_choice") else None


def test_decide_skips_models_that_cannot_serve_the_request():
    body = {"model": "concilium/auto", "messages": QUESTION, "tools": TOOLS, "tool_choice": "required"}
    plan = decide(body, POLICY, features=_no_tools)
    assert [c.model for c in plan.candidates] == ["backup"]
    assert plan.skipped[0].model == "primary" and plan.skipped[0].reason == "cannot serve tool_choice: does not call tools"
    assert plan.reasons[0] == "chose backup" and any("skipped primary (cannot serve tool_choice" in r for r in plan.reasons)
    assert decide({**body, "tool_choice": None}, POLICY, features=_no_tools).candidates[0].model == "primary"
    # pinned: the model itself answers or refuses; the plan does not move the request elsewhere
    assert [c.model for c in decide({**body, "model": "primary"}, POLICY, features=_no_tools).candidates] == ["primary"]
    with pytest.raises(DecisionError) as e:  # no model of the route serves it: the request must change
        decide(body, POLICY, features=lambda m, b: ("tool_choice", "does not call tools"))
    assert e.value.status == 400 and e.value.code == "unsupported_parameter" and e.value.param == "tool_choice"


def _policy(url: str) -> str:
    return f"""
version: 1
models:
  smollm2:
    provider: local
    model: smollm2-135m-instruct
    context_window: 2048
    options: {{max_batch: 1, threads: 1}}
  primary:
    provider: openai
    base_url: "{url}"
    model: primary
routes:
  - name: local-only
    match: {{model: [concilium/local]}}
    targets: [smollm2]
  - name: main
    targets: [smollm2]
    fallbacks: [primary]
router:
  virtual_models: [concilium/auto, concilium/local]
"""


def test_routed_request_goes_to_a_model_that_serves_it(gateway_factory, upstream):
    gw = gateway_factory(_policy(upstream.url), timeout=240)
    client = gw.client()
    raw = client.chat.completions.with_raw_response.create(
        model="concilium/auto", messages=QUESTION, max_tokens=8, tools=TOOLS, tool_choice="required")
    assert raw.headers["x-concilium-model"] == "primary"
    assert "skipped smollm2 (cannot serve tool_choice" in raw.headers["x-concilium-reason"]
    raw = client.chat.completions.with_raw_response.create(
        model="concilium/auto", messages=QUESTION, max_tokens=8, temperature=0, logprobs=True)
    assert raw.headers["x-concilium-model"] == "smollm2" and raw.parse().choices[0].logprobs.content
    for model in ("smollm2", "concilium/local"):  # pinned, or a route where no model serves it
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "a", "schema": {"type": "object"}}})
        assert e.value.body["param"] == "response_format" and e.value.body["code"] == "unsupported_parameter"
    assert upstream.stats()["by_model"] == {"primary": 1}  # it answered the first request only
