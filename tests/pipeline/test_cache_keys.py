"""The response cache's rules: what counts in the key, what is never cached, and the in-process store."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from concilium.pipeline import cache
from concilium.policy.loader import PolicyError, parse_policy
from concilium.policy.schema import CacheConfig

BASE = {"model": "concilium/auto", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0}


def key(**changes):
    return cache.exact_key({**BASE, **changes}, "main", "key:a")


def test_fields_that_cannot_change_the_answer_are_ignored():
    k = key()
    assert key(stream=True, stream_options={"include_usage": True}) == k
    assert key(user="u1", metadata={"b": "2", "a": "1"}, store=True) == k
    assert key(temperature=0.0, n=1, top_p=None) == k
    assert key(stop="x") == key(stop=["x"])


def test_everything_that_changes_the_answer_is_in_the_key():
    k = key()
    for change in ({"model": "primary"}, {"temperature": 0.2}, {"max_tokens": 5}, {"seed": 1},
                   {"messages": [{"role": "user", "content": "What is 2+3?"}]},
                   {"messages": [{"role": "system", "content": "Be terse."}, *BASE["messages"]]},
                   {"response_format": {"type": "json_object"}}, {"logprobs": True}, {"reasoning_effort": "low"}):
        assert key(**change) != k, change
    assert cache.exact_key(BASE, "other", "key:a") != k  # another route
    assert cache.exact_key(BASE, "main", "key:b") != k  # another API key


def test_what_is_never_cached():
    cfg = CacheConfig()
    assert cache.uncacheable(BASE, cfg) is None
    assert cache.uncacheable({**BASE, "n": 2}, cfg) == "n"
    assert cache.uncacheable({**BASE, "tools": [{"type": "function", "function": {"name": "f"}}]}, cfg) == "tools"
    assert cache.uncacheable({**BASE, "temperature": 0.7}, cfg) == "temperature"
    no_t = {k: v for k, v in BASE.items() if k != "temperature"}
    assert cache.uncacheable(no_t, cfg) == "temperature"  # the default temperature is 1
    assert cache.uncacheable({**BASE, "temperature": 0.7, "seed": 3}, cfg) is None  # a reproducible sample
    assert cache.uncacheable({**BASE, "temperature": 0.7}, CacheConfig(sampled=True)) is None


def test_semantic_bucket_holds_everything_but_the_last_user_text():
    b1, t1 = cache.semantic_parts(BASE, "main", "ns")
    b2, t2 = cache.semantic_parts({**BASE, "messages": [{"role": "user", "content": "what's 2 + 2"}]}, "main", "ns")
    assert b1 == b2 and t1 != t2
    b3, _ = cache.semantic_parts({**BASE, "max_tokens": 3}, "main", "ns")
    assert b3 != b1
    b4, _ = cache.semantic_parts({**BASE, "messages": [{"role": "user", "content": "What is 2+3?"}]}, "main", "ns")
    assert b4 != b1  # other numbers: another question
    assert cache.prompt_numbers("from -3 to 3.5, 1,000") == ["-3", "3.5", "1,000"]
    assert cache.semantic_parts({**BASE, "messages": [{"role": "assistant", "content": "x"}]}, "main", "ns") is None


def test_memory_store_expires_and_evicts_least_recently_used():
    now = [0.0]
    store = cache.MemoryStore(clock=lambda: now[0])
    cfg = CacheConfig(ttl_s=10, max_entries=2)
    v = np.ones(4, dtype=np.float32) / 2

    async def go():
        await store.put("r", "a", b"A", cfg, "bucket", v, frozenset({"capital", "france"}))
        await store.put("r", "b", b"B", cfg)
        assert await store.get("r", "a") == b"A"  # a is now the most recent
        await store.put("r", "c", b"C", cfg)
        assert await store.get("r", "b") is None and store.size("r") == 2
        found = await store.nearest("r", "bucket", v, 0.99, frozenset({"capital", "frnace"}))
        assert found.value == b"A" and found.similarity == pytest.approx(1.0)
        assert await store.nearest("r", "bucket", v, 0.99, frozenset({"capital", "spain"})) is None
        assert await store.nearest("r", "bucket", -v, 0.5, frozenset({"capital", "france"})) is None
        now[0] = 11.0
        assert await store.get("r", "a") is None
        assert await store.nearest("r", "bucket", v, 0.5, frozenset({"capital", "france"})) is None

    asyncio.run(go())


def test_same_words_allows_case_punctuation_and_typos_only():
    w = cache.prompt_words
    assert cache.same_words(w("What is the capital of France?"), w("what's the capital of france"))
    assert cache.same_words(w("What is the capital of France?"), w("What is the captial of Frnace"))
    assert not cache.same_words(w("Write a poem about horses"), w("Write a poem about horses and cats"))
    assert not cache.same_words(w("Write a poem about horses"), w("Write a poem about turtles"))


POLICY = """
version: 1
models:
  m: {provider: openai, base_url: "http://127.0.0.1:9/v1", model: m}
routes:
  - name: main
    targets: [m]
"""


@pytest.mark.parametrize("section, where", [
    ("cache: {ttl_s: 0}", "cache.ttl_s"),
    ("cache: {max_entries: 0}", "cache.max_entries"),
    ("cache: {semantic: {threshold: 1.5}}", "cache.semantic.threshold"),
    ("cache: {exact: false}", "cache.exact"),
    ("cache: {share_accross_keys: true}", "cache.share_accross_keys"),
])
def test_a_bad_cache_section_names_its_place(section, where):
    with pytest.raises(PolicyError) as e:
        parse_policy(POLICY + section + "\n", "p.yaml")
    assert where in str(e.value), str(e.value)


def test_route_overrides_and_cascade_routes():
    p = parse_policy(POLICY.replace("    targets: [m]", "    targets: [m]\n    cache: {ttl_s: 5}")
                     + "cache: {semantic: {threshold: 0.9}}\n")
    plan = cache.cache_plan(p)
    cfg = plan.for_route("main")
    assert cfg.ttl_s == 5 and cfg.semantic.threshold == 0.9 and plan.embedder is not None
    assert plan.for_route("pinned").ttl_s == 300
    assert cache.cache_plan(parse_policy(POLICY)) is None
    off = parse_policy(POLICY.replace("    targets: [m]", "    targets: [m]\n    cache: {enabled: false}")
                       + "cache: {}\n")
    assert cache.cache_plan(off).for_route("main") is None
    with pytest.raises(PolicyError) as e:
        parse_policy(POLICY.replace("    targets: [m]", "    targets: [m]\n    strategy: cascade\n"
                                    "    cascade: {drafts: [m], scorer: checks}\n    cache: {}"))
    assert "routes[0].cache" in str(e.value)


def test_policy_check_reports_a_bad_cache_section(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(POLICY + "cache: {ttl_s: -1, semantic: {threshold: 0}}\n")
    run = subprocess.run([sys.executable, "-m", "concilium.cli", "policy", "check", str(f)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "cache.ttl_s" in run.stdout and "cache.semantic.threshold" in run.stdout
