"""Malformed, huge and deeply nested JSON, invalid UTF-8 and wrong types get a 4xx with a clear
OpenAI-shaped message, and the gateway keeps serving (with and without keys)."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.guard.support import make_key, upstream_policy
from tests.support import start_gateway

KEY, KEY_H = make_key()


@pytest.fixture(scope="module", params=["open", "keys"])
def gw(request, fake_upstream, tmp_path_factory):
    extra = "limits: {max_body_bytes: 65536}\n"
    if request.param == "keys":
        extra += f"keys:\n  - name: k\n    hash: {KEY_H}\n    rate: {{requests_per_min: 100000}}\n"
    g = start_gateway(upstream_policy(fake_upstream.url, extra), tmp_path_factory.mktemp("hostile") / "p.yaml")
    yield g
    g.stop()


def send(gw, body: bytes, content_type: str = "application/json", path: str = "/v1/chat/completions",
         chunked: bool = False) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    headers = {"content-type": content_type, "authorization": f"Bearer {KEY}"}
    if chunked:
        conn.putrequest("POST", path)
        for k, v in {**headers, "transfer-encoding": "chunked"}.items():
            conn.putheader(k, v)
        conn.endheaders()
        for i in range(0, len(body), 16384):
            piece = body[i:i + 16384]
            try:
                conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
    else:
        conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw)


GOOD = {"model": "cheap", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
CASES = [
    ("not json", b"{model: cheap", 400, "could not parse the JSON body"),
    ("empty", b"", 400, "body is empty"),
    ("array", b"[1, 2]", 400, "expected a JSON object"),
    ("invalid utf-8", b'{"model": "cheap", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400,
     "could not parse the JSON body"),
    ("lone surrogate", b'{"model": "cheap", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "could not parse the JSON body"),
    ("nan", b'{"model": "cheap", "temperature": NaN, "messages": []}', 400, "could not parse"),
    ("deep nesting", b'{"model": "cheap", "metadata": ' + b'{"a": ' * 5000 + b'1' + b'}' * 5001, 400,
     "could not parse"),
    ("nested just under the parser limit", json.dumps({**GOOD, "metadata": json.loads(
        '{"a": ' * 500 + '1' + '}' * 500)}).encode(), 200, None),
    ("messages is a string", json.dumps({**GOOD, "messages": "hi"}).encode(), 400, "messages"),
    ("max_tokens is a string", json.dumps({**GOOD, "max_tokens": "many"}).encode(), 400, "max_tokens"),
    ("huge max_tokens", json.dumps({**GOOD, "max_tokens": 10**30}).encode(), 400, "max_tokens"),
    ("unknown role", json.dumps({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
     "messages.0.role"),
    ("model is a number", json.dumps({**GOOD, "model": 5}).encode(), 400, "model"),
    ("unknown model", json.dumps({**GOOD, "model": "nope"}).encode(), 404, "does not exist"),
    ("null bytes", json.dumps({**GOOD, "messages": [{"role": "user", "content": "a\u0000b"}]}).encode(), 200,
     None),
    ("too large", json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 70000}]}).encode(), 413,
     "larger than the limit"),
]


@pytest.mark.parametrize("name,body,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_bodies_get_clear_4xx(gw, name, body, status, words):
    got, payload = send(gw, body)
    assert got == status, payload
    if words is not None:
        err = payload["error"]
        assert words in err["message"] and err["type"] and "code" in err


def test_chunked_body_over_the_limit_is_refused(gw):
    status, payload = send(gw, b'{"model": "cheap", "pad": "' + b"x" * 200_000 + b'"}', chunked=True)
    assert status == 413 and "larger than the limit" in payload["error"]["message"]


def test_wrong_content_type(gw):
    status, payload = send(gw, json.dumps(GOOD).encode(), content_type="text/plain")
    assert status == 415 and "application/json" in payload["error"]["message"]


def test_route_endpoint_too(gw):
    status, payload = send(gw, b'{"model": ', path="/v1/route")
    assert status == 400 and "could not parse" in payload["error"]["message"]


def test_still_serving_afterwards(gw):
    status, payload = send(gw, json.dumps(GOOD).encode())
    assert status == 200 and payload["choices"][0]["message"]["content"]
    assert "unhandled error" not in gw.log.read_text()
