"""Through the real gateway and the openai SDK: per-model timeouts, context windows, and pinned models
that are answered by that model or fail clearly (unless fallbacks are asked for)."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

POLICY = """
version: 1
models:
  primary: {{provider: openai, base_url: "{url}", model: primary}}
  backup: {{provider: openai, base_url: "{url}", model: backup}}
  slow: {{provider: openai, base_url: "{url}", model: slow, timeout_s: 1}}
  keyed: {{provider: openai, base_url: "{url}", model: keyed, api_key_env: CONCILIUM_TEST_MISSING_KEY}}
  small: {{provider: openai, base_url: "{url}", model: small, context_window: 200}}
  big: {{provider: openai, base_url: "{url}", model: big, context_window: 100000}}
routes:
  - name: long
    match: {{model: [concilium/long]}}
    targets: [small]
    fallbacks: [big]
  - name: slowroute
    match: {{model: [concilium/slow]}}
    targets: [slow]
    fallbacks: [backup]
  - name: keyedroute
    match: {{model: [concilium/keyed]}}
    targets: [keyed]
    fallbacks: [backup]
  - name: main
    targets: [primary]
    fallbacks: [backup]
router:
  virtual_models: [concilium/auto, concilium/long, concilium/slow, concilium/keyed]
retry: {{attempts: 1, backoff_s: 0.01, backoff_max_s: 0.05}}
circuit_breaker: {{failures: 100, cooldown_s: 1}}
"""


def msg(text="one two three"):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    from tests.support import start_gateway

    g = start_gateway(POLICY.format(url=fake_upstream.url), tmp_path_factory.mktemp("limits") / "policy.yaml",
                      env={"CONCILIUM_TEST_MISSING_KEY": ""})
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _no_faults_left_behind(fake_upstream):
    yield
    fake_upstream.reset()  # the upstream is shared by the session: later tests must not see these faults


def route(gw, body):
    req = urllib.request.Request(gw.v1 + "/route", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- per-model timeouts ----------------------------------------------------------------------------

def test_pinned_model_times_out_after_its_own_timeout(gw, upstream):
    upstream.default("slow", {"hang": True})
    with pytest.raises(openai.APIStatusError) as e:  # the client waits far longer than the model's 1 s
        gw.client(timeout=30).chat.completions.create(model="slow", messages=msg())
    assert e.value.status_code == 504
    assert "timed out after 1s" in e.value.message
    assert upstream.stats()["by_model"] == {"slow": 2}  # one try and one retry, each cut at 1 s


@pytest.mark.parametrize("stream", [False, True])
def test_routed_model_times_out_after_its_own_timeout_then_falls_back(gw, upstream, stream):
    upstream.default("slow", {"hang": True})
    raw = gw.client(timeout=30).chat.completions.with_raw_response.create(
        model="concilium/slow", messages=msg(), stream=stream)
    assert raw.headers["x-concilium-model"] == "backup"
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices).startswith("one two")
    assert upstream.stats()["by_model"] == {"slow": 2, "backup": 1}


# -- pinned models ---------------------------------------------------------------------------------

def test_pinned_model_is_not_answered_by_the_routes_fallback(gw, upstream):
    upstream.default("primary", {"status": 500})
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(model="primary", messages=msg())
    assert e.value.status_code == 502 and "primary" in e.value.message
    assert e.value.body["code"] == "all_candidates_failed"
    assert upstream.stats()["by_model"] == {"primary": 2}  # never backup


def test_pinned_model_without_its_key_fails_clearly(gw, upstream):
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(model="keyed", messages=msg())
    assert e.value.status_code == 503
    assert e.value.body["code"] == "model_unavailable" and e.value.body["param"] == "model"
    assert e.value.body["type"] == "api_error"
    assert "CONCILIUM_TEST_MISSING_KEY is not set" in e.value.message and "fallbacks" in e.value.message
    assert upstream.stats()["requests"] == 0


@pytest.mark.parametrize("extra", [{"fallbacks": ["backup"]}, {"models": ["backup"]}])
def test_pinned_request_may_ask_for_fallbacks(gw, upstream, extra):
    upstream.default("primary", {"status": 500})
    raw = gw.client().chat.completions.with_raw_response.create(model="primary", messages=msg(), extra_body=extra)
    assert raw.headers["x-concilium-model"] == "backup"
    sent = upstream.stats()["last_body"]
    assert "fallbacks" not in sent and "models" not in sent  # gateway-level fields are not forwarded


def test_unknown_fallback_is_a_clear_error(gw, upstream):
    with pytest.raises(openai.NotFoundError) as e:
        gw.client().chat.completions.create(model="primary", messages=msg(), extra_body={"fallbacks": ["gpt-9"]})
    assert e.value.body["param"] == "fallbacks" and "gpt-9" in e.value.message


# -- context windows -------------------------------------------------------------------------------

def test_plan_skips_a_model_whose_window_cannot_hold_the_prompt(gw, upstream):
    text = "word " * 400  # ~500 tokens: more than small's 200
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/long", messages=msg(text))
    assert raw.headers["x-concilium-model"] == "big"
    assert "skipped small" in raw.headers["x-concilium-reason"]
    assert upstream.stats()["by_model"] == {"big": 1}
    status, plan = route(gw, {"model": "concilium/long", "messages": msg(text)})
    assert status == 200 and [c["model"] for c in plan["candidates"]] == ["big"]
    assert plan["skipped"][0]["model"] == "small" and "context window 200" in plan["skipped"][0]["reason"]


def test_prompt_no_model_can_hold_is_400_context_length_exceeded(gw, upstream):
    with pytest.raises(openai.BadRequestError) as e:
        gw.client().chat.completions.create(model="concilium/long", messages=msg("x" * 500_000))
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["type"] == "invalid_request_error"
    assert "small" in e.value.message and "big" in e.value.message
    assert upstream.stats()["requests"] == 0
    status, body = route(gw, {"model": "concilium/long", "messages": msg("x" * 500_000)})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_upstream_context_error_falls_back_to_the_next_model(gw, upstream):
    upstream.script("primary", [{"status": 400, "code": "context_length_exceeded"}])
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=msg())
    assert raw.headers["x-concilium-model"] == "backup"


def test_every_model_refusing_the_length_is_context_length_exceeded(gw, upstream):
    upstream.default("*", {"status": 400, "code": "context_length_exceeded"})
    with pytest.raises(openai.BadRequestError) as e:
        gw.client().chat.completions.create(model="concilium/auto", messages=msg())
    assert e.value.body["code"] == "context_length_exceeded"
    assert upstream.stats()["by_model"] == {"primary": 1, "backup": 1}
