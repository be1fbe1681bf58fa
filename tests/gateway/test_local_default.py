"""`make run`'s configuration: the default policy with no keys, answered by SmolLM2 in-process."""

from __future__ import annotations

import json

import pytest

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_local_model_answers_paris(local_gateway):
    raw = local_gateway.client().chat.completions.with_raw_response.create(
        model="concilium/auto", messages=QUESTION, max_tokens=24, temperature=0)
    r = raw.parse()
    assert "Paris" in r.choices[0].message.content
    assert raw.headers["x-concilium-model"] == "smollm2"
    assert "OPENAI_API_KEY is not set" in raw.headers["x-concilium-reason"]
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 24


def test_local_model_streams(local_gateway):
    chunks = list(local_gateway.client().chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason in ("stop", "length") for c in chunks)


def test_stop_sequence_and_max_tokens(local_gateway):
    r = local_gateway.client().chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=24, temperature=0, stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    r = local_gateway.client().chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=3,
                                                       temperature=0)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_external_models_are_skipped_not_errors(local_gateway):
    status, plan = local_gateway.post("/v1/route", {"model": "concilium/auto", "messages": QUESTION})
    assert status == 200
    assert [c["model"] for c in plan["candidates"]] == ["smollm2"]
    skipped = {s["model"]: s["reason"] for s in plan["skipped"]}
    assert skipped["gpt-4o-mini"] == "OPENAI_API_KEY is not set"
    assert skipped["claude-sonnet"] == "ANTHROPIC_API_KEY is not set"


def test_logprobs_from_the_local_model(local_gateway):
    """What the cascade's `logprobs` scorer reads: OpenAI's logprobs shape, streamed and not."""
    client = local_gateway.client()
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
               and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_features_the_local_model_cannot_serve_are_400_naming_the_field(local_gateway):
    import openai

    client = local_gateway.client()
    tools = [{"type": "function", "function": {"name": "capital", "parameters": {"type": "object"}}}]
    image = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    for model in ("smollm2", "concilium/auto"):
        for kwargs, param in [
            (dict(messages=QUESTION, tools=tools, tool_choice="required"), "tool_choice"),
            (dict(messages=QUESTION, response_format={"type": "json_schema", "json_schema": {
                "name": "answer", "schema": {"type": "object"}}}), "response_format"),
            (dict(messages=image), "messages[0].content[1]"),
        ]:
            with pytest.raises(openai.APIStatusError) as e:
                client.chat.completions.create(model=model, max_tokens=4, **kwargs)
            if model == "smollm2":  # pinned: the model refuses the request itself
                assert e.value.status_code == 400 and e.value.body["param"] == param
                assert e.value.body["code"] == "unsupported_parameter"
            else:  # routed: the plan skips it with the reason; no other model here can be called
                assert e.value.status_code == 503 and f"smollm2: cannot serve {param}" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # streamed: refused before the stream starts
        client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=4, stream=True,
                                       tools=tools, tool_choice={"type": "function", "function": {"name": "capital"}})
    assert e.value.body["param"] == "tool_choice"
    # JSON mode is served (constrained decoding): the answer is a JSON object
    r = client.chat.completions.create(model="concilium/auto", max_tokens=48, temperature=0,
                                       response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "What is the capital of France? "
                                                  "Answer in JSON."}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # tools the model may leave uncalled (tool_choice auto) are served: a text answer is a valid one
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=8, temperature=0, tools=tools)
    assert r.choices[0].message.content
    status, plan = local_gateway.post("/v1/route", {"model": "concilium/auto", "messages": QUESTION,
                                                    "tools": tools, "tool_choice": "required"})
    assert status == 200 and plan["candidates"] == []
    assert "tool_choice" in {s["model"]: s["reason"] for s in plan["skipped"]}["smollm2"]


def test_stream_cut_inside_an_emoji_has_no_broken_character(local_gateway):
    client = local_gateway.client()
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Reply with only emojis about space."}],
              max_tokens=5, temperature=0)
    text = client.chat.completions.create(**kw).choices[0].message.content
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
              if c.choices]
    assert text and "\ufffd" not in text and "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
