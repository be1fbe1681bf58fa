"""A model paid by the GPU second (`options.usd_per_gpu_second`) is counted at that price everywhere a
cost is published: the gateway's /metrics and a background job's bill, as the guard charges it."""

from __future__ import annotations

import re

from starlette.testclient import TestClient

from concilium.gateway.app import create_app
from concilium.settings import Settings
from tests.support import wait_until

PRICE = 1000.0  # USD per GPU second: any call, however fast, costs a visible amount


def _policy(upstream_url: str) -> str:
    return f"""
version: 1
models:
  gpu:
    provider: openai
    base_url: "{upstream_url}"
    model: gpu
    options: {{usd_per_gpu_second: {PRICE}}}
router: {{virtual_models: [concilium/auto], learned: false}}
routes:
  - name: main
    targets: [gpu]
"""


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0  # a counter never counted is not written


def test_gpu_second_cost_reaches_metrics_and_job_bills(upstream, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(_policy(upstream.url))
    app = create_app(Settings(redis_url=None, data_dir=str(tmp_path / "var"), policy_watch_s=0), str(path))
    with TestClient(app) as client:
        msg = [{"role": "user", "content": "a b c"}]
        for stream in (False, True):
            r = client.post("/v1/chat/completions", json={"model": "gpu", "messages": msg, "stream": stream})
            assert r.status_code == 200
        cost = _metric(client.get("/metrics").text, "concilium_cost_usd_total", model="gpu", route="pinned")
        assert cost > 0  # two calls of some milliseconds each, at $1000 a second

        job = client.post("/v1/responses", json={"model": "gpu", "input": "a b c", "background": True}).json()
        wait_until(lambda: client.get(f"/v1/responses/{job['id']}").json()["status"] == "completed", 30, "job")
        store = app.state.services.jobs.store
        bills = client.portal.call(store.bills, job["id"])
        assert len(bills) == 1 and bills[0]["model"] == "gpu"
        assert bills[0]["cost_usd"] > 0  # the job's wall time at the GPU price, not its (unpriced) tokens
