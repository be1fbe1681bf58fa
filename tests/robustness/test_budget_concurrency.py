"""Budgets hold exactly under 50 concurrent requests from one key: spend never passes the cap and,
when a request's reservation equals its real cost, exactly the affordable number succeed - on one
gateway (in-process store) and on two replicas sharing Redis."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.guard.support import RedisServer, make_key, upstream_policy
from tests.support import start_gateway

KEY, KEY_H = make_key()
CAP = 0.1  # USD per day
# `cheap` costs $1000 per million output tokens and nothing for input; with max_tokens=5 the fake
# upstream writes exactly 5 tokens, so each request reserves and costs $0.005: 20 fit in $0.10.
PER_REQUEST = 5 * 1000 / 1e6
KEYS = f"keys:\n  - name: spender\n    hash: {KEY_H}\n    budget: {{usd_per_day: {CAP}}}\n"


async def _burst(urls: list[str], n: int, max_tokens: int, stream: bool = False) -> list[int]:
    body = {"model": "cheap", "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": "count my money please"}]}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        async def one(i: int) -> int:
            r = await client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body,
                                  headers={"authorization": f"Bearer {KEY}"})
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "budget_exceeded" and r.headers["retry-after"]
            return r.status_code
        return await asyncio.gather(*(one(i) for i in range(n)))


def _spent(url: str) -> float:
    r = httpx.get(url + "/v1/usage", headers={"authorization": f"Bearer {KEY}"}, timeout=10)
    scope = r.json()["scopes"][0]
    assert scope["reserved_usd"] == 0  # everything settled
    return scope["spent_usd"]["day"]


@pytest.fixture
def slow_upstream(upstream):
    upstream.default("cheap", {"delay_s": 0.3})  # all 50 are in flight together
    return upstream


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-gateway", "two-replicas-redis"])
def test_exactly_the_affordable_number_succeed(slow_upstream, tmp_path, replicas):
    env: dict[str, str] = {}
    redis = None
    if replicas == 2:
        redis = RedisServer.start(tmp_path / "redis")
        env["CONCILIUM_REDIS_URL"] = redis.url
    gws = [start_gateway(upstream_policy(slow_upstream.url, KEYS), tmp_path / f"p{i}.yaml", env=env)
           for i in range(replicas)]
    try:
        codes = asyncio.run(_burst([g.base_url for g in gws], 50, max_tokens=5, stream=False))
        assert codes.count(200) == round(CAP / PER_REQUEST) == 20
        assert codes.count(429) == 30
        spent = _spent(gws[0].base_url)
        assert spent == pytest.approx(CAP) and spent <= CAP + 1e-12
        assert slow_upstream.stats()["requests"] == 20  # the refused ones never reached a model
    finally:
        for g in gws:
            g.stop()
        if redis:
            redis.kill()


def test_spend_never_passes_the_cap_when_reservations_overestimate(slow_upstream, tmp_path):
    # streamed, max_tokens=20: each reserves $0.02 but the fake answers in 13 tokens ($0.013)
    g = start_gateway(upstream_policy(slow_upstream.url, KEYS), tmp_path / "p.yaml")
    try:
        codes = asyncio.run(_burst([g.base_url], 50, max_tokens=20, stream=True))
        ok = codes.count(200)
        assert ok >= int(CAP / 0.02) and codes.count(429) == 50 - ok
        spent = _spent(g.base_url)
        assert spent == pytest.approx(ok * 13 * 1000 / 1e6) and spent <= CAP
    finally:
        g.stop()
