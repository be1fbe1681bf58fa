"""`concilium serve-model` as a real process on loopback, reached with the `openai` SDK: chat
completions streamed and not, usage, stop, max_tokens, seeds, errors, concurrent requests batched
together, and a client that goes away cancels its request."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request

import httpx
import openai
import pytest

from concilium.specialists.runtime.tokenizer import Tokenizer
from tests.support import ROOT, free_port, http_json, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-model") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "concilium.cli",
        "serve-model",
        "--model",
        "smollm2-135m-instruct",
        "--port",
        str(port),
        "--max-batch",
        "4",
        "--max-seq-len",
        "512",
        "--threads",
        "1",
        "--served-model-name",
        "smol",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_json("GET", base + "/health")[0] == 200, 180, "serve-model", proc, log)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    m = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_models_and_health(server):
    status, body = http_json("GET", server + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["smol"]
    assert http_json("GET", server + "/health")[1]["arch"] == "llama"


def test_chat_completion(server):
    r = _client(server).chat.completions.create(model="smol", messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 37 and 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_with_usage(server):
    chunks = list(
        _client(server).chat.completions.create(
            model="smol",
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    non_stream = _client(server).chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=24, temperature=0
    )
    assert text == non_stream.choices[0].message.content


def test_stop_max_tokens_and_seed(server):
    c = _client(server)
    r = c.chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=24, temperature=0, stop=["Paris"]
    )
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    r = c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    story = [{"role": "user", "content": "Tell me a short story."}]
    runs = [
        c.chat.completions.create(
            model="smol", messages=story, max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
        )
        .choices[0]
        .message.content
        for seed in (7, 7, 8)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_bad_requests_get_openai_errors(server):
    c = _client(server)
    for kwargs, param in [
        (dict(messages=[]), "messages"),
        (dict(messages=QUESTION, temperature=5), "temperature"),
        (dict(messages=QUESTION, n=2), "n"),
        (dict(messages=[{"role": "user", "content": "word " * 600}]), "messages"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="smol", max_tokens=4, **kwargs)
        assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    status, body = http_json("POST", server + "/v1/chat/completions", "not an object")
    assert status == 400 and "JSON object" in body["error"]["message"]


def test_concurrent_requests_share_the_batch(server):
    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
        prompts = ["Count from one to ten.", "List some fruits.", "Describe the sun.", "Say hello."]
        rs = await asyncio.gather(
            *[
                c.chat.completions.create(
                    model="smol", messages=[{"role": "user", "content": p}], max_tokens=40, temperature=0
                )
                for p in prompts
            ]
        )
        return [r.choices[0].message.content for r in rs]

    texts = asyncio.run(main())
    assert all(texts)
    assert _metric(server, "concilium_runtime_batch_size_max") >= 2


def test_client_disconnect_cancels_generation(server):
    before = _metric(server, "concilium_runtime_requests_cancelled_total")
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Write a very long essay."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break  # leave after a few events; the connection closes
    wait_until(
        lambda: _metric(server, "concilium_runtime_requests_cancelled_total") == before + 1,
        30,
        "cancellation",
    )
    wait_until(lambda: _metric(server, "concilium_runtime_kv_cache_slots_used") == 0, 30, "slot release")


def test_logprobs_logit_bias_and_unsupported_features(server, smollm2_path):
    c = _client(server)
    kw = dict(model="smol", messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob for t in content)
    chunks = list(c.chat.completions.create(**kw, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    (first,) = Tokenizer.from_checkpoint(smollm2_path).encode(content[0].token)
    banned = c.chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert banned.choices[0].message.content == content[0].top_logprobs[1].token  # the next most likely
    r = c.chat.completions.create(model="smol", max_tokens=48, temperature=0, response_format={"type": "json_object"},
                                  messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra, param in [
        (dict(tools=tools, tool_choice="required"), "tool_choice"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}), "response_format"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=4, **extra)
        assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_parameter"


def test_metrics_are_prometheus_exposition():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from concilium.specialists.runtime.server import RuntimeCollector

    class _Engine:
        def metrics(self):
            return {"kv_cache": {"tokens_used": 7, "tokens_capacity": 2048, "slots_used": 1}, "running": 1,
                    "waiting": 0, "generated_tokens": 12, "prefill_tokens": 37, "requests_finished": 3,
                    "requests_cancelled": 1, "max_batch_seen": 2, "expert_tokens": {0: [5, 3]}}

    registry = CollectorRegistry()
    registry.register(RuntimeCollector(_Engine(), "smol"))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    smol = (("model", "smol"),)
    assert samples[("concilium_runtime_kv_cache_tokens", smol)] == 7
    assert samples[("concilium_runtime_generated_tokens_total", smol)] == 12
    assert samples[("concilium_runtime_requests_cancelled_total", smol)] == 1
    assert samples[("concilium_runtime_batch_size_max", smol)] == 2
    assert samples[("concilium_runtime_expert_tokens_total", (("expert", "1"), ("layer", "0"), ("model", "smol")))] == 3
