"""Response headers carry any route or model name: x-concilium-* values are percent-encoded UTF-8
wherever they are not plain printable ASCII, and metrics count what the client actually got."""

from __future__ import annotations

import urllib.request
from urllib.parse import quote, unquote

import openai
import pytest

from tests.support import http_json

ROCKET = "défaut-🚀"  # not Latin-1: the old headers raised UnicodeEncodeError
CAFE = "café"  # Latin-1: the old headers sent a raw 0xE9 byte
MSG = [{"role": "user", "content": "hello there"}]


def policy(url: str) -> str:
    return f"""
version: 1
models:
  "{ROCKET}": {{provider: openai, base_url: "{url}", model: rocket}}
  "{CAFE}": {{provider: openai, base_url: "{url}", model: cafe}}
routes:
  - name: "{ROCKET} jobs"
    match: {{model: [concilium/jobs]}}
    targets: ["{ROCKET}"]
    mode: background
  - name: "{CAFE}"
    match: {{model: [concilium/cafe]}}
    targets: ["{CAFE}"]
  - name: "{ROCKET}"
    targets: ["{ROCKET}"]
router:
  virtual_models: [concilium/auto, concilium/cafe, concilium/jobs]
retry: {{attempts: 0, backoff_s: 0.01, backoff_max_s: 0.05}}
"""


@pytest.fixture
def gw(upstream, gateway_factory):
    return gateway_factory(policy(upstream.url))


def test_header_value_encoding():
    from concilium.gateway.headers import header_value

    assert header_value("gpt-4o-mini; route main: always") == "gpt-4o-mini; route main: always"
    assert header_value(ROCKET) == "d%C3%A9faut-%F0%9F%9A%80" == quote(ROCKET, safe="-")
    assert header_value("50%\r\nx-evil: 1") == "50%25%0D%0Ax-evil: 1"
    for name in (ROCKET, CAFE, "50% off", "tab\there"):
        assert unquote(header_value(name)) == name
        header_value(name).encode("ascii")


def metric(gw, needle: str) -> float:
    with urllib.request.urlopen(gw.base_url + "/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(needle):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_unicode_names_answer_with_encoded_headers(gw, upstream):
    client = gw.client()
    raw = client.chat.completions.with_raw_response.create(model="concilium/auto", messages=MSG)
    assert raw.status_code == 200 and raw.parse().choices[0].message.content
    assert unquote(raw.headers["x-concilium-model"]) == ROCKET
    assert unquote(raw.headers["x-concilium-route"]) == ROCKET
    assert f"route {ROCKET}" in unquote(raw.headers["x-concilium-reason"])  # the name, not '?' marks
    with client.chat.completions.with_streaming_response.create(model=ROCKET, messages=MSG, stream=True) as s:
        assert s.status_code == 200 and unquote(s.headers["x-concilium-model"]) == ROCKET
        assert "[DONE]" in "".join(s.iter_lines())
    raw = client.chat.completions.with_raw_response.create(model="concilium/cafe", messages=MSG)
    assert raw.headers["x-concilium-model"] == "caf%C3%A9" == raw.headers["x-concilium-route"]
    status, plan = gw.post("/v1/route", {"model": "concilium/auto", "messages": MSG})
    assert status == 200 and plan["route"] == ROCKET  # JSON bodies keep the names as they are
    ok = f'concilium_requests_total{{model="{ROCKET}",route="{ROCKET}",status="ok"}}'
    assert metric(gw, ok) == 1.0


def test_failures_with_unicode_names_are_errors_not_500s(gw, upstream):
    upstream.default("rocket", {"status": 500})
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(model="concilium/auto", messages=MSG)
    assert e.value.status_code == 502 and e.value.body["code"] == "all_candidates_failed"
    assert unquote(e.value.response.headers["x-concilium-route"]) == ROCKET
    assert metric(gw, f'concilium_requests_total{{model="{ROCKET}",route="{ROCKET}",status="error"}}') == 1.0
    assert metric(gw, f'concilium_requests_total{{model="{ROCKET}",route="{ROCKET}",status="ok"}}') == 0.0
    assert http_json("GET", gw.base_url + "/healthz")[0] == 200


def test_a_job_diverted_chat_with_a_unicode_model_answers(gw, upstream):
    raw = gw.client().chat.completions.with_raw_response.create(model="concilium/jobs", messages=MSG)
    assert raw.status_code == 200 and raw.parse().choices[0].message.content
    assert unquote(raw.headers["x-concilium-model"]) == ROCKET
    assert unquote(raw.headers["x-concilium-route"]) == f"{ROCKET} jobs"
