"""The admin API (`/v1/admin/...`) through a real gateway on the fake upstream: the shapes the console
reads, and who may read them (an `admin: true` key once the policy has keys; anyone without keys)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from concilium.guard.keys import hash_key, new_key
from concilium.policy.keys import parse_keys
from concilium.policy.loader import PolicyError

ADMIN, USER = new_key(), new_key()


def policy(url: str, keys: str = "", learned: bool = False) -> str:
    """Two priced models; a cascade on `concilium/cascade`, the strong model otherwise."""
    return f"""
version: 1
models:
  cheap: {{provider: openai, base_url: "{url}", model: cheap-up, price: {{input: 1.0, output: 2.0}}}}
  strong: {{provider: openai, base_url: "{url}", model: strong-up, price: {{input: 10.0, output: 20.0}}}}
router: {{virtual_models: [concilium/auto, concilium/cascade], learned: {str(learned).lower()}}}
routes:
  - name: cascade
    match: {{model: [concilium/cascade]}}
    targets: [strong]
    strategy: cascade
    cascade: {{drafts: [cheap], scorer: verifier-rules, threshold: 0.5}}
  - name: main
    targets: [strong]
    fallbacks: [cheap]
retry: {{attempts: 0}}
{keys}
"""


KEYS = f"""keys:
  - name: root
    hash: {hash_key(ADMIN)}
    admin: true
  - name: alice
    hash: {hash_key(USER)}
    team: research
    budget: {{usd_per_day: 1.0, usd_per_month: 10.0}}
  - team: research
    budget: {{usd_per_month: 50.0}}
"""


def call(gw, method: str, path: str, key: str | None = None, body: dict | None = None,
         headers: dict | None = None) -> tuple[int, dict | bytes, dict]:
    hdrs = {"content-type": "application/json", **(headers or {})}
    if key:
        hdrs["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(gw.base_url + path, method=method, headers=hdrs,
                                 data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            raw, status, h = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        raw, status, h = e.read(), e.code, dict(e.headers)
    try:
        return status, json.loads(raw), h
    except ValueError:
        return status, raw, h


def chat(gw, key: str | None, model: str = "concilium/auto", text: str = "hello there") -> tuple[int, dict, dict]:
    return call(gw, "POST", "/v1/chat/completions", key, {"model": model, "messages": [{"role": "user", "content": text}]})


@pytest.fixture(scope="module")
def keyed(fake_upstream, tmp_path_factory):
    from tests.support import start_gateway

    g = start_gateway(policy(fake_upstream.url, KEYS), tmp_path_factory.mktemp("admin") / "p.yaml")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def open_gw(fake_upstream, tmp_path_factory):
    from tests.support import start_gateway

    g = start_gateway(policy(fake_upstream.url), tmp_path_factory.mktemp("admin-open") / "p.yaml")
    yield g
    g.stop()


ENDPOINTS = ["/v1/admin/traffic", "/v1/admin/spend", "/v1/admin/policy", "/v1/admin/jobs", "/v1/admin/requests",
             "/v1/admin/whoami"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_the_admin_api_needs_an_admin_key(keyed, path):
    status, body, headers = call(keyed, "GET", path)
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    status, body, _ = call(keyed, "GET", path, USER)
    assert status == 403 and body["error"]["code"] == "admin_required"
    status, body, _ = call(keyed, "GET", path, ADMIN)
    assert status == 200, body


def test_the_console_page_needs_an_admin_cookie(keyed):
    status, page, headers = call(keyed, "GET", "/console")
    assert status == 401 and b"Sign in" in page and b"/console/app.js" not in page  # the login form only
    assert call(keyed, "GET", "/console/app.js")[0] == 401
    assert call(keyed, "GET", "/console/login.js")[0] == 200  # the login form's own script
    status, page, _ = call(keyed, "GET", "/console", headers={"cookie": f"concilium_admin={USER}"})
    assert status == 403 and b"Sign in" in page
    status, page, headers = call(keyed, "GET", "/console", headers={"cookie": f"concilium_admin={ADMIN}"})
    assert status == 200 and b"/console/app.js" in page
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert call(keyed, "GET", "/console/app.js", headers={"cookie": f"concilium_admin={ADMIN}"})[0] == 200
    assert call(keyed, "GET", "/console/..%2Fadmin.py", headers={"cookie": f"concilium_admin={ADMIN}"})[0] == 404


def test_without_keys_everything_is_open(open_gw):
    assert call(open_gw, "GET", "/console")[0] == 200
    status, body, _ = call(open_gw, "GET", "/v1/admin/whoami")
    assert status == 200 and body == {"key": None, "admin": True, "keys_enforced": False}
    status, body, _ = call(open_gw, "GET", "/v1/admin/spend")
    assert status == 200 and body["keys"] == []


def test_traffic_and_last_requests_after_requests(keyed, upstream):
    for _ in range(3):
        assert chat(keyed, USER)[0] == 200
    status, _, headers = chat(keyed, USER, "concilium/cascade", "Add them: 2 + 2 = 5 so the answer is #### 5")
    assert status == 200 and headers["x-concilium-model"] == "strong"  # the draft was rejected: escalated
    status, t, _ = call(keyed, "GET", "/v1/admin/traffic", ADMIN)
    assert status == 200 and t["requests_total"] >= 4 and t["requests_per_s"] > 0
    strong = t["models"]["strong"]
    assert strong["requests"] >= 4 and 0 < strong["share"] <= 1
    assert 0 < strong["latency_s"]["p50"] <= strong["latency_s"]["p99"]
    assert set(t["routes"]) >= {"main", "cascade"}
    assert t["circuits"]["cheap"] == {"open": False, "open_for_s": 0.0, "failures": 0, "unavailable": None}
    cascade = next(c for c in t["cascade"] if c["route"] == "cascade")
    assert cascade["drafts"]["escalated"] >= 1 and cascade["escalation_rate"] > 0

    status, last, _ = call(keyed, "GET", "/v1/admin/requests?limit=2", ADMIN)
    assert status == 200 and len(last["data"]) == 2
    newest = last["data"][0]
    assert set(newest) == {"time", "id", "path", "status", "key", "model", "route", "latency_s", "cost_usd"}
    assert (newest["path"], newest["status"], newest["key"], newest["model"], newest["route"]) == (
        "/v1/chat/completions", 200, "alice", "strong", "cascade")
    assert newest["cost_usd"] > 0 and "hello" not in json.dumps(last)  # no prompt text
    status, one, _ = call(keyed, "GET", f"/v1/admin/requests?id={newest['id']}", ADMIN)
    assert [e["id"] for e in one["data"]] == [newest["id"]]


def test_spend_per_key_team_and_model(keyed, upstream):
    def alice(body):
        return next(k for k in body["keys"] if k["key"] == "alice")

    before = call(keyed, "GET", "/v1/admin/spend", ADMIN)[1]
    assert chat(keyed, USER)[0] == 200
    status, after, _ = call(keyed, "GET", "/v1/admin/spend", ADMIN)
    assert status == 200
    spent = alice(after)["scopes"][0]["spent_usd"]["day"] - alice(before)["scopes"][0]["spent_usd"]["day"]
    assert spent > 0
    assert alice(after)["scopes"][0]["budget_usd"] == {"day": 1.0, "month": 10.0}
    assert alice(after)["spent_since_start_usd"] > alice(before)["spent_since_start_usd"]
    root = next(k for k in after["keys"] if k["key"] == "root")
    assert root["admin"] is True and root["scopes"] == []  # no limits: nothing kept per day
    (team,) = after["teams"]
    assert team["id"] == "research" and team["budget_usd"] == {"day": None, "month": 50.0}
    assert {m["model"] for m in after["models"]} >= {"strong"}


def test_policy_and_router(keyed):
    status, p, _ = call(keyed, "GET", "/v1/admin/policy", ADMIN)
    assert status == 200 and p["version"] >= 1 and p["load_error"] is None and p["keys"] == 2
    assert p["models"] == ["cheap", "strong"] and p["routes"] == ["cascade", "main"]
    assert p["router"]["learned"] is False and p["router"]["artifact"] is None
    for url in p["router"]["curves"]:
        status, png, headers = call(keyed, "GET", url, ADMIN)
        assert status == 200 and headers["content-type"] == "image/png" and png[:4] == b"\x89PNG"
    assert call(keyed, "GET", "/v1/admin/router/curves/nope.png", ADMIN)[0] == 404


def test_a_refused_reload_is_shown(open_gw):
    from tests.support import wait_until

    good = open_gw.policy_path.read_text()
    try:
        open_gw.policy_path.write_text(good + "\nnot_a_section: 1\n")
        wait_until(lambda: call(open_gw, "GET", "/v1/admin/policy")[1]["load_error"], 20, "refused reload")
    finally:
        open_gw.policy_path.write_text(good)
    wait_until(lambda: call(open_gw, "GET", "/v1/admin/policy")[1]["load_error"] is None, 20, "reload")


def test_jobs_listing_and_one_job(open_gw):
    status, body, _ = call(open_gw, "POST", "/v1/responses", None,
                           {"model": "concilium/auto", "input": "hello", "background": True})
    assert status == 200, body
    job_id = body["id"]
    from tests.support import wait_until

    wait_until(lambda: call(open_gw, "GET", f"/v1/admin/jobs/{job_id}")[1]["status"] == "completed", 30, "job")
    status, one, _ = call(open_gw, "GET", f"/v1/admin/jobs/{job_id}")
    assert one["events_list"][0]["seq"] == 0 and all(set(e) == {"seq", "type"} for e in one["events_list"])
    assert "hello" not in json.dumps(one)
    status, jobs, _ = call(open_gw, "GET", "/v1/admin/jobs")
    assert status == 200 and job_id in [j["id"] for j in jobs["ended"]]
    assert "listing" in jobs and isinstance(jobs["submitted"], list)
    assert call(open_gw, "GET", "/v1/admin/jobs/resp_nope")[0] == 404


def test_the_admin_flag_is_a_strict_boolean():
    h = hash_key(new_key())
    assert parse_keys([{"name": "a", "hash": h, "admin": True}], "k.yaml").keys[0].admin is True
    assert parse_keys([{"name": "a", "hash": h}], "k.yaml").keys[0].admin is False
    with pytest.raises(PolicyError, match=r"keys\[0\]\.admin"):
        parse_keys([{"name": "a", "hash": h, "admin": "yes"}], "k.yaml")
