"""Jobs on Redis with real `concilium worker` processes, through the openai SDK: submit, poll,
stream, resume, cancel, idempotency, caps, queues, timeouts and the chat-completions diversion."""

from __future__ import annotations

import openai
import pytest

from concilium.testing.fake_upstream import _split
from tests.support import start_gateway
from tests.workers.support import Stack, WorkerProcess, jobs_policy, wait_for

TERMINAL = ("completed", "incomplete", "failed", "cancelled")
TEXT = "a b c d e f g h i j k l m"


def echo(text: str, pieces: int = 13) -> str:
    """What the fake upstream answers to `text`."""
    return "".join(_split(text.split(), pieces))


@pytest.fixture(scope="module")
def stack(fake_upstream, tmp_path_factory):
    # The workers serve `high` and `default`; nothing serves `low`, so jobs sent there stay queued.
    s = Stack.start(tmp_path_factory.mktemp("redis-jobs"), jobs_policy(fake_upstream.url), workers=2,
                    worker_queues="high,default")
    yield s
    s.stop()


@pytest.fixture
def jobs(stack, upstream):
    stack.ensure_workers()
    return stack


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")  # killed, not yet reaped
    except FileNotFoundError:
        return True


def finished(client, job_id: str, timeout: float = 30.0):
    """Poll until the job ends (a 503 while Redis restarts is retried, like a client would)."""
    def check():
        try:
            r = client.responses.retrieve(job_id)
        except openai.InternalServerError as e:
            assert e.status_code == 503 and e.code == "queue_unavailable", e
            return None
        return r.status in TERMINAL and r

    return wait_for(check, timeout, f"job {job_id} to end")


def test_submit_then_poll_answers_once_and_bills_once(jobs, upstream):
    c = jobs.gateway.client()
    r = c.responses.create(model="concilium/auto", input="polls are fine", background=True)
    assert r.status == "queued" and r.background is True and r.id.startswith("resp_") and r.output == []
    final = finished(c, r.id)
    assert final.status == "completed" and final.output_text == echo("polls are fine")
    assert final.model == "fast" and final.error is None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 13)
    assert jobs.bills(r.id) == [{"owner": jobs.record(r.id)["owner"], "model": "fast", "route": "default",
                                 "status": "completed", "cost_usd": (3 * 1.0 + 13 * 2.0) / 1e6,
                                 "usage": {"prompt_tokens": 3, "completion_tokens": 13, "total_tokens": 16}}]
    assert upstream.stats()["requests"] == 1


def test_stream_then_resume_after_a_disconnect(jobs, upstream):
    upstream.default("slow-up", {"chunk_delay_s": 0.05})
    c = jobs.gateway.client()
    stream = c.responses.create(model="concilium/auto", input="one two three four five six", background=True,
                                stream=True, metadata={"kind": "long"})
    seen = []
    for e in stream:
        seen.append(e)
        if sum(x.type == "response.output_text.delta" for x in seen) == 3:
            break
    stream.close()  # the client goes away; a background job goes on
    job_id = seen[0].response.id
    assert [e.type for e in seen[:3]] == ["response.created", "response.queued", "response.in_progress"]
    rest = list(c.responses.retrieve(job_id, stream=True, starting_after=seen[-1].sequence_number))
    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == echo("one two three four five six") == events[-1].response.output_text
    again = list(c.responses.retrieve(job_id, stream=True, starting_after=len(events) - 3))
    assert [e.sequence_number for e in again] == [len(events) - 2, len(events) - 1]


def test_foreground_responses_wait_for_the_answer(jobs):
    c = jobs.gateway.client()
    r = c.responses.create(model="concilium/auto", input=[{"role": "user", "content": "right now please"}],
                           instructions="be brief")
    assert r.status == "completed" and r.background is False and r.output_text == echo("right now please")
    types = [e.type for e in c.responses.create(model="concilium/auto", input="stream me", stream=True)]
    assert types[0] == "response.created" and types[-1] == "response.completed"


def test_cancel_stops_the_model_call_and_keeps_the_partial_answer(jobs, upstream):
    upstream.default("slow-up", {"chunk_delay_s": 0.3})
    c = jobs.gateway.client()
    r = c.responses.create(model="concilium/auto", input="a b c d e f g h i j k l m", background=True,
                           metadata={"kind": "long"})
    wait_for(lambda: sum(e["type"] == "response.output_text.delta" for e in jobs.events(r.id)) >= 2, 30,
             "two deltas")
    worker = jobs.worker_running(r.id)
    cancelled = c.responses.cancel(r.id)
    assert cancelled.status == "cancelled"  # already ended when the cancel call returns
    partial = cancelled.output_text
    assert partial and echo("a b c d e f g h i j k l m").startswith(partial) and len(partial) < 25
    events = jobs.events(r.id)
    assert events[-1]["type"] == "response.cancelled"
    assert "".join(e.get("delta", "") for e in events if e["type"] == "response.output_text.delta") == partial
    wait_for(lambda: upstream.stats()["disconnected"] >= 1, 10, "the upstream call to be dropped")
    assert worker is not None and worker.alive  # it stopped by itself: nothing was killed
    bill = jobs.bills(r.id)
    assert len(bill) == 1 and bill[0]["status"] == "cancelled" and bill[0]["usage"]["estimated"] is True
    assert c.responses.cancel(r.id).status == "cancelled"  # cancelling again changes nothing


def test_cancel_a_queued_job_and_what_cannot_be_cancelled(jobs, upstream):
    c = jobs.gateway.client()
    r = c.responses.create(model="concilium/auto", input="never runs", background=True,
                           metadata={"kind": "parked"})
    assert jobs.record(r.id)["spec"]["queue"] == "low"
    cancelled = c.responses.cancel(r.id)
    assert cancelled.status == "cancelled" and cancelled.output == []
    assert upstream.stats()["requests"] == 0 and jobs.bills(r.id) == []
    done = c.responses.create(model="concilium/auto", input="quick", background=True)
    finished(c, done.id)
    with pytest.raises(openai.ConflictError):
        c.responses.cancel(done.id)


def test_queued_jobs_are_capped_per_key(jobs):
    c = jobs.gateway.client(api_key="capped-key")
    ids = [c.responses.create(model="concilium/auto", input="wait", background=True,
                              metadata={"kind": "parked"}).id for _ in range(3)]
    with pytest.raises(openai.RateLimitError) as e:
        c.responses.create(model="concilium/auto", input="one too many", background=True,
                           metadata={"kind": "parked"})
    assert e.value.code == "too_many_jobs"
    other = jobs.gateway.client(api_key="another-key")
    other.responses.cancel(other.responses.create(model="concilium/auto", input="x", background=True,
                                                  metadata={"kind": "parked"}).id)
    c.responses.cancel(ids[0])
    ids[0] = c.responses.create(model="concilium/auto", input="room again", background=True,
                                metadata={"kind": "parked"}).id
    for job_id in ids:
        c.responses.cancel(job_id)


def test_idempotency_key_resubmits_do_not_run_twice(jobs, upstream):
    c = jobs.gateway.client()
    headers = {"Idempotency-Key": "order-42"}
    a = c.responses.create(model="concilium/auto", input="exactly once", background=True, extra_headers=headers)
    b = c.responses.create(model="concilium/auto", input="exactly once", background=True, extra_headers=headers)
    assert a.id == b.id
    assert finished(c, a.id).output_text == echo("exactly once")
    assert c.responses.create(model="concilium/auto", input="exactly once", background=True,
                              extra_headers=headers).status == "completed"
    with pytest.raises(openai.ConflictError):
        c.responses.create(model="concilium/auto", input="something else", background=True, extra_headers=headers)
    assert upstream.stats()["requests"] == 1 and len(jobs.bills(a.id)) == 1


def test_jobs_belong_to_their_key_and_bad_requests_are_refused(jobs):
    c = jobs.gateway.client()
    r = c.responses.create(model="concilium/auto", input="mine", background=True)
    with pytest.raises(openai.NotFoundError):
        jobs.gateway.client(api_key="somebody-else").responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve("resp_0000")
    code, body = jobs.gateway.post("/v1/responses", {"model": "concilium/auto"})
    assert code == 400 and body["error"]["param"] == "input"
    code, body = jobs.gateway.post("/v1/responses", {"model": "concilium/auto", "input": "x",
                                                     "tools": [{"type": "function", "name": "f"}]})
    assert code == 400 and "tools" in body["error"]["message"]
    code, body = jobs.gateway.post("/v1/responses", {"model": "concilium/auto", "input": "x",
                                                     "background": True, "store": False})
    assert code == 400 and body["error"]["param"] == "store"
    with pytest.raises(openai.BadRequestError):
        c.responses.retrieve(r.id, stream=True, starting_after=-4)


def test_soft_timeout_keeps_the_partial_answer(jobs, upstream):
    upstream.default("slow-up", {"chunk_delay_s": 0.3})
    c = jobs.gateway.client()
    r = c.responses.create(model="concilium/auto", input="a b c d e f g h i j k l m", background=True,
                           metadata={"kind": "soft"})
    final = finished(c, r.id)
    assert final.status == "incomplete" and final.incomplete_details.reason == "soft_timeout"
    assert final.output_text and echo("a b c d e f g h i j k l m").startswith(final.output_text)
    assert len(final.output_text) < len(echo("a b c d e f g h i j k l m"))
    assert jobs.events(r.id)[-1]["type"] == "response.incomplete"


def test_hard_timeout_kills_the_process_running_the_job(jobs, upstream):
    upstream.default("slow-up", {"chunk_delay_s": 0.3})
    c = jobs.gateway.client()
    r = c.responses.create(model="concilium/auto", input="a b c d e f g h i j k l m", background=True,
                           metadata={"kind": "hard"})
    wait_for(lambda: jobs.record(r.id).get("worker"), 30, "a worker to take the job")
    pid = int(jobs.record(r.id)["worker"].split("/")[1])
    final = finished(c, r.id)
    assert final.status == "failed" and final.error.code == "hard_timeout" and "killed" in final.error.message
    assert final.output_text and echo("a b c d e f g h i j k l m").startswith(final.output_text)
    wait_for(lambda: _gone(pid), 10, "the pool process that ran the job to be killed")
    assert jobs.record(r.id)["attempts"] == "1" and len(jobs.bills(r.id)) == 1


def test_a_worker_serves_its_higher_priority_queue_first(jobs):
    c = jobs.gateway.client()
    # Nothing serves `low` and `bulk` yet: both jobs wait, the lower-priority one queued first.
    later = c.responses.create(model="concilium/auto", input="bulk work", background=True, metadata={"kind": "bulk"})
    sooner = c.responses.create(model="concilium/auto", input="low work", background=True,
                                metadata={"kind": "parked"})
    assert (jobs.record(later.id)["spec"]["queue"], jobs.record(sooner.id)["spec"]["queue"]) == ("bulk", "low")
    worker = WorkerProcess.start("prio", jobs.policy, jobs.env, queues="low,bulk")
    try:
        for job in (later, sooner):
            assert finished(c, job.id).status == "completed"
    finally:
        worker.stop()
    assert float(jobs.record(sooner.id)["started_at"]) < float(jobs.record(later.id)["started_at"])


def test_streaming_chat_is_fed_from_the_job(jobs, upstream):
    c = jobs.gateway.client()
    raw = c.chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": "stream this job"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"background": True})
    job_id = raw.headers["x-concilium-job-id"]
    chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == echo("stream this job")
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 13
    assert c.responses.retrieve(job_id).output_text == text


def test_non_streaming_chat_waits_then_gets_the_jobs_location(jobs, upstream):
    c = jobs.gateway.client()
    quick = c.chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": "think hard"}], reasoning_effort="high")
    assert quick.status_code == 200 and quick.headers["x-concilium-job-id"].startswith("resp_")
    assert quick.parse().choices[0].message.content == echo("think hard")

    upstream.default("slow-up", {"chunk_delay_s": 0.3})
    slow = c.chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": "a b c d e f g h i j k l m"}],
        metadata={"kind": "long"}, extra_body={"background": True})
    assert slow.status_code == 202
    job_id = slow.headers["x-concilium-job-id"]
    assert slow.headers["location"] == f"/v1/responses/{job_id}" and slow.headers["retry-after"] == "2"
    body = slow.http_response.json()
    assert body["object"] == "response" and body["id"] == job_id and body["status"] in ("queued", "in_progress")
    assert finished(c, job_id).output_text == echo("a b c d e f g h i j k l m")


def test_any_gateway_replica_serves_resumes_and_cancels(jobs, upstream, tmp_path):
    upstream.default("slow-up", {"chunk_delay_s": 0.2})
    replica = start_gateway(jobs.policy.read_text(), tmp_path / "replica.yaml", env=jobs.env)
    try:
        a, b = jobs.gateway.client(), replica.client()
        stream = a.responses.create(model="concilium/auto", input=TEXT, background=True, stream=True,
                                    metadata={"kind": "long"})
        seen = []
        for e in stream:
            seen.append(e)
            if e.type == "response.output_text.delta":
                break
        stream.close()
        job_id = seen[0].response.id
        resumed = b.responses.retrieve(job_id, stream=True, starting_after=seen[-1].sequence_number)
        more = []
        for e in resumed:
            more.append(e)
            if e.type == "response.output_text.delta":
                break
        resumed.close()
        assert more[0].sequence_number == seen[-1].sequence_number + 1
        cancelled = b.responses.cancel(job_id)
        assert cancelled.status == "cancelled"
        assert a.responses.retrieve(job_id).output_text == cancelled.output_text
        assert cancelled.output_text.startswith(seen[-1].delta + more[-1].delta)
    finally:
        replica.stop()
