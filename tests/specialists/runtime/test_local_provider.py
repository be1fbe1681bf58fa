"""The gateway's `local` provider is served in-process by this runtime."""

from __future__ import annotations

import asyncio
import json

import orjson
import pytest
import torch

from concilium.policy.schema import ModelSpec
from concilium.specialists.base import ProviderError
from concilium.specialists.local import LocalProvider
from concilium.specialists.runtime.engine import Engine
from concilium.specialists.runtime.quant import Int4Linear

QUESTION = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}


def test_local_provider_runs_on_the_runtime():
    spec = ModelSpec(
        provider="local",
        model="smollm2-135m-instruct",
        max_output_tokens=64,
        options={"max_batch": 3, "threads": 1},
    )
    provider = LocalProvider("smollm2", spec)

    async def main() -> tuple[dict, list[dict]]:
        await provider.start()
        try:
            done = await provider.complete({**QUESTION, "max_tokens": 24}, timeout=60)
            events = [
                orjson.loads(e[len(b"data: ") :])
                async for e in provider.stream({**QUESTION, "max_tokens": 24}, timeout=60)
            ]
            return done, events
        finally:
            await provider.close()

    done, events = asyncio.run(main())
    engine = provider.engine
    assert isinstance(engine, Engine) and engine.max_batch == 3 and engine.max_seq_len == 2048
    assert isinstance(engine.model.w.lm_head, Int4Linear)  # weights=auto on CPU for a Q4_1 GGUF
    assert engine.stats.requests_finished == 2 and engine.stats.generated_tokens > 2
    assert "Paris" in done["choices"][0]["message"]["content"]
    assert done["usage"]["prompt_tokens"] == 37 and done["choices"][0]["finish_reason"] == "stop"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == done["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == done["usage"]
    assert [
        e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]
    ] == ["stop"]


def test_local_provider_errors():
    provider = LocalProvider("missing", ModelSpec(provider="local", model="/nonexistent/model.gguf"))
    with pytest.raises(ProviderError) as e:
        asyncio.run(provider.start())
    assert e.value.code == "model_not_installed" and "does not exist" in provider.unavailable_reason()


@pytest.fixture(scope="module")
def smollm2():
    spec = ModelSpec(provider="local", model="smollm2-135m-instruct", max_output_tokens=64,
                     options={"max_batch": 2, "threads": 1})
    provider = LocalProvider("smollm2", spec)
    asyncio.run(provider.start())
    yield provider
    asyncio.run(provider.close())


def _run(provider: LocalProvider, body: dict) -> tuple[dict, list[dict]]:
    async def main() -> tuple[dict, list[dict]]:
        done = await provider.complete(body, timeout=60)
        events = [orjson.loads(e[len(b"data: ") :]) async for e in provider.stream(body, timeout=60)]
        return done, events

    return asyncio.run(main())


def _runtime_logprobs(engine: Engine, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log_softmax of the runtime's own logits at each answer position, computed the way the engine
    runs a request alone (prefill the prompt, then one decode step per token) in a free cache slot."""
    from concilium.specialists.runtime.model import ForwardBatch

    dev = engine.model.device
    slot = engine.cache.allocate()
    try:
        with torch.inference_mode():
            rows = [engine.model(ForwardBatch.for_prefill([(prompt, slot)], dev), engine.cache)]
            for i, t in enumerate(answer[:-1]):
                engine.cache.lengths[slot] = len(prompt) + i
                rows.append(engine.model(ForwardBatch.for_decode([t], [slot], [len(prompt) + i], dev), engine.cache))
        return torch.log_softmax(torch.cat(rows), dim=-1)
    finally:
        engine.cache.release(slot)


def test_logprobs_in_openai_shape_streamed_and_not(smollm2):
    body = {**QUESTION, "max_tokens": 10, "logprobs": True, "top_logprobs": 3}
    done, events = _run(smollm2, body)
    choice = done["choices"][0]
    entries = choice["logprobs"]["content"]
    text = choice["message"]["content"]
    assert len(entries) == done["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop")
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == text == "".join(e["token"] for e in entries)
    for e in entries:
        tops = e["top_logprobs"]
        assert len(tops) == 3 and [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == e["token"] and tops[0]["logprob"] == e["logprob"] <= 0  # greedy: the top one
    # the values are the runtime's: log_softmax of its logits at each position, for the chosen token
    tok = smollm2.engine.tokenizer
    prompt = tok.encode_chat(QUESTION["messages"])
    answer = tok.encode(text)
    ref = _runtime_logprobs(smollm2.engine, prompt, answer)
    got = torch.tensor([e["logprob"] for e in entries])
    torch.testing.assert_close(got, ref.gather(1, torch.tensor(answer)[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    assert [t["token"] for t in entries[0]["top_logprobs"]] == [
        tok.token_bytes(i).decode() for i in ref[0].topk(3).indices.tolist()
    ]
    # streamed: each chunk carries the log-probs of the tokens its text came from; together the same
    streamed = [c for e in events if e["choices"] and (c := e["choices"][0].get("logprobs"))]
    assert [x for c in streamed for x in c["content"]] == entries
    for e in events:
        if e["choices"] and e["choices"][0]["delta"].get("content"):
            lp = e["choices"][0]["logprobs"]["content"]
            assert b"".join(bytes(x["bytes"]) for x in lp).decode() == e["choices"][0]["delta"]["content"]
    plain, plain_events = _run(smollm2, {**QUESTION, "max_tokens": 10})
    assert plain["choices"][0].get("logprobs") is None
    assert not any(e["choices"] and e["choices"][0].get("logprobs") for e in plain_events)


def test_logit_bias_and_unsupported_features(smollm2):
    tok = smollm2.engine.tokenizer
    (paris,) = tok.encode(" Paris")
    body = {**QUESTION, "max_tokens": 16}
    assert " Paris" in _run(smollm2, body)[0]["choices"][0]["message"]["content"]
    banned, _ = _run(smollm2, {**body, "logit_bias": {str(paris): -100}})
    assert paris not in tok.encode(banned["choices"][0]["message"]["content"])
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    for extra, param in [
        ({"tools": tools, "tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}, "response_format"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
    ]:
        with pytest.raises(ProviderError) as e:
            asyncio.run(smollm2.complete({**body, **extra}, timeout=60))
        assert e.value.status == 400 and e.value.param == param and not e.value.fallback
    assert smollm2.unsupported({**body, "tools": tools, "tool_choice": "required"})[0] == "tool_choice"
    assert smollm2.unsupported({**body, "tools": tools}) is None and smollm2.unsupported(body) is None


def test_stream_cut_inside_an_emoji_sends_whole_characters(smollm2):
    """max_tokens ends the answer between the bytes of an emoji: no delta holds a broken character
    and the deltas add up to the non-streamed text."""
    body = {"messages": [{"role": "user", "content": "Reply with only emojis about space."}],
            "temperature": 0, "max_tokens": 5}
    done, events = _run(smollm2, body)
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    text = done["choices"][0]["message"]["content"]
    assert done["choices"][0]["finish_reason"] == "length" and text and "\ufffd" not in text
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == text


def test_json_mode_answers_a_json_object(smollm2):
    body = {"messages": [{"role": "user", "content": "Give me a JSON object describing a cat with its name and age."}],
            "temperature": 0, "max_tokens": 60}
    free = asyncio.run(smollm2.complete(body, timeout=60))["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)  # unconstrained, the model wraps it in prose and a code fence
    done, events = _run(smollm2, {**body, "response_format": {"type": "json_object"}})
    text = done["choices"][0]["message"]["content"]
    assert isinstance(json.loads(text), dict) and done["choices"][0]["finish_reason"] == "stop"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == text
