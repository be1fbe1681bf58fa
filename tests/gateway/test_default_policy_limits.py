"""The default policy with no keys (SmolLM2 in-process): a pinned external model is not answered by the
local one, and prompts longer than the local runtime's context are refused from the plan, cheaply."""

from __future__ import annotations

import openai
import pytest

from concilium.policy.schema import ModelSpec
from concilium.specialists.local import LocalProvider

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_local_provider_reports_its_real_context_before_loading():
    spec = ModelSpec(provider="local", model="smollm2-135m-instruct", context_window=8192)
    assert LocalProvider("m", spec).context_limit() == 2048  # the preallocated cache, not 8192
    spec = ModelSpec(provider="local", model="x", context_window=8192, options={"max_seq_len": 4096})
    assert LocalProvider("m", spec).context_limit() == 4096


def test_pinned_external_model_without_its_key_is_not_answered_by_the_local_model(local_gateway):
    with pytest.raises(openai.APIStatusError) as e:
        local_gateway.client().chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert e.value.status_code == 503 and e.value.body["code"] == "model_unavailable"
    assert "'gpt-4o'" in e.value.message and "OPENAI_API_KEY is not set" in e.value.message


def test_plan_skips_the_local_model_for_a_prompt_longer_than_its_runtime_context(local_gateway):
    long = [{"role": "user", "content": "word " * 32_000}]  # ~40k tokens
    status, plan = local_gateway.post("/v1/route", {"model": "concilium/auto", "messages": long})
    assert status == 200 and plan["candidates"] == []
    why = {s["model"]: s["reason"] for s in plan["skipped"]}
    assert "context window 2048 (the policy says 8192)" in why["smollm2"]
    assert "OPENAI_API_KEY is not set" in why["gpt-4o-mini"]  # it could hold it, with a key


def test_huge_prompt_is_refused_before_tokenising(local_gateway):
    huge = [{"role": "user", "content": "x" * 4_000_000}]  # beyond every model's context
    status, body = local_gateway.post("/v1/chat/completions", {"model": "concilium/auto", "messages": huge})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages" and "smollm2" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:  # pinned to the local model: the same
        local_gateway.client().chat.completions.create(model="smollm2", messages=huge, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
