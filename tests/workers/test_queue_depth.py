"""The job queue depth is a metric: jobs waiting in each queue for a worker, from the broker."""

from __future__ import annotations

import json
import urllib.request

from tests.gateway.policies import two_models
from tests.support import http_json, start_gateway


def depths(gw) -> dict[str, float]:
    with urllib.request.urlopen(gw.base_url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    out = {}
    for line in lines:
        if line.startswith("concilium_jobs_queued{"):
            out[line.split('queue="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_jobs_waiting_for_a_worker_are_counted_per_queue(upstream, tmp_path):
    from tests.guard.support import RedisServer

    redis = RedisServer.start(tmp_path / "redis")  # .ci/run installs redis-server
    gw = start_gateway(two_models(upstream.url), tmp_path / "p.yaml", env={"CONCILIUM_REDIS_URL": redis.url})
    try:
        assert depths(gw) == {"high": 0.0, "default": 0.0, "low": 0.0}
        for _ in range(2):  # no worker runs: both wait in the default queue
            status, body = http_json("POST", gw.v1 + "/responses", {"model": "concilium/auto", "input": "hi",
                                                                   "background": True})
            assert status == 200 and body["status"] == "queued", json.dumps(body)
        assert depths(gw) == {"high": 0.0, "default": 2.0, "low": 0.0}
    finally:
        gw.stop()
        redis.kill()
