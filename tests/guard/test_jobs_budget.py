"""Background jobs go through the same key checks and budgets as chat requests."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.guard.support import make_key, upstream_policy
from tests.support import start_gateway, wait_until


def test_background_responses_reserve_and_are_charged(fake_upstream, tmp_path):
    key, h = make_key()
    other, other_h = make_key()
    k2, h2 = make_key()
    keys = (f"keys:\n  - name: j\n    hash: {h}\n    budget: {{usd_per_day: 0.02}}\n"
            f"  - name: o\n    hash: {other_h}\n    models: [private]\n"
            f"  - name: k2\n    hash: {h2}\n    budget: {{usd_per_day: 0.01}}\n")
    g = start_gateway(upstream_policy(fake_upstream.url, keys), tmp_path / "p.yaml")
    try:
        client = g.client(api_key=key)
        ids, refused = [], 0
        for _ in range(6):  # each job may cost 5 tokens x $1000/M = $0.005: $0.02 buys exactly 4
            try:
                ids.append(client.responses.create(model="cheap", input="a b c d e", background=True,
                                                   max_output_tokens=5).id)
            except openai.RateLimitError as e:
                assert e.body["type"] == "insufficient_quota"
                refused += 1
        assert (len(ids), refused) == (4, 2)
        for job_id in ids:
            wait_until(lambda j=job_id: client.responses.retrieve(j).status == "completed", 20, "job done")
        scope = g.get("/v1/usage")  # no key: refused
        assert scope[0] == 401
        with pytest.raises(openai.PermissionDeniedError):  # a key's model allow-list holds for jobs too
            g.client(api_key=other).responses.create(model="cheap", input="x", background=True)
        # an idempotent repeat of a create is the same job and is not charged again
        c2 = g.client(api_key=k2)
        repeat = {"model": "cheap", "input": "a b c d e", "background": True, "max_output_tokens": 5,
                  "extra_headers": {"Idempotency-Key": "same-job"}}
        first = c2.responses.create(**repeat).id
        assert all(c2.responses.create(**repeat).id == first for _ in range(3))
        c2.responses.create(model="cheap", input="x", background=True, max_output_tokens=5)  # the 2nd charge
        with pytest.raises(openai.RateLimitError):
            c2.responses.create(model="cheap", input="y", background=True, max_output_tokens=5)
    finally:
        g.stop()


def test_a_chat_with_tools_on_a_background_route_pays_its_usage(fake_upstream, tmp_path):
    """Jobs carry text answers only, so such a chat is answered at once: it is billed what it used,
    not its reservation."""
    key, h = make_key()
    routes = "routes:\n  - name: default\n    targets: [cheap]\n    mode: background\n"
    keys = f"keys:\n  - name: t\n    hash: {h}\n    budget: {{usd_per_day: 1.0}}\n"
    g = start_gateway(upstream_policy(fake_upstream.url, keys, routes), tmp_path / "p.yaml")
    try:
        client = g.client(api_key=key)
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        for stream in (False, True):
            raw = client.chat.completions.with_raw_response.create(
                model="concilium/auto", messages=[{"role": "user", "content": "a b c"}], tools=tools,
                max_tokens=100, stream=stream, stream_options={"include_usage": True} if stream else None)
            assert "x-concilium-job-id" not in raw.headers
            if stream:
                list(raw.parse())
        r = httpx.get(g.base_url + "/v1/usage", headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 200
        usage = r.json()
        # each answer: 13 completion tokens at $1000/M = $0.013 (the reservation was 100 tokens: $0.10)
        assert usage["scopes"][0]["spent_usd"]["day"] == pytest.approx(2 * 0.013)
    finally:
        g.stop()
