"""The response cache through a real gateway (openai SDK, fake upstream): exact and semantic hits,
streamed and not, bypass rules and headers, per-key isolation, TTL, billing, Redis, metrics."""

from __future__ import annotations

import urllib.request

import anthropic
import pytest

from tests.guard.support import RedisServer, make_key, upstream_policy
from tests.guard.test_gateway_guard import get
from tests.support import wait_until

ALICE, ALICE_H = make_key()
BOB, BOB_H = make_key()
KEYS = f"""
keys:
  - name: alice
    hash: {ALICE_H}
    budget: {{usd_per_day: 10}}
  - name: bob
    hash: {BOB_H}
    budget: {{usd_per_day: 10}}
"""
ROUTES = """
routes:
  - name: default
    targets: [cheap]
"""


def policy(url: str, cache: str, keys: str = "") -> str:
    return upstream_policy(url, keys + cache, ROUTES)


def ask(gw, text: str = "what is the capital of France", key: str = "x", stream: bool = False,
        headers: dict | None = None, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 8)
    client = gw.client(api_key=key)
    r = client.chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": text}], stream=stream,
        extra_headers=headers or {}, **kw)
    body = r.parse()
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in body if c.choices)
    else:
        text = body.choices[0].message.content
    return r.headers.get("x-concilium-cache"), text, r.headers


def calls(upstream) -> int:
    return upstream.stats()["by_model"].get("cheap", 0)


def test_exact_hits_streamed_or_not_and_what_bypasses(upstream, gateway_factory):
    gw = gateway_factory(policy(upstream.url, "cache: {ttl_s: 600}"))
    state, first, _ = ask(gw)
    assert state == "miss" and calls(upstream) == 1
    state, again, headers = ask(gw, user="someone", metadata={"a": "b"})
    assert state == "hit" and again == first and calls(upstream) == 1
    assert headers["x-concilium-model"] == "cheap"
    state, streamed, headers = ask(gw, stream=True, stream_options={"include_usage": True})
    assert state == "hit" and streamed == first and calls(upstream) == 1
    assert headers["content-type"].startswith("text/event-stream")
    # a streamed miss is stored too, and served whole afterwards
    state, s1, _ = ask(gw, "name a colour", stream=True)
    assert state == "miss" and calls(upstream) == 2
    state, s2, _ = ask(gw, "name a colour")
    assert state == "hit" and s2 == s1 and calls(upstream) == 2
    # what changes the answer is another entry
    assert ask(gw, max_tokens=3)[0] == "miss"
    # never cached: sampled without a seed, tools (n > 1 is refused before the cache)
    for kw in ({"temperature": 0.8}, {"tools": [{"type": "function", "function": {"name": "f"}}]}):
        before = calls(upstream)
        assert ask(gw, **kw)[0] == "bypass" and ask(gw, **kw)[0] == "bypass", kw
        assert calls(upstream) == before + 2
    assert ask(gw, temperature=0.8, seed=7)[0] == "miss" and ask(gw, temperature=0.8, seed=7)[0] == "hit"
    # never for PII
    assert ask(gw, "mail me at jo@example.com")[0] == "bypass"
    assert ask(gw, "mail me at jo@example.com")[0] == "bypass"

    # Cache-Control: no-cache asks the model again (and stores the fresh answer); no-store keeps it out
    before = calls(upstream)
    assert ask(gw, headers={"cache-control": "no-cache"})[0] == "bypass" and calls(upstream) == before + 1
    assert ask(gw)[0] == "hit"
    assert ask(gw, "kept out", headers={"cache-control": "no-store"})[0] == "miss"
    assert ask(gw, "kept out")[0] == "miss"
    assert ask(gw, "kept out")[0] == "hit"

    with urllib.request.urlopen(gw.base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'concilium_cache_requests_total{kind="exact",result="hit",route="default"}' in text
    assert 'concilium_cache_requests_total{kind="",result="miss",route="default"}' in text


def test_anthropic_messages_share_the_cache(upstream, gateway_factory):
    gw = gateway_factory(policy(upstream.url, "cache: {}"))
    client = anthropic.Anthropic(base_url=gw.base_url, api_key="x", max_retries=0)
    kw = {"model": "concilium/auto", "max_tokens": 8, "extra_body": {"temperature": 0},
          "messages": [{"role": "user", "content": "say something"}]}
    first = client.messages.with_raw_response.create(**kw)
    assert first.headers["x-concilium-cache"] == "miss"
    again = client.messages.with_raw_response.create(**kw)
    assert again.headers["x-concilium-cache"] == "hit" and again.parse().content[0].text == first.parse().content[0].text
    with client.messages.stream(**kw) as s:
        text = "".join(s.text_stream)
    assert text == first.parse().content[0].text and calls(upstream) == 1


def test_no_cache_section_no_header(upstream, gateway_factory):
    gw = gateway_factory(policy(upstream.url, ""))
    assert ask(gw)[0] is None and ask(gw)[0] is None and calls(upstream) == 2


def test_per_key_billing_and_sharing(upstream, gateway_factory):
    gw = gateway_factory(policy(upstream.url, "cache: {}", KEYS))
    assert ask(gw, key=ALICE)[0] == "miss"
    spent = get(gw, "/v1/usage", ALICE)[2]["scopes"][0]["spent_usd"]["day"]
    assert spent > 0  # the miss is billed
    assert ask(gw, key=BOB)[0] == "miss" and calls(upstream) == 2  # never another key's answer
    for stream in (False, True):
        assert ask(gw, key=ALICE, stream=stream)[0] == "hit"
    scope = get(gw, "/v1/usage", ALICE)[2]["scopes"][0]
    assert scope["spent_usd"]["day"] == spent and scope["reserved_usd"] == 0  # hits are free
    assert calls(upstream) == 2

    shared = gateway_factory(policy(upstream.url, "cache: {share_across_keys: true}", KEYS))
    assert ask(shared, "shared question", key=ALICE)[0] == "miss"
    assert ask(shared, "shared question", key=BOB)[0] == "hit"


def test_ttl_expiry(upstream, gateway_factory):
    gw = gateway_factory(policy(upstream.url, "cache: {ttl_s: 0.3}"))
    assert ask(gw)[0] == "miss"
    wait_until(lambda: ask(gw)[0] == "miss", 10, "the entry to expire")


def test_semantic_hits_near_duplicates_only(upstream, gateway_factory):
    gw = gateway_factory(policy(upstream.url, "cache: {semantic: {threshold: 0.9}}"))
    state, first, _ = ask(gw, "What is the capital of France?")
    assert state == "miss"
    state, text, headers = ask(gw, "what is the capital of france")
    assert state == "hit" and text == first and float(headers["x-concilium-cache-similarity"]) >= 0.9
    assert ask(gw, "Write a haiku about autumn leaves")[0] == "miss"
    # the same question with other sampling parameters is never a semantic hit
    assert ask(gw, "what is the capital of france", max_tokens=3)[0] == "miss"


@pytest.fixture
def redis_server(tmp_path):
    srv = RedisServer.start(tmp_path / "redis")
    yield srv
    srv.kill()


def test_redis_cache_is_shared_by_replicas(upstream, gateway_factory, redis_server):
    env = {"CONCILIUM_REDIS_URL": redis_server.url}
    one = gateway_factory(policy(upstream.url, "cache: {ttl_s: 1, semantic: {threshold: 0.9}}"), env=env)
    two = gateway_factory(policy(upstream.url, "cache: {ttl_s: 1, semantic: {threshold: 0.9}}"), env=env)
    assert ask(one)[0] == "miss"
    assert ask(two)[0] == "hit" and ask(two, stream=True)[0] == "hit"
    assert ask(two, "What is the capital of France?")[0] == "hit"  # semantic, from Redis
    assert calls(upstream) == 1
    wait_until(lambda: ask(one)[0] == "miss", 15, "the Redis entry to expire")
