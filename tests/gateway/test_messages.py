"""POST /v1/messages through the official `anthropic` SDK: a real gateway on loopback, answered by the
fake upstream (text, tool use, errors, keys and budgets) and by the local model."""

from __future__ import annotations

import json
import urllib.request

import anthropic
import pytest

from tests.gateway.policies import two_models
from tests.guard.support import make_key, upstream_policy
from tests.support import http_json, start_gateway

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(two_models(upstream.url))


def client(gw, **kw) -> anthropic.Anthropic:
    kw.setdefault("api_key", "unused")
    return anthropic.Anthropic(base_url=gw.base_url, max_retries=0, timeout=60, **kw)


def raw(gw, body, path="/v1/messages", headers=None):
    req = urllib.request.Request(gw.base_url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_a_message_is_answered_in_anthropics_shape(gw, upstream):
    r = client(gw).messages.with_raw_response.create(
        model="primary", max_tokens=2, system=[{"type": "text", "text": "Be brief."}],
        stop_sequences=["END"], extra_body={"temperature": 0.3},
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello there"}]}])
    msg = r.parse()
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "hello there"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.output_tokens == 2 and msg.usage.input_tokens == 4  # the fake's word counts
    assert r.headers["x-concilium-model"] == "primary" and r.headers["x-concilium-route"] == "pinned"
    assert r.headers["request-id"] == r.headers["x-request-id"]
    sent = upstream.stats()["last_body"]  # what the chat pipeline sent upstream
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    assert sent["max_tokens"] == 2 and sent["stop"] == ["END"] and sent["temperature"] == 0.3


def test_a_routed_message_stream(gw, upstream):
    c = client(gw)
    with c.messages.stream(model="concilium/auto", max_tokens=4,
                           messages=[{"role": "user", "content": "one two three four"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "one two three four" == final.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens == 4
    events = [e.type for e in c.messages.create(model="concilium/auto", max_tokens=3, stream=True,
                                                messages=[{"role": "user", "content": "a b c"}])]
    assert events == ["message_start", "content_block_start", "content_block_delta", "content_block_delta",
                      "content_block_delta", "content_block_stop", "message_delta", "message_stop"]


def test_tool_use_round_trip(gw, upstream):
    c = client(gw)
    upstream.script("primary", [{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
    first = c.messages.create(model="primary", max_tokens=100, tools=[WEATHER], tool_choice={"type": "any"},
                              messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    sent = upstream.stats()["last_body"]
    assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["tool_choice"] == "required"
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]

    second = c.messages.create(model="primary", max_tokens=2, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21C"},
                                     {"type": "text", "text": "and tomorrow"}]}])
    assert second.stop_reason == "end_turn" and second.content[0].text == "and tomorrow"
    sent = upstream.stats()["last_body"]["messages"]
    assert sent[1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}
    assert sent[3] == {"role": "user", "content": "and tomorrow"}


def test_tool_use_streamed(gw, upstream):
    upstream.script("primary", [{"tool_call": {"name": "get_weather", "arguments": {"city": "Lyon"}}}])
    with client(gw).messages.stream(model="primary", max_tokens=100, tools=[WEATHER],
                                    messages=[{"role": "user", "content": "Weather in Lyon?"}]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "input_json" in kinds
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 5
    (call,) = final.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Lyon"}


def test_errors_come_in_anthropics_shape(gw, upstream):
    c = client(gw)
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    assert "no-such-model" in e.value.body["error"]["message"]

    status, headers, body = raw(gw, {"model": "primary", "messages": [{"role": "user", "content": "hi"}]})
    err = json.loads(body)
    assert status == 400 and err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in err["error"]["message"] and err["request_id"] == headers["x-request-id"]
    status, _, body = raw(gw, {"model": "primary", "max_tokens": 5, "messages": [
        {"role": "user", "content": [{"type": "document", "source": {}}]}]})
    assert status == 400 and "'document'" in json.loads(body)["error"]["message"]

    upstream.default("primary", {"status": 500})
    upstream.default("backup", {"status": 500})
    with pytest.raises(anthropic.InternalServerError) as e:
        c.messages.create(model="concilium/auto", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502 and e.value.body["error"]["type"] == "api_error"
    assert "all candidates failed" in e.value.body["error"]["message"]


def test_a_stream_that_fails_after_it_started_ends_with_an_error_event(gw, upstream):
    upstream.script("primary", [{"drop_after": 3}])
    with pytest.raises(anthropic.APIStatusError) as e:
        with client(gw).messages.stream(model="primary", max_tokens=50,
                                        messages=[{"role": "user", "content": "one two three four five"}]) as s:
            for _ in s:
                pass
    assert e.value.body["type"] == "error" and "after it started" in e.value.body["error"]["message"]


def test_count_tokens_is_an_estimate_that_grows_with_the_prompt(gw):
    c = client(gw)
    short = c.messages.count_tokens(model="primary", messages=[{"role": "user", "content": "hi"}])
    long = c.messages.count_tokens(model="primary", system="You are terse.", tools=[WEATHER],
                                   messages=[{"role": "user", "content": "hi " * 400}])
    assert 0 < short.input_tokens < long.input_tokens
    assert long.input_tokens >= 300  # 1,200 characters at ~4 per token


KEY, KEY_H = make_key()
KEYS = f"""
keys:
  - name: alice
    hash: {KEY_H}
    budget: {{usd_per_day: 1.0}}
"""


def test_keys_and_budgets_apply_and_each_answer_is_billed_once(fake_upstream, tmp_path):
    g = start_gateway(upstream_policy(fake_upstream.url, KEYS), tmp_path / "policy.yaml")
    try:
        with pytest.raises(anthropic.AuthenticationError) as e:
            client(g, api_key="sk-wrong").messages.create(model="cheap", max_tokens=5,
                                                          messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["error"]["type"] == "authentication_error"
        c = client(g, api_key=KEY)  # the SDK sends the key as x-api-key
        msg = c.messages.create(model="cheap", max_tokens=5, messages=[{"role": "user", "content": "hello"}])
        assert msg.usage.output_tokens == 5
        with c.messages.stream(model="cheap", max_tokens=5, messages=[{"role": "user", "content": "hello"}]) as s:
            assert s.get_final_message().usage.output_tokens == 5
        req = urllib.request.Request(g.base_url + "/v1/usage", headers={"x-api-key": KEY})
        with urllib.request.urlopen(req, timeout=10) as r:
            usage = json.loads(r.read())
        # two answers of 5 completion tokens at $1000 per million output tokens: $0.005 each, once
        assert usage["scopes"][0]["spent_usd"]["day"] == pytest.approx(0.01)
        assert usage["scopes"][0]["reserved_usd"] == 0
    finally:
        g.stop()


def test_the_local_model_answers_messages(local_gateway):
    c = client(local_gateway)
    q = [{"role": "user", "content": "What is the capital of France?"}]
    msg = c.messages.create(model="smollm2", max_tokens=12, messages=q)
    assert msg.content[0].type == "text" and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and 0 < msg.usage.output_tokens <= 12
    assert msg.usage.input_tokens > 5
    with c.messages.stream(model="smollm2", max_tokens=12, messages=q) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text.strip() and text == final.content[0].text
    assert 0 < final.usage.output_tokens <= 12 and final.usage.input_tokens == msg.usage.input_tokens
    status, _ = http_json("GET", local_gateway.base_url + "/healthz")
    assert status == 200


def test_the_openapi_document_describes_messages_and_embeddings(gw):
    status, doc = http_json("GET", gw.base_url + "/openapi.json")
    assert status == 200
    op = doc["paths"]["/v1/messages"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages", "max_tokens", "system", "tools", "stream"} <= set(body["properties"])
    assert set(body["required"]) == {"model", "messages", "max_tokens"}
    assert op["responses"]["400"]["content"]["application/json"]["schema"]["properties"]["type"] == {"const": "error"}
    assert "text/event-stream" in op["responses"]["200"]["content"]
    emb = doc["paths"]["/v1/embeddings"]["post"]
    assert "input" in emb["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "error" in emb["responses"]["400"]["content"]["application/json"]["schema"]["properties"]


def test_a_job_owner_is_told_by_x_api_key_as_by_a_bearer_token():
    from starlette.requests import Request

    from concilium.gateway.routes_jobs import owner_of

    def req(headers):
        return Request({"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
                        "state": {}})

    assert owner_of(req({"x-api-key": "sk-1"})) == owner_of(req({"authorization": "Bearer sk-1"}))
    assert owner_of(req({"x-api-key": "sk-1"})) != owner_of(req({"x-api-key": "sk-2"}))
    assert owner_of(req({})) == "anonymous"
