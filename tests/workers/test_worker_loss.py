"""Nothing acknowledged is lost: a worker killed with -9 mid-job, and Redis restarted mid-job."""

from __future__ import annotations

import os
import signal

import openai
import pytest

from concilium.workers.responses import TERMINAL_EVENT_TYPES
from tests.workers.support import RedisServer, Stack, jobs_policy, wait_for
from tests.workers.test_redis_jobs import echo, finished

TEXT = "a b c d e f g h i j k l m"


@pytest.fixture(scope="module")
def stack(fake_upstream, tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("worker-loss"), jobs_policy(fake_upstream.url), workers=2)
    yield s
    s.stop()


@pytest.fixture
def jobs(stack, upstream):
    stack.ensure_workers()
    upstream.default("slow-up", {"chunk_delay_s": 0.25})
    return stack


def _start_slow_job(stack: Stack):
    c = stack.gateway.client()
    r = c.responses.create(model="concilium/auto", input=TEXT, background=True, metadata={"kind": "long"})
    wait_for(lambda: sum(e["type"] == "response.output_text.delta" for e in stack.events(r.id)) >= 4, 30,
             "the job to be well under way")
    return c, r


def _exactly_one_answer(stack: Stack, c, job_id: str) -> None:
    final = finished(c, job_id, timeout=60)
    assert final.status == "completed" and final.output_text == echo(TEXT)
    events = stack.events(job_id)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert sum(e["type"] in TERMINAL_EVENT_TYPES for e in events) == 1
    streamed = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert streamed == final.output_text  # no text was sent twice
    assert [e["type"] for e in events].count("response.output_item.added") == 1
    bills = stack.bills(job_id)
    assert len(bills) == 1 and bills[0]["status"] == "completed"


def test_worker_killed_mid_job_the_job_finishes_on_another(jobs, upstream):
    c, r = _start_slow_job(jobs)
    victim = jobs.worker_running(r.id)
    survivor = next(w for w in jobs.workers if w is not victim)
    victim.kill_group()  # kill -9 the worker and its pool process
    _exactly_one_answer(jobs, c, r.id)
    rec = jobs.record(r.id)
    assert rec["attempts"] == "2" and rec["worker"].startswith(survivor.name + "@")
    assert upstream.stats()["requests"] == 2  # the killed attempt, then the one that answered


def test_pool_process_killed_mid_job_is_requeued(jobs, upstream):
    c, r = _start_slow_job(jobs)
    owner = jobs.worker_running(r.id)
    pid = int(jobs.record(r.id)["worker"].split("/")[1])
    os.kill(pid, signal.SIGKILL)  # the process running the job, not the worker
    _exactly_one_answer(jobs, c, r.id)
    assert jobs.record(r.id)["attempts"] == "2" and owner.alive


def test_redis_restarted_during_a_job(fake_upstream, upstream, tmp_path):
    upstream.default("slow-up", {"chunk_delay_s": 0.25})
    srv = RedisServer.start(tmp_path / "redis")
    stack = Stack.start(tmp_path, jobs_policy(fake_upstream.url), redis_url=srv.url, workers=1)
    try:
        c, r = _start_slow_job(stack)
        srv.kill()  # kill -9: every acknowledged write is on disk (appendfsync always)
        with pytest.raises(openai.InternalServerError) as refused:  # no job is accepted it cannot keep
            c.responses.create(model="concilium/auto", input="during the outage", background=True)
        assert refused.value.status_code == 503 and refused.value.code == "queue_unavailable"
        srv.launch()
        _exactly_one_answer(stack, c, r.id)
        assert "Connection to broker lost" in stack.workers[0].log.read_text()  # the outage was seen
        assert upstream.stats()["requests"] == 1  # the running call rode out the outage
    finally:
        stack.stop()
        srv.kill()
