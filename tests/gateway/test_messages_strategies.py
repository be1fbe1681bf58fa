"""/v1/messages goes through the whole chat pipeline: a cascade route (draft accepted or escalated,
streamed and not) and a background route (answered through a job) answer Anthropic's SDK as the
chat route answers OpenAI's."""

from __future__ import annotations

import anthropic
import pytest

from tests.gateway.test_jobs_chat_model import policy as jobs_policy
from tests.pipeline.test_cascade import BAD, GOOD, echo
from tests.pipeline.test_cascade import policy as cascade_policy


def client(gw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.mark.parametrize("text,model", [(GOOD, "cheap"), (BAD, "strong")])
def test_a_cascade_answers_messages(upstream, gateway_factory, text, model):
    gw = gateway_factory(cascade_policy(upstream.url))
    q = [{"role": "user", "content": text}]
    raw = client(gw).messages.with_raw_response.create(model="concilium/auto", max_tokens=100, messages=q)
    assert raw.headers["x-concilium-strategy"] == "cascade" and raw.headers["x-concilium-model"] == model
    msg = raw.parse()
    assert msg.content[0].text == echo(text) and msg.usage.output_tokens == 13 and msg.stop_reason == "end_turn"
    with client(gw).messages.stream(model="concilium/auto", max_tokens=100, messages=q) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    assert streamed == echo(text) and final.usage.output_tokens == 13
    calls = upstream.stats()["by_model"]
    assert calls == ({"cheap-up": 2} if model == "cheap" else {"cheap-up": 2, "strong-up": 2})


def test_a_background_route_answers_messages_through_a_job(upstream, gateway_factory):
    gw = gateway_factory(jobs_policy(upstream.url))
    q = [{"role": "user", "content": "hello there"}]
    raw = client(gw).messages.with_raw_response.create(model="concilium/jobs", max_tokens=2, messages=q)
    assert raw.headers.get("x-concilium-job-id")  # it did run as a job
    msg = raw.parse()
    assert msg.content[0].text == "hello there" and msg.stop_reason == "end_turn"
    with client(gw).messages.stream(model="concilium/jobs", max_tokens=2, messages=q) as s:
        assert s.response.headers.get("x-concilium-job-id")
        assert "".join(s.text_stream) == "hello there"
        assert s.get_final_message().stop_reason == "end_turn"
