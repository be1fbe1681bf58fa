"""Job streams in Redis mode outlast the Redis client's 5 s read timeout: a silent job keeps its
stream open with keep-alives, a finished job resumes at once, and a chat that waits longer than 5 s
for a job that no worker takes gets its 202, never "the queue is unavailable"."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.workers.support import Stack, jobs_policy
from tests.workers.test_redis_jobs import TEXT, echo, finished

SILENCE_S = 7.0  # longer than the client's read timeout


@pytest.fixture(scope="module")
def stack(fake_upstream, tmp_path_factory):
    # No retries on a failed read (a gateway may be configured so): a read that outlived the client's
    # timeout would surface at once. Nothing serves `low`, so a job sent there stays queued.
    policy = jobs_policy(fake_upstream.url).replace("chat_wait_s: 1.5", "chat_wait_s: 6.5")
    s = Stack.start(tmp_path_factory.mktemp("long-streams"), policy, workers=1, worker_queues="high,default",
                    env={"CONCILIUM_JOBS_KEEPALIVE_S": "2", "CONCILIUM_JOBS_REQUEST_REDIS_RETRY_S": "0"})
    yield s
    s.stop()


@pytest.fixture
def jobs(stack, upstream):
    stack.ensure_workers()
    return stack


def _sse(url: str) -> tuple[list[str], list[str]]:
    """(comment lines, event names) of a whole event stream."""
    comments, events = [], []
    with httpx.stream("GET", url, headers={"authorization": "Bearer test-key"}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("event: "):
                events.append(line.removeprefix("event: "))
    return comments, events


def test_a_silent_job_keeps_its_stream_open_with_keepalives(jobs, upstream):
    upstream.script("slow-up", [{"delay_s": SILENCE_S}])
    c = jobs.gateway.client()
    job = c.responses.create(model="concilium/auto", input=TEXT, background=True, metadata={"kind": "long"})
    comments, events = _sse(f"{jobs.gateway.v1}/responses/{job.id}?stream=true")
    assert "error" not in events
    assert events[-1] == "response.completed"
    assert comments.count(": keepalive") >= 2  # every 2 s through 7 s of silence
    assert finished(c, job.id).output_text == echo(TEXT)

    last = jobs.events(job.id)[-1]["sequence_number"]
    t0 = time.monotonic()
    comments, events = _sse(f"{jobs.gateway.v1}/responses/{job.id}?stream=true&starting_after={last}")
    assert (comments, events) == ([], [])  # a finished job: nothing more, and no waiting for more
    assert time.monotonic() - t0 < 2.0  # less than one keep-alive interval


def test_a_streaming_chat_fed_from_a_silent_job(jobs, upstream):
    upstream.script("slow-up", [{"delay_s": SILENCE_S}])
    c = jobs.gateway.client()
    stream = c.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": TEXT}],
                                       stream=True, metadata={"kind": "long"}, extra_body={"background": True})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == echo(TEXT)


def test_a_chat_waiting_longer_than_the_read_timeout_gets_202(jobs):
    c = jobs.gateway.client()
    raw = c.chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": "nobody serves low"}],
        metadata={"kind": "parked"}, extra_body={"background": True})
    assert raw.status_code == 202
    job_id = raw.headers["x-concilium-job-id"]
    assert raw.headers["location"] == f"/v1/responses/{job_id}"
    assert c.responses.retrieve(job_id).status == "queued"
    c.responses.cancel(job_id)
