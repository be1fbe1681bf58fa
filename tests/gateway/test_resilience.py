"""The real openai SDK against the gateway under uvicorn, in front of the fault-injecting upstream."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.gateway.policies import two_models
from tests.support import wait_until

MSG = [{"role": "user", "content": "one two three four five six seven eight nine ten eleven twelve thirteen"}]


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(two_models(upstream.url))


def test_non_stream_answer_usage_and_headers(gw, upstream):
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG)
    r = raw.parse()
    assert r.choices[0].message.content == MSG[0]["content"]
    assert r.usage.completion_tokens == 13
    assert raw.headers["x-concilium-model"] == "primary"
    assert raw.headers["x-concilium-route"] == "main"
    assert "chose primary" in raw.headers["x-concilium-reason"]
    assert len(raw.headers["x-request-id"]) >= 16
    assert upstream.stats()["by_model"] == {"primary": 1}


def test_stream_passthrough_and_usage_only_when_asked(gw, upstream):
    chunks = list(gw.client().chat.completions.create(model="concilium/auto", messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == MSG[0]["content"]
    assert all(c.usage is None for c in chunks)
    chunks = list(gw.client().chat.completions.create(model="concilium/auto", messages=MSG, stream=True,
                                                      stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 13
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_parameters_and_tools_pass_through(gw, upstream):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    gw.client().chat.completions.create(model="primary", messages=MSG, tools=tools, temperature=0.3, top_p=0.9,
                                        max_tokens=5, stop=["x"], metadata={"team": "a"})
    sent = upstream.stats()["last_body"]
    assert sent["tools"] == tools and sent["temperature"] == 0.3 and sent["top_p"] == 0.9
    assert sent["max_tokens"] == 5 and sent["stop"] == ["x"] and sent["model"] == "primary"
    assert "metadata" not in sent  # gateway-level field, not forwarded


def test_retries_5xx_then_succeeds_on_same_model(gw, upstream):
    upstream.script("primary", [{"status": 500}, {"status": 503}])
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG)
    assert raw.headers["x-concilium-model"] == "primary"
    assert upstream.stats()["by_model"] == {"primary": 3}


def test_429_retry_after_is_honoured(gw, upstream):
    upstream.script("primary", [{"status": 429, "retry_after": 0.4}])
    t0 = time.monotonic()
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG)
    assert time.monotonic() - t0 >= 0.4
    assert raw.headers["x-concilium-model"] == "primary"


def test_a_429_from_every_candidate_carries_retry_after(gw, upstream):
    upstream.default("*", {"status": 429, "retry_after": 30})  # longer than retry_after_max_s: no waiting
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as e:
            gw.client().chat.completions.create(model="concilium/auto", messages=MSG, stream=stream)
        assert e.value.body["code"] == "all_candidates_failed"
        assert e.value.response.headers["retry-after"] == "30"
    upstream.default("*", {"status": 429})  # the upstreams say nothing about when: a short default
    with pytest.raises(openai.RateLimitError) as e:
        gw.client().chat.completions.create(model="concilium/auto", messages=MSG)
    assert e.value.response.headers["retry-after"] == "1"


def test_falls_back_down_the_plan(gw, upstream):
    upstream.default("primary", {"status": 502})
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG)
    assert raw.headers["x-concilium-model"] == "backup"
    assert raw.headers["x-concilium-reason"].startswith("answered by backup after primary failed; chose primary")
    assert raw.parse().choices[0].message.content == MSG[0]["content"]
    assert upstream.stats()["by_model"] == {"primary": 3, "backup": 1}
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG, stream=True)
    assert raw.headers["x-concilium-reason"].startswith("answered by backup after primary failed; ")
    list(raw.parse())


def test_circuit_breaker_skips_failing_model(gw, upstream):
    upstream.default("primary", {"status": 500})
    for _ in range(3):  # 3 failed requests (3 attempts each, counted once): the circuit opens
        gw.client().chat.completions.create(model="concilium/auto", messages=MSG)
    status, plan = gw.post("/v1/route", {"model": "concilium/auto", "messages": MSG})
    assert status == 200
    assert [c["model"] for c in plan["candidates"]] == ["backup"]
    assert plan["skipped"][0]["model"] == "primary" and "circuit open" in plan["skipped"][0]["reason"]
    gw.client().chat.completions.create(model="concilium/auto", messages=MSG)
    assert upstream.stats()["by_model"]["primary"] == 9  # not called again while open


def test_timeout_falls_back(gw, upstream):
    upstream.default("primary", {"delay_s": 5})
    t0 = time.monotonic()
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG)
    assert raw.headers["x-concilium-model"] == "backup"
    assert time.monotonic() - t0 < 10  # 3 attempts x 2 s timeout, then the backup


def test_bad_request_is_not_retried(gw, upstream):
    upstream.script("primary", [{"status": 400}])
    with pytest.raises(openai.BadRequestError) as e:
        gw.client().chat.completions.create(model="concilium/auto", messages=MSG)
    assert "injected 400" in e.value.message
    assert upstream.stats()["by_model"] == {"primary": 1}


def test_all_candidates_failing_is_a_clear_error(gw, upstream):
    upstream.default("*", {"status": 500})
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(model="concilium/auto", messages=MSG)
    assert e.value.status_code == 502
    assert e.value.body["code"] == "all_candidates_failed"
    assert "primary" in e.value.message and "backup" in e.value.message
    assert "primary: primary" not in e.value.message and "backup: backup" not in e.value.message


def test_missing_key_model_is_skipped_with_reason(gw, upstream):
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/keyed", messages=MSG)
    assert raw.headers["x-concilium-model"] == "backup"
    assert "CONCILIUM_TEST_MISSING_KEY is not set" in raw.headers["x-concilium-reason"]


@pytest.mark.parametrize("fault", [{"drop_after": 1}, {"malformed_at": 0}, {"status": 503}])
def test_stream_failure_before_first_token_falls_back(gw, upstream, fault):
    upstream.default("primary", fault)
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG,
                                                                 stream=True)
    assert raw.headers["x-concilium-model"] == "backup"
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == MSG[0]["content"]


def test_stream_failure_after_first_token_ends_with_error_event(gw, upstream):
    upstream.script("primary", [{"drop_after": 4}])
    got = []
    with pytest.raises(openai.APIError) as e:
        for c in gw.client().chat.completions.create(model="concilium/auto", messages=MSG, stream=True):
            got.append(c.choices[0].delta.content or "")
    assert "failed after it started" in str(e.value)
    assert "primary: primary" not in str(e.value) and str(e.value).count("primary") == 1, str(e.value)
    assert "".join(got).startswith("one")  # what arrived before the failure was delivered
    assert upstream.stats()["by_model"] == {"primary": 1}  # no silent switch mid-answer


def test_client_disconnect_cancels_upstream(gw, upstream):
    upstream.default("primary", {"chunk_delay_s": 0.3})
    with httpx.stream("POST", gw.v1 + "/chat/completions", timeout=10,
                      json={"model": "concilium/auto", "messages": MSG, "stream": True}) as r:
        for line in r.iter_lines():
            if '"content":"one' in line:
                break  # leave after the first token
    wait_until(lambda: upstream.stats()["disconnected"] == 1, 10, "upstream sees the disconnect")
    assert upstream.stats()["completed"] == 0


def test_litellm_adapter_against_openai_compatible_upstream(upstream, gateway_factory):
    extra = f"""  via-litellm:
    provider: litellm
    model: openai/backup
    base_url: "{upstream.url}"
    options: {{api_key: "sk-test"}}
"""
    gw = gateway_factory(two_models(upstream.url, extra_models=extra))
    r = gw.client().chat.completions.create(model="via-litellm", messages=MSG)
    assert r.choices[0].message.content == MSG[0]["content"]
    chunks = list(gw.client().chat.completions.create(model="via-litellm", messages=MSG, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == MSG[0]["content"]
    upstream.default("backup", {"status": 500})
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(model="via-litellm", messages=MSG)
    assert e.value.status_code == 502
