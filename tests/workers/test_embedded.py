"""The embedded mode: no Redis, no worker processes; the same Celery task on an in-memory broker
with a worker thread inside the gateway."""

from __future__ import annotations

import openai
import pytest

from tests.support import start_gateway
from tests.workers.support import jobs_policy, wait_for
from tests.workers.test_redis_jobs import echo, finished

TEXT = "a b c d e f g h i j k l m"


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    g = start_gateway(jobs_policy(fake_upstream.url), tmp_path_factory.mktemp("embedded") / "policy.yaml",
                      env={"CONCILIUM_REDIS_URL": ""})
    yield g
    g.stop()


def test_submit_poll_stream_resume(gw, upstream):
    c = gw.client()
    r = c.responses.create(model="concilium/auto", input="no services needed", background=True)
    assert r.status == "queued"
    final = finished(c, r.id)
    assert final.status == "completed" and final.output_text == echo("no services needed")
    events = list(c.responses.retrieve(r.id, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    tail = list(c.responses.retrieve(r.id, stream=True, starting_after=events[-4].sequence_number))
    assert [e.type for e in tail] == [e.type for e in events[-3:]]


def test_cancel_keeps_the_partial_answer(gw, upstream):
    upstream.default("slow-up", {"chunk_delay_s": 0.3})
    c = gw.client()
    r = c.responses.create(model="concilium/auto", input=TEXT, background=True, metadata={"kind": "long"})
    stream = c.responses.retrieve(r.id, stream=True)
    deltas = 0
    for e in stream:
        deltas += e.type == "response.output_text.delta"
        if deltas == 2:
            break
    stream.close()
    cancelled = c.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and cancelled.output_text
    assert echo(TEXT).startswith(cancelled.output_text) and len(cancelled.output_text) < len(echo(TEXT))
    wait_for(lambda: upstream.stats()["disconnected"] >= 1, 10, "the upstream call to be dropped")


def test_timeouts_without_a_process_to_kill(gw, upstream):
    upstream.default("slow-up", {"chunk_delay_s": 0.3})
    c = gw.client()
    soft = c.responses.create(model="concilium/auto", input=TEXT, background=True, metadata={"kind": "soft"})
    hard = c.responses.create(model="concilium/auto", input=TEXT, background=True, metadata={"kind": "hard"})
    s, h = finished(c, soft.id), finished(c, hard.id)
    assert s.status == "incomplete" and s.incomplete_details.reason == "soft_timeout" and s.output_text
    assert h.status == "failed" and h.error.code == "hard_timeout" and h.output_text
    assert "stopped" in h.error.message  # a thread cannot be killed: the job stops itself


def test_chat_diversion_and_idempotency(gw, upstream):
    c = gw.client()
    stream = c.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": "from a job"}],
                                       stream=True, reasoning_effort="high")
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == echo("from a job")
    upstream.default("slow-up", {"chunk_delay_s": 0.3})
    raw = c.chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": TEXT}], metadata={"kind": "long"},
        extra_body={"background": True}, extra_headers={"Idempotency-Key": "emb-1"})
    assert raw.status_code == 202 and raw.headers["location"].startswith("/v1/responses/resp_")
    job_id = raw.headers["x-concilium-job-id"]
    again = c.responses.create(model="concilium/auto", input="different request", background=True,
                               extra_headers={"Idempotency-Key": "emb-2"})
    assert again.id != job_id
    with pytest.raises(openai.ConflictError):  # the same key for a different request
        c.responses.create(model="concilium/auto", input="yet another", background=True,
                           extra_headers={"Idempotency-Key": "emb-2"})
    assert finished(c, job_id).output_text == echo(TEXT)


def test_default_policy_serves_background_requests_with_the_local_model(local_gateway):
    """`make run` (policies/default.yaml, SmolLM2 in-process, no Redis) answers background jobs."""
    c = local_gateway.client()
    r = c.responses.create(model="concilium/auto", input="Say hello.", background=True, max_output_tokens=8)
    final = finished(c, r.id, timeout=120)
    assert final.status in ("completed", "incomplete") and final.output_text.strip()
    assert final.model == "smollm2" and final.usage.output_tokens <= 8


def test_chat_with_tools_is_answered_interactively(gw, upstream):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    raw = gw.client().chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": "use a tool"}], tools=tools,
        extra_body={"background": True})
    assert raw.status_code == 200 and "x-concilium-job-id" not in raw.headers
    assert raw.parse().choices[0].message.content == echo("use a tool")


def test_a_foreground_response_is_cancelled_when_its_client_leaves(gw, upstream):
    upstream.default("slow-up", {"chunk_delay_s": 0.3})
    c = gw.client()
    raw = c.responses.with_raw_response.create(model="concilium/auto", input=TEXT, stream=True,
                                               metadata={"kind": "long"})
    job_id = raw.headers["x-concilium-job-id"]
    stream = raw.parse()
    for e in stream:
        if e.type == "response.output_text.delta":
            break
    stream.close()
    assert finished(c, job_id).status == "cancelled"
    with pytest.raises(openai.APITimeoutError):
        c.with_options(timeout=1.0).responses.create(model="concilium/auto", input=TEXT, metadata={"kind": "long"})
    wait_for(lambda: upstream.stats()["disconnected"] >= 2, 10, "both upstream calls to be dropped")
