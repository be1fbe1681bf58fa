"""A fusion as a background job on real Celery workers and Redis: every finished panel call is a
checkpoint, so a worker killed with -9 mid-panel is replaced by one that pays only for what was not
done, and the job is billed once for every call that answered."""

from __future__ import annotations

import pytest

from tests.workers.support import Stack, wait_for
from tests.workers.test_redis_jobs import echo, finished

TEXT = "name the three primary colours of light please"


def policy(url: str) -> str:
    models = "\n".join(f"  {m}: {{provider: openai, base_url: \"{url}\", model: {m}-up, "
                       f"price: {{input: 1.0, output: 2.0}}}}" for m in ("fast", "slow", "synth"))
    return f"""
version: 1
models:
{models}
router: {{virtual_models: [concilium/auto], learned: false}}
routes:
  - name: panel
    targets: [synth]
    rank: false
    mode: background
    strategy: fusion
    fusion: {{panel: [fast, slow]}}
retry: {{attempts: 0}}
"""


@pytest.fixture(scope="module")
def stack(fake_upstream, tmp_path_factory):
    s = Stack.start(tmp_path_factory.mktemp("compose-jobs"), policy(fake_upstream.url), workers=2)
    yield s
    s.stop()


def steps(stack: Stack, job_id: str) -> list[dict]:
    return [e for e in stack.events(job_id) if e["type"] == "concilium.step"]


def test_a_fusion_job_reports_its_steps_and_bills_every_call(stack, upstream):
    stack.ensure_workers()
    c = stack.gateway.client()
    job = c.responses.create(model="concilium/auto", input=TEXT, background=True)
    final = finished(c, job.id)
    assert final.status == "completed" and final.output_text == echo(TEXT)
    done = {(e["id"], e["status"]) for e in steps(stack, job.id)}
    assert {("p1", "started"), ("p1", "ok"), ("p2", "started"), ("p2", "ok")} <= done
    (bill,) = stack.bills(job.id)
    assert bill["model"] == "synth" and sorted(x["model"] for x in bill["calls"]) == ["fast", "slow"]
    assert bill["cost_usd"] == pytest.approx(sum(x["cost_usd"] for x in bill["calls"])
                                             + (bill["usage"]["prompt_tokens"] + 2 * 13) / 1e6)


def test_a_worker_killed_mid_panel_resumes_without_paying_twice(stack, upstream):
    stack.ensure_workers()
    upstream.default("slow-up", {"delay_s": 4.0})
    c = stack.gateway.client()
    job = c.responses.create(model="concilium/auto", input=TEXT, background=True)
    wait_for(lambda: any(e["id"] == "p1" and e["status"] == "ok" for e in steps(stack, job.id))
             and upstream.stats()["by_model"].get("slow-up") == 1, 30,
             "the fast panelist's checkpoint, with the slow one still thinking")
    stack.worker_running(job.id).kill_group()  # kill -9 the worker and its pool process
    final = finished(c, job.id, timeout=60)
    assert final.status == "completed" and final.output_text == echo(TEXT)
    by_model = upstream.stats()["by_model"]
    assert by_model["fast-up"] == 1  # its answer came from the checkpoint
    assert by_model["slow-up"] == 2 and by_model["synth-up"] == 1
    assert sum(e["id"] == "p1" and e["status"] == "ok" for e in steps(stack, job.id)) == 1
    assert stack.record(job.id)["attempts"] == "2"
    (bill,) = stack.bills(job.id)
    assert sorted(x["model"] for x in bill["calls"]) == ["fast", "slow"]  # each step paid once
