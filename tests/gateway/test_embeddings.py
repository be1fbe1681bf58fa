"""POST /v1/embeddings through the openai SDK: OpenAI-compatible upstreams (native client and
litellm) on the fake upstream, the local all-MiniLM model, keys, budgets, metrics and errors."""

from __future__ import annotations

import base64
import json
import urllib.request

import numpy as np
import openai
import pytest

from concilium.testing.fake_upstream import fake_vector
from tests.guard.support import make_key
from tests.support import start_gateway


def policy(url: str, extra: str = "") -> str:
    return f"""
version: 1
models:
  chat: {{provider: openai, base_url: "{url}", model: chat}}
  emb: {{provider: openai, base_url: "{url}", model: emb, kind: embedding, price: {{input: 1000}}}}
  emb-litellm: {{provider: litellm, model: openai/emb-l, base_url: "{url}", api_key_env: FAKE_EMB_KEY,
                 kind: embedding}}
  emb-keyed: {{provider: openai, base_url: "{url}", model: emb-k, kind: embedding,
               api_key_env: CONCILIUM_TEST_MISSING_KEY}}
routes:
  - name: main
    targets: [chat]
aliases: {{text-embedding-3-small: emb}}
retry: {{attempts: 1, backoff_s: 0.01, backoff_max_s: 0.05}}
{extra}
"""


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    g = start_gateway(policy(fake_upstream.url), tmp_path_factory.mktemp("emb") / "policy.yaml",
                      env={"FAKE_EMB_KEY": "sk-fake"})
    yield g
    g.stop()


def post(gw, body) -> tuple[int, dict]:
    req = urllib.request.Request(gw.v1 + "/embeddings", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_float_and_base64_batches(gw, upstream):
    c = gw.client()
    r = c.embeddings.with_raw_response.create(model="emb", input=["a b", "c"], encoding_format="float")
    out = r.parse()
    assert r.headers["x-concilium-model"] == "emb"
    assert [d.index for d in out.data] == [0, 1]
    assert np.allclose(out.data[0].embedding, fake_vector("a b", 8), atol=1e-6)
    assert np.allclose(out.data[1].embedding, fake_vector("c", 8), atol=1e-6)
    assert out.usage.prompt_tokens == 3 and out.usage.total_tokens == 3
    assert upstream.stats()["last_body"] == {"model": "emb", "input": ["a b", "c"], "encoding_format": "float"}

    sdk_default = c.embeddings.create(model="emb", input="a b", dimensions=5)  # the SDK asks for base64
    assert upstream.stats()["last_body"]["encoding_format"] == "base64"
    assert np.allclose(sdk_default.data[0].embedding, fake_vector("a b", 5), atol=1e-6)

    status, body = post(gw, {"model": "emb", "input": [[1, 2, 3]], "encoding_format": "base64"})
    assert status == 200 and isinstance(body["data"][0]["embedding"], str)
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, fake_vector("1 2 3", 8), atol=1e-6)


def test_the_gateway_converts_what_an_upstream_sent_to_what_the_client_asked(gw, upstream):
    # litellm (the openai SDK inside it) asks its upstream for base64 or float as it likes; the client
    # gets floats when it asks for floats, base64 when it asks for base64
    c = gw.client()
    out = c.embeddings.create(model="emb-litellm", input=["x y"], encoding_format="float")
    assert np.allclose(out.data[0].embedding, fake_vector("x y", 8), atol=1e-6)
    assert upstream.stats()["by_model"] == {"emb-l": 1}
    status, body = post(gw, {"model": "emb-litellm", "input": "x y", "encoding_format": "base64"})
    assert status == 200
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(vec, fake_vector("x y", 8), atol=1e-6)


def test_an_alias_names_an_embedding_model(gw, upstream):
    out = gw.client().embeddings.with_raw_response.create(model="text-embedding-3-small", input="hi",
                                                          encoding_format="float")
    assert out.headers["x-concilium-model"] == "emb" and upstream.stats()["by_model"] == {"emb": 1}
    cards = {m["id"]: m for m in gw.get("/v1/models")[1]["data"]}
    assert cards["emb"]["kind"] == "embedding" and cards["text-embedding-3-small"]["alias_for"] == "emb"
    assert cards["text-embedding-3-small"]["kind"] == "embedding" and "kind" not in cards["chat"]


def test_errors(gw, upstream):
    c = gw.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="chat", input="hi")
    assert "is a chat model" in e.value.message and "emb, emb-keyed, emb-litellm" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.embeddings.create(model="concilium/auto", input="hi")
    assert "virtual model" in e.value.message
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="emb", messages=[{"role": "user", "content": "hi"}])
    assert "embedding model" in e.value.message
    for bad, param in (({"input": []}, "input"), ({"input": ""}, "input"), ({"encoding_format": "hex"}, "encoding_format"),
                       ({"dimensions": 0}, "dimensions"), ({"input": None}, "input")):
        status, body = post(gw, {"model": "emb", "input": "hi", **bad})
        assert status == 400 and body["error"]["param"].startswith(param), body
    status, body = post(gw, {"model": "emb-keyed", "input": "hi"})
    assert status == 503 and body["error"]["code"] == "model_unavailable"
    assert "CONCILIUM_TEST_MISSING_KEY is not set" in body["error"]["message"]
    upstream.default("emb", {"status": 500})
    with pytest.raises(openai.InternalServerError) as e:
        c.embeddings.create(model="emb", input="hi")
    assert e.value.status_code == 502 and upstream.stats()["by_model"]["emb"] == 2  # one retry, no fallback
    upstream.default("emb", {"status": 400})
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="emb", input="hi")


def test_metrics_count_embedding_requests_and_tokens(gw, upstream):
    gw.client().embeddings.create(model="emb", input=["one two three four"])
    with urllib.request.urlopen(gw.base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'concilium_requests_total{model="emb",route="pinned",status="ok"}' in text
    assert 'concilium_tokens_total{kind="prompt",model="emb",route="pinned"}' in text


KEY, KEY_H = make_key()


def test_keys_and_budgets_apply(fake_upstream, tmp_path):
    keys = f"""
keys:
  - name: alice
    hash: {KEY_H}
    models: [emb]
    budget: {{usd_per_day: 1.0}}
"""
    g = start_gateway(policy(fake_upstream.url, keys), tmp_path / "policy.yaml", env={"FAKE_EMB_KEY": "sk-fake"})
    try:
        with pytest.raises(openai.AuthenticationError):
            g.client(api_key="sk-wrong").embeddings.create(model="emb", input="hi")
        with pytest.raises(openai.PermissionDeniedError):
            g.client(api_key=KEY).embeddings.create(model="emb-litellm", input="hi")
        out = g.client(api_key=KEY).embeddings.create(model="emb", input=["a b", "c"])
        assert out.usage.prompt_tokens == 3
        req = urllib.request.Request(g.v1 + "/usage", headers={"authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            scope = json.loads(r.read())["scopes"][0]
        # 3 prompt tokens at $1000 per million: $0.003, settled once, nothing left reserved
        assert scope["spent_usd"]["day"] == pytest.approx(0.003) and scope["reserved_usd"] == 0
    finally:
        g.stop()


def test_the_local_minilm_model(fake_upstream, tmp_path):
    text = policy(fake_upstream.url).replace("models:\n", "models:\n  minilm: {provider: local, model: all-minilm-l6-v2, "
                                             "kind: embedding}\n", 1)
    g = start_gateway(text, tmp_path / "policy.yaml", env={"FAKE_EMB_KEY": "sk-fake"}, timeout=180)
    try:
        c = g.client()
        out = c.embeddings.create(model="minilm", input=["The cat sat on the mat.", "A cat was sitting on a mat.",
                                                         "Quarterly revenue rose by four percent."])
        v = np.array([d.embedding for d in out.data])
        assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
        assert v[0] @ v[1] > 0.6 > v[0] @ v[2]  # paraphrases are close, unrelated sentences are not
        assert out.usage.prompt_tokens > 3 * 5
        small = c.embeddings.create(model="minilm", input="The cat sat on the mat.", dimensions=64,
                                    encoding_format="float")
        s = np.array(small.data[0].embedding)
        assert s.shape == (64,) and abs(np.linalg.norm(s) - 1) < 1e-5
        assert np.allclose(s, v[0][:64] / np.linalg.norm(v[0][:64]), atol=1e-5)
        status, body = post(g, {"model": "minilm", "input": [[1, 2, 3]]})
        assert status == 400 and body["error"]["param"] == "input"
        status, body = post(g, {"model": "minilm", "input": "x", "dimensions": 1000})
        assert status == 400 and "384" in body["error"]["message"]
    finally:
        g.stop()
