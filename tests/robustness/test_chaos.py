"""Chaos: the primary upstream fails at random (5xx, 429, timeouts, streams dropped before the first
token, malformed chunks) under concurrent load, while the fallback is healthy.

What the gateway guarantees: any failure before a stream's first token (or of a non-streamed call)
is retried and then falls back, invisibly to the client. After the first token has been sent, the
answer cannot be switched to another model without the client seeing two answers; such a stream
ends with an explicit in-stream error event, never a silent truncation or a hung connection.
"""

from __future__ import annotations

import asyncio
import random

import openai
import pytest

from tests.support import FakeUpstream, start_gateway

N_REQUESTS = 200
CONCURRENCY = 16


@pytest.fixture(scope="module")
def flaky():
    up = FakeUpstream.start()
    yield up
    up.stop()


def policy(flaky_url: str, steady_url: str) -> str:
    return f"""
version: 1
models:
  # a request that names `flaky` falls back only as its own policy entry says
  flaky: {{provider: openai, base_url: "{flaky_url}", model: flaky, fallbacks: [steady], timeout_s: 0.5}}
  steady: {{provider: openai, base_url: "{steady_url}", model: steady}}
routes:
  - name: default
    targets: [flaky]
    fallbacks: [steady]
    timeout_s: 0.5
retry: {{attempts: 1, backoff_s: 0.01, backoff_max_s: 0.05, retry_after_max_s: 0.2}}
circuit_breaker: {{failures: 8, cooldown_s: 0.2}}
"""


async def _load(gw, n: int) -> list[tuple[str, str | None, str]]:
    """(mode, error or None, text) per request, streaming and not, `n` requests, CONCURRENCY at a time."""
    client = gw.async_client(timeout=30)
    sem = asyncio.Semaphore(CONCURRENCY)
    rng = random.Random(5)
    plan = [(i, rng.random() < 0.5) for i in range(n)]

    async def one(i: int, stream: bool) -> tuple[str, str | None, str]:
        words = f"request {i} asks for its own words back"
        msgs = [{"role": "user", "content": words}]
        async with sem:
            try:
                if stream:
                    s = await client.chat.completions.create(model="flaky", messages=msgs, stream=True)
                    text = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
                else:
                    r = await client.chat.completions.create(model="flaky", messages=msgs)
                    text = r.choices[0].message.content
            except openai.APIError as e:
                return ("stream" if stream else "complete", f"{type(e).__name__}: {e}", "")
            return ("stream" if stream else "complete", None if words in text else f"wrong text {text!r}", text)

    try:
        return await asyncio.gather(*(one(i, s) for i, s in plan))
    finally:
        await client.close()


def test_no_client_visible_failures_while_the_fallback_is_healthy(flaky, upstream, tmp_path):
    flaky.reset()
    # before-first-token stream faults, then random 5xx / 429 / slow-past-the-timeout answers
    early = [{"drop_after": 1}, {"malformed_at": 1}, {"status": 503}] * 8
    random.Random(1).shuffle(early)
    flaky.script("*", early)
    flaky.chaos(p_500=0.2, p_429=0.15, p_slow=0.1, slow_s=2.0, p_drop=0.0, seed=3)
    gw = start_gateway(policy(flaky.url, upstream.url), tmp_path / "p.yaml")
    try:
        results = asyncio.run(_load(gw, N_REQUESTS))
    finally:
        gw.stop()
    failures = [r for r in results if r[1] is not None]
    assert failures == []
    faults = flaky.stats()["faults"]
    injected = sum(faults.values())
    assert injected >= 30, faults  # the test did meet many faults, of every kind
    assert any('"drop_after"' in f for f in faults) and any('"status":500' in f for f in faults)
    assert any('"status":429' in f for f in faults) and any('"delay_s"' in f for f in faults)
    assert upstream.stats()["requests"] > 0  # and the fallback did answer


def test_a_stream_broken_after_its_first_token_ends_with_an_error_event(flaky, upstream, tmp_path):
    flaky.reset()
    flaky.chaos(p_drop=1.0)  # every stream is cut after its first content chunk
    gw = start_gateway(policy(flaky.url, upstream.url), tmp_path / "p.yaml")
    try:
        results = asyncio.run(_load(gw, 24))
    finally:
        gw.stop()
    streams = [r for r in results if r[0] == "stream"]
    completes = [r for r in results if r[0] == "complete"]
    assert streams and completes
    assert all(err is None for _, err, _ in completes)  # non-streamed calls are unaffected
    for _, err, _text in streams:  # the client is told, in the stream, that it broke
        assert err is not None and "failed after it started" in err, err
