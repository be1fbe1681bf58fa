"""Redis killed mid-load: interactive traffic keeps flowing (the guard enforces limits in-process
meanwhile), job submission answers 503 with a clear message, and nothing acknowledged is lost - jobs
accepted before the outage are still there, and every request's spend reaches Redis."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests.guard.support import RedisServer, make_key, upstream_policy
from tests.support import start_gateway

KEY, KEY_H = make_key()
KEYS = f"keys:\n  - name: busy\n    hash: {KEY_H}\n    budget: {{usd_per_day: 1000}}\n"
PER_REQUEST = 5 * 1000 / 1e6  # 5 output tokens at $1000 per million
AUTH = {"authorization": f"Bearer {KEY}"}
N = 150


def _usage(url: str) -> dict:
    return httpx.get(url + "/v1/usage", headers=AUTH, timeout=10).json()


async def _interactive(url: str, progress: list[int], results: list[int]) -> None:
    body = {"model": "cheap", "max_tokens": 5, "messages": [{"role": "user", "content": "keep going"}]}
    sem = asyncio.Semaphore(6)
    async with httpx.AsyncClient(timeout=30) as client:
        async def one(i: int) -> None:
            async with sem:
                stream = i % 2 == 0
                r = await client.post(url + "/v1/chat/completions", json={**body, "stream": stream}, headers=AUTH)
                if stream and r.status_code == 200 and b"[DONE]" not in r.content:
                    results.append(-1)
                else:
                    results.append(r.status_code)
                progress[0] += 1
        await asyncio.gather(*(one(i) for i in range(N)))


def _wait(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_redis_killed_mid_load(upstream, tmp_path):
    redis = RedisServer.start(tmp_path / "redis", durable=True)
    gw = start_gateway(upstream_policy(upstream.url, KEYS), tmp_path / "p.yaml",
                       env={"CONCILIUM_REDIS_URL": redis.url})
    upstream.default("cheap", {"delay_s": 0.02})
    try:
        job = httpx.post(gw.v1 + "/responses", headers=AUTH, timeout=30,
                         json={"model": "cheap", "input": "a job accepted before the outage", "background": True,
                               "max_output_tokens": 5})
        assert job.status_code in (200, 202), job.text
        job_id = job.json()["id"]

        progress, results = [0], []
        t = threading.Thread(target=lambda: asyncio.run(_interactive(gw.base_url, progress, results)))
        t.start()
        _wait(lambda: progress[0] >= N // 4, 60, "load did not start")
        redis.kill()
        killed_at = progress[0]
        refused = httpx.post(gw.v1 + "/responses", headers=AUTH, timeout=30,
                             json={"model": "cheap", "input": "submitted during the outage", "background": True,
                                   "max_output_tokens": 5})
        _wait(lambda: progress[0] >= killed_at + N // 3, 60, "interactive traffic stalled while Redis was down")
        redis.restart()
        t.join(120)
        assert not t.is_alive()

        assert results.count(200) == N, f"failures: {[r for r in results if r != 200]}"
        # acknowledged before the outage: still there
        again = httpx.get(gw.v1 + f"/responses/{job_id}", headers=AUTH, timeout=30)
        assert again.status_code == 200 and again.json()["id"] == job_id
        # every interactive request's spend reached Redis (settled during the outage: replayed), plus the
        # accepted job's reservation; the refused job was not charged
        spend = (N + 1) * PER_REQUEST
        _wait(lambda: _usage(gw.base_url)["scopes"][0]["spent_usd"]["day"] >= spend - 1e-9, 30,
              "spend settled during the outage was not replayed into Redis")
        scope = _usage(gw.base_url)["scopes"][0]
        assert scope["spent_usd"]["day"] == pytest.approx(spend)
        assert "degraded" not in _usage(gw.base_url)
        assert refused.status_code == 503, refused.text
        assert "job queue is unavailable" in refused.json()["error"]["message"]
    finally:
        gw.stop()
        redis.kill()
    assert "limits store down" in gw.log.read_text() and "limits store is back" in gw.log.read_text()
