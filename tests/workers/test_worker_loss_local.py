"""A worker whose policy has a local model recovers when its pool process is killed: the model takes
longer to load than Celery waits for a new pool process to report, so the load must not delay it."""

from __future__ import annotations

import os
import signal

import pytest

from tests.workers.support import Stack, jobs_policy, wait_for
from tests.workers.test_worker_loss import _exactly_one_answer, _start_slow_job

LOCAL = """
  smollm2:
    provider: local
    model: smollm2-135m-instruct
    tier: small
"""


@pytest.fixture(scope="module")
def stack(fake_upstream, tmp_path_factory):
    policy = jobs_policy(fake_upstream.url).replace("models:\n", "models:" + LOCAL, 1)
    s = Stack.start(tmp_path_factory.mktemp("worker-loss-local"), policy, workers=1)
    yield s
    s.stop()


def test_pool_process_killed_with_a_local_model_comes_back(stack, upstream):
    upstream.default("slow-up", {"chunk_delay_s": 0.25})
    worker = stack.workers[0]
    c, r = _start_slow_job(stack)
    pid = int(stack.record(r.id)["worker"].split("/")[1])
    os.kill(pid, signal.SIGKILL)
    _exactly_one_answer(stack, c, r.id)
    rec = stack.record(r.id)
    assert rec["attempts"] == "2" and int(rec["worker"].split("/")[1]) != pid
    assert worker.alive
    assert "Timed out waiting for UP message" not in worker.log.read_text()
    # and the replacement serves the next job too
    again = c.responses.create(model="concilium/auto", input="after the restart", background=True)
    wait_for(lambda: c.responses.retrieve(again.id).status == "completed", 60, "the next job")
