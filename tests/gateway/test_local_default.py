"""`make run`'s configuration: the default policy with no keys, answered by SmolLM2 in-process."""

from __future__ import annotations

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
