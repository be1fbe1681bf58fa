"""Per-model `defaults` in the policy: sent for the parameters a client leaves out, never over the
client's own values, and each candidate model gets its own (a fallback does not inherit them)."""

from __future__ import annotations

import pytest

MSG = [{"role": "user", "content": "hello there"}]


def policy(url: str) -> str:
    return f"""
version: 1
models:
  primary:
    provider: openai
    base_url: "{url}"
    model: primary
    defaults: {{temperature: 0.2, top_p: 0.9, max_tokens: 50}}
  backup:
    provider: openai
    base_url: "{url}"
    model: backup
    defaults: {{temperature: 0.7}}
routes:
  - name: main
    targets: [primary]
    fallbacks: [backup]
retry: {{attempts: 0, backoff_s: 0.01, backoff_max_s: 0.05}}
"""


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(policy(upstream.url))


def sent(upstream) -> dict:
    return upstream.stats()["last_body"]


def test_defaults_fill_only_what_the_client_omits(gw, upstream):
    client = gw.client()
    client.chat.completions.create(model="concilium/auto", messages=MSG)
    body = sent(upstream)
    assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == ("primary", 0.2, 0.9, 50)

    client.chat.completions.create(model="concilium/auto", messages=MSG, temperature=0, top_p=0.5, max_tokens=7)
    body = sent(upstream)
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0, 0.5, 7)

    client.chat.completions.create(model="primary", messages=MSG, max_completion_tokens=9)
    body = sent(upstream)
    assert body["max_completion_tokens"] == 9 and "max_tokens" not in body and body["temperature"] == 0.2

    list(client.chat.completions.create(model="concilium/auto", messages=MSG, stream=True))
    body = sent(upstream)
    assert body["stream"] is True and (body["temperature"], body["top_p"]) == (0.2, 0.9)


def test_a_fallback_gets_its_own_defaults(gw, upstream):
    upstream.default("primary", {"status": 500})
    r = gw.client().chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG)
    assert r.headers["x-concilium-model"] == "backup"
    body = sent(upstream)
    assert body["model"] == "backup" and body["temperature"] == 0.7
    assert "top_p" not in body and "max_tokens" not in body  # primary's defaults stay with primary
