"""Budgets through the real gateway: a denial says what is left and what the request needs (no "$0.00"
for a cap that is not spent), and candidates the key cannot afford are dropped instead of refusing a
request that a cheaper candidate can answer."""

from __future__ import annotations

import re

import openai
import pytest

from concilium.guard.store import Denied, ScopeUsage
from tests.guard.support import make_key
from tests.support import start_gateway

KIM, KIM_H = make_key()
LEE, LEE_H = make_key()

POLICY = f"""
version: 1
models:
  cheap: {{provider: openai, base_url: "URL", model: cheap, price: {{input: 0, output: 10}}}}
  pricey: {{provider: openai, base_url: "URL", model: pricey, price: {{input: 0, output: 10000}}}}
routes:
  - name: default
    targets: [pricey]
    fallbacks: [cheap]
retry: {{attempts: 0}}
keys:
  - name: kim
    hash: {KIM_H}
    budget: {{usd_per_day: 0.05}}
  - name: lee
    hash: {LEE_H}
    budget: {{usd_per_day: 0.0005}}
"""


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    g = start_gateway(POLICY.replace("URL", fake_upstream.url), d / "policy.yaml",
                      env={"CONCILIUM_KEYS_FILE": str(d / "keys.yaml"), "CONCILIUM_REDIS_URL": ""})
    yield g
    g.stop()


def ask(gw, key, model="concilium/auto", **kw):
    return gw.client(api_key=key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **kw)


def test_unaffordable_candidates_are_dropped_not_the_request(gw, upstream):
    # pricey may cost up to $1 (100 tokens at $10,000/M): more than kim's $0.05; cheap at most $0.001
    raw = ask(gw, KIM, max_tokens=100)
    assert raw.headers["x-concilium-model"] == "cheap"
    assert "skipped pricey" in raw.headers["x-concilium-reason"]
    assert upstream.stats()["by_model"] == {"cheap": 1}


def test_denial_says_what_is_left_and_what_the_request_needs(gw, upstream):
    with pytest.raises(openai.RateLimitError) as e:
        ask(gw, LEE, model="cheap", max_tokens=100)  # needs $0.001 of lee's $0.0005
    msg = e.value.message
    assert "$0.00)" not in msg and "over its budget" not in msg  # nothing is spent: it is not "over"
    assert "$0.0005" in msg and "left" in msg and "$0.001" in msg and "max_tokens" in msg
    assert e.value.body["code"] == "budget_exceeded" and e.value.body["type"] == "insufficient_quota"
    assert re.fullmatch(r"\d+", e.value.response.headers["retry-after"])
    assert upstream.stats()["requests"] == 0


def test_money_is_shown_without_misleading_rounding():
    from concilium.guard.service import usd

    assert usd(0) == "$0.00" and usd(5_000_000_000) == "$5.00" and usd(20_000_000) == "$0.02"
    assert usd(500_000) == "$0.0005" and usd(123_456) == "$0.0001235"
    assert usd(1_000_001, up=True) == "$0.001001" and usd(999_999) == "$0.001"


def test_denial_of_a_spent_budget_says_so():
    from concilium.guard.service import denied_error

    d = Denied("key:kim", "usd_per_day", 0.05, 3600.0)
    err = denied_error(d, {}, ScopeUsage(spent_day=50_000_000), need=1_000_000)
    assert "has spent its budget per day ($0.05 of $0.05)" in err.message and err.headers["retry-after"] == "3600"
