"""The gateway's `local` provider is served in-process by this runtime."""

from __future__ import annotations

import asyncio

import orjson
import pytest

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
