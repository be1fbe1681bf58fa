"""The guard in a real gateway: keys, 401/403/429, /v1/usage, key files, privacy routing, logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from tests.guard.support import make_key, upstream_policy
from tests.support import ROOT, http_json, start_gateway

ALICE, ALICE_H = make_key()
BOB, BOB_H = make_key()
EVE, EVE_H = make_key()
DAVE, DAVE_H = make_key()

KEYS = f"""
keys:
  - name: alice
    hash: {ALICE_H}
    team: research
    budget: {{usd_per_day: 0.02}}
    rate: {{requests_per_min: 1000}}
  - name: bob
    hash: {BOB_H}
    models: [cheap]
    rate: {{requests_per_min: 2}}
  - name: eve
    hash: {EVE_H}
    disabled: true
  - name: dave
    hash: {DAVE_H}
  - team: research
    budget: {{usd_per_month: 100}}
"""
ROUTES = """
routes:
  - name: private
    match: {pii: true}
    targets: [private]
  - name: default
    targets: [cheap]
    fallbacks: [private]
"""
PRIVACY = "privacy: {on_pii: {allow_tags: [local]}}"


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    d = tmp_path_factory.mktemp("guard")
    g = start_gateway(upstream_policy(fake_upstream.url, KEYS + PRIVACY, ROUTES), d / "policy.yaml",
                      env={"CONCILIUM_KEYS_FILE": str(d / "keys.yaml")})
    yield g
    g.stop()


def get(gw, path: str, key: str | None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(gw.base_url + path, headers={"authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def ask(gw, key: str, model: str = "concilium/auto", text: str = "hello there", **kw):
    return gw.client(api_key=key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kw)


def test_authentication(gw, upstream):
    for key, words in ((None, "missing API key"), ("ck-not-a-key", "invalid API key"), (EVE, "disabled")):
        status, headers, body = get(gw, "/v1/models", key)
        assert status == 401 and words in body["error"]["message"]
        assert body["error"]["type"] == "authentication_error" and headers.get("www-authenticate") == "Bearer"
        assert len(headers.get("x-request-id", "")) == 32  # refused before any route, still traceable
    with pytest.raises(openai.AuthenticationError):
        ask(gw, "ck-wrong")
    assert upstream.stats()["requests"] == 0  # refused before any model was called
    assert get(gw, "/healthz", None)[0] == 200  # health and metrics stay open
    assert get(gw, "/v1/models", ALICE)[0] == 200


def test_model_access(gw, upstream):
    with pytest.raises(openai.PermissionDeniedError) as e:
        ask(gw, BOB)  # bob may only pin `cheap`
    assert "may not use model 'concilium/auto'" in e.value.message
    r = ask(gw, BOB, model="cheap", max_tokens=3)
    assert r.headers["x-concilium-model"] == "cheap"


def test_route_dry_run_obeys_the_keys_allow_list(gw, upstream):
    def dry_run(key, model):
        req = urllib.request.Request(gw.v1 + "/route", method="POST", headers={
            "authorization": f"Bearer {key}", "content-type": "application/json"},
            data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode())
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, body = dry_run(BOB, "concilium/auto")
    assert status == 403 and "may not use model 'concilium/auto'" in body["error"]["message"]
    status, plan = dry_run(BOB, "cheap")
    assert status == 200 and [c["model"] for c in plan["candidates"]] == ["cheap"]  # not the fallback
    status, plan = dry_run(DAVE, "cheap")  # pinned: no fallbacks unless asked for
    assert status == 200 and [c["model"] for c in plan["candidates"]] == ["cheap"]
    assert upstream.stats()["requests"] == 0


def test_rate_limit_answers_429_with_retry_after(gw, upstream):
    codes = []
    for _ in range(4):
        try:
            ask(gw, BOB, model="cheap", max_tokens=2)
            codes.append(200)
        except openai.RateLimitError as e:
            codes.append(429)
            assert e.response.headers["retry-after"].isdigit() and int(e.response.headers["retry-after"]) >= 1
            assert e.body["code"] == "rate_limit_exceeded" and "requests per minute (2)" in e.message
    assert codes[:1] == [200] and 429 in codes  # earlier tests may have used one of bob's 2/min


def test_budget_spend_and_usage(gw, upstream):
    # each answer: 5 completion tokens x $1000/M = $0.005; the day's budget of $0.02 buys exactly 4
    answered_by = []
    for _ in range(6):
        r = ask(gw, ALICE, max_tokens=5)
        assert r.parse().usage.completion_tokens == 5
        answered_by.append(r.headers["x-concilium-model"])
    assert answered_by == ["cheap"] * 4 + ["private"] * 2  # then only the free fallback is affordable
    with pytest.raises(openai.RateLimitError) as e:  # pinned to cheap: nothing else may answer
        ask(gw, ALICE, model="cheap", max_tokens=5)
    assert e.value.body["type"] == "insufficient_quota"
    assert "spent its budget per day ($0.02 of $0.02)" in e.value.message
    assert int(e.value.response.headers["retry-after"]) > 1
    status, _, usage = get(gw, "/v1/usage", ALICE)
    assert status == 200 and usage["key"] == "alice" and usage["team"] == "research"
    key_scope, team_scope = usage["scopes"]
    assert key_scope["spent_usd"]["day"] == pytest.approx(0.02) and key_scope["reserved_usd"] == 0
    assert key_scope["budget_usd"]["day"] == 0.02 and key_scope["rate"]["requests_per_min"] == 1000
    assert team_scope["scope"] == "team" and team_scope["spent_usd"]["month"] == pytest.approx(0.02)
    assert get(gw, "/v1/usage", BOB)[2]["key"] == "bob"  # a key sees only its own figures


def test_streams_settle_their_usage(fake_upstream, tmp_path):
    k, h = make_key()
    keys = f"keys:\n  - name: s\n    hash: {h}\n    budget: {{usd_per_day: 10}}\n"
    g = start_gateway(upstream_policy(fake_upstream.url, keys), tmp_path / "p.yaml")
    try:
        stream = g.client(api_key=k).chat.completions.create(
            model="cheap", messages=[{"role": "user", "content": "a b c"}], max_tokens=4, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text.startswith("a b c")
        # the client did not ask for usage, but the gateway read it: 4 tokens x $1000/M
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            scope = get(g, "/v1/usage", k)[2]["scopes"][0]
            if scope["reserved_usd"] == 0:
                break
        assert scope["spent_usd"]["day"] == pytest.approx(0.004) and scope["reserved_usd"] == 0
        # no max_tokens: a budgeted key's request is bounded so the reservation is a true maximum
        ask(g, k, model="cheap")
        assert fake_upstream.stats()["last_body"]["max_tokens"] == 4096
    finally:
        g.stop()


def test_key_file_keys_work_without_restart(gw, upstream):
    keys_file = gw.env["CONCILIUM_KEYS_FILE"]
    out = subprocess.run([sys.executable, "-m", "concilium.cli", "keys", "create", "--name", "carol",
                          "--models", "cheap", "--file", keys_file], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("ck-") and key not in open(keys_file).read()
    deadline = time.monotonic() + 15
    while get(gw, "/v1/models", key)[0] != 200:
        assert time.monotonic() < deadline, "the gateway did not pick up the new key"
    assert ask(gw, key, model="cheap", max_tokens=1).headers["x-concilium-model"] == "cheap"


def test_pii_prompts_stay_on_local_models(gw, upstream):
    r = ask(gw, DAVE, text="my card is 4111 1111 1111 1111", max_tokens=1)
    assert r.headers["x-concilium-model"] == "private" and r.headers["x-concilium-route"] == "private"
    # pinned to an external model: on_pii drops it, even though it is what the client asked for ...
    pii = [{"role": "user", "content": "mail me at a@example.com"}]
    plan = gw.client(api_key=DAVE).post("/route", cast_to=object, body={"model": "cheap", "messages": pii})
    assert plan["candidates"] == [] and any("PII" in s["reason"] for s in plan["skipped"])
    with pytest.raises(openai.APIStatusError) as e:  # ... so the request fails, naming the reason
        gw.client(api_key=DAVE).chat.completions.create(model="cheap", messages=pii, max_tokens=1)
    assert e.value.status_code == 503 and "PII" in e.value.message
    # with a fallback it asked for, the allowed model answers
    r = ask(gw, DAVE, model="cheap", text="mail me at a@example.com", max_tokens=1,
            extra_body={"fallbacks": ["private"]})
    assert r.headers["x-concilium-model"] == "private"
    clean = ask(gw, DAVE, text="what is 2+2", max_tokens=1)
    assert clean.headers["x-concilium-model"] == "cheap"


def test_prompts_and_keys_stay_out_of_logs(fake_upstream, tmp_path):
    secret = "sk-proj-Zq9" + "x" * 30
    g = start_gateway(upstream_policy(fake_upstream.url, "privacy: {log_prompts: true}"), tmp_path / "p.yaml",
                      extra_args=["--log-level", "info"])
    try:
        g.client().chat.completions.create(model="cheap", max_tokens=1, messages=[
            {"role": "user", "content": f"email bob@corp.example, key {secret}, topic: tulips"}])
    finally:
        g.stop()
    log = g.log.read_text()
    assert "topic: tulips" in log  # log_prompts is on: the prompt is logged ...
    assert "bob@corp.example" not in log and secret not in log  # ... with PII and secrets redacted
    assert "[REDACTED:email]" in log and "[REDACTED:api_key]" in log


def test_no_keys_means_no_authentication(fake_upstream, tmp_path):
    g = start_gateway(upstream_policy(fake_upstream.url), tmp_path / "p.yaml", extra_args=["--log-level", "info"])
    try:
        r = g.client(api_key="anything").chat.completions.create(
            model="cheap", max_tokens=1, messages=[{"role": "user", "content": "the secret word is tulips"}])
        assert r.choices[0].message.content
        status, body = http_json("GET", g.v1 + "/usage")
        assert status == 404 and "defines no keys" in body["error"]["message"]
    finally:
        g.stop()
    assert "tulips" not in g.log.read_text()  # prompts are not logged unless the policy says so


def test_a_model_over_its_cap_falls_back_to_the_next_candidate(upstream, tmp_path):
    k, h = make_key()
    extra = f"""
keys:
  - name: m
    hash: {h}
  - model: cheap
    budget: {{usd_per_day: 0.01}}
"""
    g = start_gateway(upstream_policy(upstream.url, extra), tmp_path / "p.yaml")
    try:
        answered = [ask(g, k, max_tokens=5).headers["x-concilium-model"] for _ in range(4)]
        usage = get(g, "/v1/usage", k)[2]
    finally:
        g.stop()
    assert answered == ["cheap", "cheap", "private", "private"]  # $0.005 each: two fit in cheap's $0.01
    (scope,) = usage["scopes"]
    assert scope["scope"] == "model" and scope["spent_usd"]["day"] == pytest.approx(0.01)
