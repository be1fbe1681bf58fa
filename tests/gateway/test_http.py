"""HTTP surface: errors in OpenAI's JSON, body limit, models, route dry-run, health, metrics, reload."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.gateway.policies import two_models
from tests.support import http_json, wait_until

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(two_models(upstream.url).replace("retry: {", "limits: {max_body_bytes: 20000}\nretry: {"))


def raw_post(gw, body: bytes, ctype="application/json"):
    req = urllib.request.Request(gw.v1 + "/chat/completions", data=body, method="POST",
                                 headers={"content-type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_openai_error(status, body, expect_status, needle):
    assert status == expect_status, body
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert needle in body["error"]["message"]


def test_bad_requests_get_openai_errors(gw):
    assert_openai_error(*raw_post(gw, b"{not json"), 400, "could not parse the JSON body")
    assert_openai_error(*raw_post(gw, b"[1, 2]"), 400, "expected a JSON object")
    assert_openai_error(*raw_post(gw, b"\xff\xfe{}"), 400, "could not parse")
    assert_openai_error(*raw_post(gw, b"[" * 5000 + b"]" * 5000), 400, "could not parse")
    assert_openai_error(*raw_post(gw, b"{}", "text/plain"), 415, "application/json")
    s, b = raw_post(gw, json.dumps({"model": "concilium/auto", "messages": []}).encode())
    assert_openai_error(s, b, 400, "messages")
    assert b["error"]["param"] == "messages"
    s, b = raw_post(gw, json.dumps({"model": "concilium/auto", "messages": MSG, "n": 2}).encode())
    assert_openai_error(s, b, 400, "n:")
    s, b = raw_post(gw, json.dumps({"model": "concilium/auto", "messages": MSG, "temperature": "hot"}).encode())
    assert_openai_error(s, b, 400, "temperature")
    s, b = raw_post(gw, json.dumps({"messages": MSG}).encode())
    assert_openai_error(s, b, 400, "model")


LOOSE = [
    ("stream", "yes"), ("stream", 1), ("max_tokens", "5"), ("max_tokens", 5.0), ("max_tokens", True),
    ("max_completion_tokens", "5"), ("temperature", "0.5"), ("top_p", "1"), ("seed", "7"), ("n", "1"),
    ("stream_options", {"include_usage": "yes"}), ("background", "no"), ("logprobs", "true"),
    ("top_logprobs", "2"), ("presence_penalty", "0"), ("frequency_penalty", "1"), ("parallel_tool_calls", 0),
]


def test_loosely_typed_fields_are_refused_naming_the_param(gw, upstream):
    for field, value in LOOSE:
        s, b = raw_post(gw, json.dumps({"model": "concilium/auto", "messages": MSG, field: value}).encode())
        assert_openai_error(s, b, 400, field)
        assert b["error"]["param"].split(".")[0] == field and b["error"]["type"] == "invalid_request_error"
    assert upstream.stats()["requests"] == 0


def test_only_json_media_types_are_read_as_json(gw):
    body = json.dumps({"model": "concilium/auto", "messages": MSG, "max_tokens": 5, "temperature": 1}).encode()
    for ctype in ("application/x-notjson", "text/json-ish", "application/jsonx", "multipart/form-data; boundary=json"):
        assert_openai_error(*raw_post(gw, body, ctype), 415, "application/json")
    for ctype in ("application/json", "application/json; charset=utf-8", "Application/JSON",
                  "application/vnd.api+json"):
        assert raw_post(gw, body, ctype)[0] == 200, ctype


def test_unknown_model_is_404_through_the_sdk(gw):
    with pytest.raises(openai.NotFoundError) as e:
        gw.client().chat.completions.create(model="gpt-17", messages=MSG)
    assert e.value.body["code"] == "model_not_found" and "concilium/auto" in e.value.message


def test_body_size_limit(gw):
    big = json.dumps({"model": "concilium/auto", "messages": [{"role": "user", "content": "x" * 30000}]})
    assert_openai_error(*raw_post(gw, big.encode()), 413, "larger than the limit of 20000 bytes")
    status, body = http_json("GET", gw.base_url + "/nope")
    assert_openai_error(status, body, 404, "Not Found")


def test_models_route_health_metrics(gw, upstream):
    ids = {m.id for m in gw.client().models.list().data}
    assert {"concilium/auto", "concilium/keyed", "primary", "backup", "keyed"} <= ids
    status, plan = gw.post("/v1/route", {"model": "concilium/keyed", "messages": MSG})
    assert status == 200 and plan["route"] == "keyed-route" and plan["mode"] == "interactive"
    assert plan["candidates"][0]["model"] == "backup"
    assert plan["skipped"] == [{"model": "keyed", "reason": "CONCILIUM_TEST_MISSING_KEY is not set"}]
    assert upstream.stats()["requests"] == 0  # a dry run calls no model
    assert gw.get("/healthz") == (200, {"status": "ok", "version": "0.1.0"})
    gw.client().chat.completions.create(model="concilium/auto", messages=MSG)
    list(gw.client().chat.completions.create(model="concilium/auto", messages=MSG, stream=True))
    with urllib.request.urlopen(gw.base_url + "/metrics") as r:
        text = r.read().decode()
    assert 'concilium_requests_total{model="primary",route="main",status="ok"} 2.0' in text
    assert 'concilium_time_to_first_token_seconds_count{model="primary",route="main"} 1.0' in text
    assert 'concilium_tokens_total{kind="completion",model="primary",route="main"}' in text
    assert 'concilium_cost_usd_total{model="primary",route="main"}' in text


def test_policy_reload_on_change_and_sighup_keeps_old_on_error(gw, upstream):
    text = gw.policy_path.read_text()
    gw.policy_path.write_text(text.replace("  backup:\n", "  extra:\n    provider: openai\n"
                                           f"    base_url: \"{upstream.url}\"\n    model: extra\n  backup:\n"))
    wait_until(lambda: "extra" in {m.id for m in gw.client().models.list().data}, 10, "reload on file change")
    gw.policy_path.write_text(text.replace("targets: [primary]", "targets: [missing-model]"))
    gw.sighup()
    wait_until(lambda: "refused" in gw.log.read_text(), 10, "broken policy refused")
    assert "routes[1].targets[0]" in gw.log.read_text()
    ids = {m.id for m in gw.client().models.list().data}
    assert "extra" in ids  # the running policy was kept
    assert gw.client().chat.completions.create(model="concilium/auto", messages=MSG).choices


def test_reload_does_not_drop_requests_in_flight(gw, upstream):
    upstream.default("primary", {"chunk_delay_s": 0.1})
    stream = gw.client().chat.completions.create(model="concilium/auto", messages=MSG * 1, stream=True)
    first = next(iter(stream))
    text = gw.policy_path.read_text()
    gw.policy_path.write_text(text.replace("model: backup", "model: backup2"))
    gw.sighup()
    rest = list(stream)
    assert first is not None and rest[-1].choices[0].finish_reason == "stop"
