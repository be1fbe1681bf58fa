"""A chat answered through a background job looks like one answered at once: the same `model`."""

from __future__ import annotations

import pytest

MSG = [{"role": "user", "content": "hello there"}]


def policy(url: str) -> str:
    return f"""
version: 1
models:
  big: {{provider: openai, base_url: "{url}", model: upstream-big}}
  spare: {{provider: openai, base_url: "{url}", model: upstream-spare}}
routes:
  - name: jobs
    match: {{model: [concilium/jobs]}}
    targets: [big]
    fallbacks: [spare]
    mode: background
  - name: now
    targets: [big]
    fallbacks: [spare]
router:
  virtual_models: [concilium/auto, concilium/jobs]
retry: {{attempts: 0, backoff_s: 0.01, backoff_max_s: 0.05}}
"""


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(policy(upstream.url))


def test_the_model_field_is_the_same_at_once_and_through_a_job(gw, upstream):
    client = gw.client()
    for failing in (None, "upstream-big"):  # the first candidate answers, then its fallback
        if failing:
            upstream.default(failing, {"status": 500})
        now = client.chat.completions.create(model="concilium/auto", messages=MSG)
        job = client.chat.completions.with_raw_response.create(model="concilium/jobs", messages=MSG)
        assert job.headers.get("x-concilium-job-id")  # it did run as a job
        assert job.parse().model == now.model, failing
        now_chunks = list(client.chat.completions.create(model="concilium/auto", messages=MSG, stream=True))
        job_chunks = list(client.chat.completions.create(model="concilium/jobs", messages=MSG, stream=True))
        assert {c.model for c in job_chunks} == {c.model for c in now_chunks} == {now.model}, failing
