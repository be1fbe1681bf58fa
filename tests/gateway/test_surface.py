"""The HTTP surface around the chat route: request ids on every response, the model endpoint, the
OpenAPI document, readiness, the access log and the operational metrics."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.gateway.policies import two_models

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(two_models(upstream.url).replace("retry: {", "limits: {max_body_bytes: 20000}\nretry: {"))


def call(gw, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers with lower-case names, raw body) of any request, errors included."""
    req = urllib.request.Request(gw.base_url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


JSON = {"content-type": "application/json"}
CHAT = json.dumps({"model": "concilium/auto", "messages": MSG}).encode()
REQUESTS = [  # (method, path, body, headers, expected status)
    ("GET", "/healthz", None, {}, 200),
    ("GET", "/readyz", None, {}, 200),
    ("GET", "/metrics", None, {}, 200),
    ("GET", "/v1/models", None, {}, 200),
    ("POST", "/v1/route", CHAT, JSON, 200),
    ("POST", "/v1/chat/completions", CHAT, JSON, 200),
    ("POST", "/v1/chat/completions", b"{nope", JSON, 400),
    ("POST", "/v1/chat/completions", b'{"model": "concilium/auto"}', JSON, 400),
    ("POST", "/v1/chat/completions", CHAT, {"content-type": "text/plain"}, 415),
    ("POST", "/v1/chat/completions", b"x" * 30000, JSON, 413),
    ("POST", "/v1/chat/completions", json.dumps({"model": "gpt-17", "messages": MSG}).encode(), JSON, 404),
    ("GET", "/v1/chat/completions", None, {}, 405),
    ("GET", "/nope", None, {}, 404),
    ("POST", "/v1/route", b"[]", JSON, 400),
    ("GET", "/v1/responses/resp_missing", None, {}, 404),
]


def test_every_response_carries_the_request_id(gw):
    for method, path, body, headers, status in REQUESTS:
        got, h, raw = call(gw, method, path, body, {**headers, "x-request-id": "trace-42_a"})
        assert got == status, (method, path, raw)
        assert h.get("x-request-id") == "trace-42_a", (method, path, h)
        got, h, raw = call(gw, method, path, body, headers)  # none sent: the gateway makes one
        assert got == status and len(h.get("x-request-id", "")) == 32, (method, path, h)
        got, h, raw = call(gw, method, path, body, {**headers, "x-request-id": "bad id\t!"})
        assert got == status and len(h.get("x-request-id", "")) == 32, (method, path, h)
    _, h, raw = call(gw, "POST", "/v1/route", CHAT, JSON)  # the plan's id is the one in the header
    assert json.loads(raw)["request_id"] == h["x-request-id"]
    for path in ("/v1/chat/completions", "/v1/route", "/nope"):
        req = urllib.request.Request(gw.base_url + path, data=CHAT, headers={**JSON, "x-request-id": "abc"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                sent = r.headers.get_all("x-request-id")
        except urllib.error.HTTPError as e:
            sent = e.headers.get_all("x-request-id")
        assert sent == ["abc"], path  # once, never twice


def test_retrieve_a_model(gw):
    import openai

    client = gw.client()
    m = client.models.retrieve("backup")
    assert (m.id, m.object, m.owned_by) == ("backup", "model", "openai") and isinstance(m.created, int)
    assert client.models.retrieve("concilium/auto").owned_by == "concilium"  # virtual models too
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-17")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert "gpt-17" in e.value.message
    listed = {m.id: m.model_dump() for m in client.models.list().data}
    assert client.models.retrieve("keyed").model_dump() == listed["keyed"]  # one shape in both


def test_the_openapi_document_describes_what_the_gateway_does(gw):
    status, _, raw = call(gw, "GET", "/openapi.json")
    assert status == 200
    doc = json.loads(raw)
    paths = doc["paths"]
    for path, method in (("/v1/responses", "post"), ("/v1/feedback", "post")):
        schema = paths[path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert schema["type"] == "object" and "$ref" not in json.dumps(schema), path
    assert {"model", "input", "background", "stream"} <= set(paths["/v1/responses"]["post"]["requestBody"]
                                                              ["content"]["application/json"]["schema"]["properties"])
    feedback = paths["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(feedback["required"]) == {"request_id", "score"}
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "application/json" not in metrics and any(c.startswith("text/plain") for c in metrics)
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "202", "400", "401", "404", "413", "415", "429", "502", "503", "504"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]
    error = chat["429"]["content"]["application/json"]["schema"]
    assert set(error["properties"]["error"]["properties"]) == {"message", "type", "code", "param"}
    for path, item in paths.items():  # every operation documents its errors
        for method, op in item.items():
            assert {"4XX", "5XX"} <= set(op["responses"]), (method, path)


def test_405_names_the_allowed_methods(gw):
    status, h, raw = call(gw, "GET", "/v1/chat/completions")
    assert status == 405 and h["allow"] == "POST"
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    status, h, _ = call(gw, "DELETE", "/v1/models")
    assert status == 405 and h["allow"] == "GET"


def test_readiness_reports_a_broken_policy_on_disk_and_a_failed_model_load(gw, tmp_path):
    from tests.support import wait_until

    good = gw.policy_path.read_text()
    gw.policy_path.write_text(good.replace("routes:", "routes: [oops"))
    wait_until(lambda: json.loads(call(gw, "GET", "/readyz")[2]).get("policy_error"), 15, "reload refused")
    status, _, raw = call(gw, "GET", "/readyz")
    body = json.loads(raw)
    assert status == 200 and body["ready"]  # the running policy still serves: not a reason to drop traffic
    assert str(gw.policy_path) in body["policy_error"] and body["policy_version"] == 1
    gw.policy_path.write_text(good)  # fixed: the report goes away
    wait_until(lambda: "policy_error" not in json.loads(call(gw, "GET", "/readyz")[2]), 15, "reload")

    weights = tmp_path / "broken.gguf"
    weights.write_bytes(b"this is not a GGUF file")
    gw.policy_path.write_text(good.replace("models:\n", f"models:\n  broken:\n    provider: local\n"
                                                       f"    model: \"{weights}\"\n", 1))
    wait_until(lambda: call(gw, "GET", "/readyz")[0] == 503, 60, "a failed model load")
    body = json.loads(call(gw, "GET", "/readyz")[2])
    assert body["ready"] is False and list(body["failed"]) == ["broken"] and body["failed"]["broken"]
    assert "broken" not in body["loading"]


def test_one_access_log_line_per_request_without_the_prompt(upstream, tmp_path):
    from concilium.guard.keys import hash_key, new_key
    from tests.support import start_gateway

    key = new_key()
    policy = two_models(upstream.url) + f"keys:\n  - name: alice\n    hash: {hash_key(key)}\n"
    gw = start_gateway(policy, tmp_path / "p.yaml", extra_args=["--log-level", "info"])
    try:
        client = gw.client(api_key=key)
        client.chat.completions.create(model="concilium/auto", extra_headers={"x-request-id": "acc-1"},
                                       messages=[{"role": "user", "content": "the secret word is tulips"}])
        list(client.chat.completions.create(model="concilium/auto", stream=True, extra_headers={
            "x-request-id": "acc-2"}, messages=[{"role": "user", "content": "tulips again"}]))
        call(gw, "GET", "/v1/models", headers={"x-request-id": "acc-3"})  # no key: 401
        status, _, _ = call(gw, "GET", "/healthz", headers={"x-request-id": "acc-4"})
    finally:
        gw.stop()
    lines = [line for line in gw.log.read_text().splitlines() if "concilium.access" in line]
    by_id = {}
    for line in lines:
        fields = dict(f.split("=", 1) for f in line.split("concilium.access: ", 1)[1].split())
        by_id.setdefault(fields["id"], []).append(fields)
    assert all(len(v) == 1 for v in by_id.values()), by_id  # one line per request
    ok = by_id["acc-1"][0]
    assert (ok["key"], ok["model"], ok["route"], ok["status"], ok["method"], ok["path"]) == (
        "alice", "primary", "main", "200", "POST", "/v1/chat/completions")
    assert float(ok["latency_ms"]) > 0 and float(ok["cost_usd"]) > 0
    streamed = by_id["acc-2"][0]
    assert streamed["status"] == "200" and streamed["model"] == "primary" and float(streamed["cost_usd"]) > 0
    refused = by_id["acc-3"][0]
    assert refused["status"] == "401" and refused["key"] == "-" and refused["model"] == "-"
    assert by_id["acc-4"][0]["status"] == "200"
    assert "tulips" not in gw.log.read_text()  # never the prompt


def metric_lines(gw) -> list[str]:
    return call(gw, "GET", "/metrics")[2].decode().splitlines()


def test_rejections_breaker_state_and_spend_per_key_are_metrics(upstream, tmp_path):
    from concilium.guard.keys import hash_key, new_key
    from tests.support import start_gateway

    alice, bob = new_key(), new_key()
    policy = two_models(upstream.url, failures=1) + (
        f"keys:\n  - name: alice\n    hash: {hash_key(alice)}\n"
        f"  - name: bob\n    hash: {hash_key(bob)}\n    models: [backup]\n    rate: {{requests_per_min: 1}}\n")
    gw = start_gateway(policy, tmp_path / "p.yaml")
    try:
        call(gw, "GET", "/v1/models")  # 401: no key
        call(gw, "GET", "/v1/models", headers={"authorization": "Bearer ck-wrong"})  # 401
        auth = {"authorization": f"Bearer {bob}", **JSON}
        assert call(gw, "POST", "/v1/chat/completions", CHAT, auth)[0] == 403  # bob may not ask for concilium/auto
        pinned = json.dumps({"model": "backup", "messages": MSG}).encode()
        assert call(gw, "POST", "/v1/chat/completions", pinned, auth)[0] == 200
        assert call(gw, "POST", "/v1/chat/completions", pinned, auth)[0] == 429  # one request a minute
        upstream.default("primary", {"status": 500})
        gw.client(api_key=alice).chat.completions.create(model="concilium/auto", messages=MSG)  # backup answers
        lines = metric_lines(gw)
    finally:
        gw.stop()

    def value(prefix: str) -> float:
        found = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix)]
        assert found, (prefix, [line for line in lines if "concilium_" in line and not line.startswith("#")])
        return sum(found)

    assert value('concilium_rejected_requests_total{code="missing_api_key",status="401"}') == 1
    assert value('concilium_rejected_requests_total{code="invalid_api_key",status="401"}') == 1
    assert value('concilium_rejected_requests_total{code="model_not_allowed",status="403"}') == 1
    assert value('concilium_rejected_requests_total{code="rate_limit_exceeded",status="429"}') == 1
    assert value('concilium_circuit_open{model="primary"}') == 1  # opened after its one failure
    assert value('concilium_circuit_open{model="backup"}') == 0
    assert value('concilium_key_spend_usd_total{key="alice"}') > 0
    assert value('concilium_key_spend_usd_total{key="bob"}') > 0


def test_feedback_needs_a_request_the_caller_made(upstream, tmp_path):
    from concilium.guard.keys import hash_key, new_key
    from tests.support import start_gateway

    alice, bob = new_key(), new_key()
    policy = two_models(upstream.url) + (f"keys:\n  - name: alice\n    hash: {hash_key(alice)}\n"
                                         f"  - name: bob\n    hash: {hash_key(bob)}\n")
    gw = start_gateway(policy, tmp_path / "p.yaml")
    try:
        def feedback(key: str, rid: str):
            status, _, raw = call(gw, "POST", "/v1/feedback", json.dumps({"request_id": rid, "score": 1}).encode(),
                                  {"authorization": f"Bearer {key}", **JSON})
            return status, json.loads(raw)

        status, body = feedback(alice, "never-made")
        assert status == 404 and body["error"]["param"] == "request_id" and "never-made" in body["error"]["message"]
        raw = gw.client(api_key=alice).chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG)
        rid = raw.headers["x-request-id"]
        assert feedback(bob, rid)[0] == 404  # another key's request: as if it did not exist
        status, body = feedback(alice, rid)
        assert status == 200 and body["request_id"] == rid
        dry = call(gw, "POST", "/v1/route", CHAT, {"authorization": f"Bearer {alice}", **JSON})[1]["x-request-id"]
        assert feedback(alice, dry)[0] == 404  # a dry run answered nothing
    finally:
        gw.stop()
