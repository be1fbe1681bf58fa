"""The model server behind `concilium serve-model`: one local model behind an OpenAI-compatible HTTP
API (what a GPU worker container runs; the gateway reaches it with its native OpenAI client).

Routes: POST /v1/chat/completions (streaming and not; usage, stop, max_tokens, temperature, top_p,
top_k, seed, logprobs/top_logprobs, logit_bias, presence/frequency penalties, JSON mode), GET /v1/models, GET /health, GET /metrics
(Prometheus text: KV-cache use, batch, tokens, per-expert token counts). Errors use the OpenAI error
shape; a feature the runtime cannot honour (tool_choice that forces a call, `json_schema` response
formats, image parts) is a 400 `unsupported_parameter` naming the field.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from concilium.specialists.runtime.engine import ContextLengthError, Engine, StreamEvent
from concilium.specialists.runtime.logprobs import choice_logprobs
from concilium.specialists.runtime.openai_request import (
    RequestError,
    prompt_ids,
    sampling_params,
    unsupported_feature,
)


def _error(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _usage(ev: StreamEvent) -> dict[str, int]:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.completion_tokens,
        "total_tokens": ev.prompt_tokens + ev.completion_tokens,
    }


def create_app(engine: Engine, model_name: str, *, default_max_tokens: int = 512) -> FastAPI:
    if engine.tokenizer is None:
        raise ValueError("the model server needs a tokenizer")
    tokenizer = engine.tokenizer

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="Concilium model server", lifespan=lifespan)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.model.describe()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "concilium"}],
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(prometheus_text(engine, model_name), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            return _error(400, f"request body is not valid JSON: {e}", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        try:
            if (err := unsupported_feature(body)) is not None:
                raise err
            params = sampling_params(
                body, default_max_tokens=default_max_tokens, vocab_size=engine.model.cfg.vocab_size
            )
            ids = prompt_ids(body, tokenizer)
        except RequestError as e:
            return _error(400, e.message, "invalid_request_error", e.param, e.code)
        room = engine.max_seq_len - len(ids)
        if room < 1:
            return _error(
                400,
                f"the prompt has {len(ids)} tokens; this server's context is {engine.max_seq_len}",
                "invalid_request_error",
                "messages",
                "context_length_exceeded",
            )
        params.max_tokens = min(params.max_tokens, room)
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        now = int(time.time())
        name = body.get("model") if isinstance(body.get("model"), str) else model_name
        try:
            events = engine.stream(ids, params)
            first = await anext(events)  # surfaces submit errors before the response starts
        except ContextLengthError as e:
            return _error(400, str(e), "invalid_request_error", "messages", "context_length_exceeded")
        except ValueError as e:
            return _error(400, str(e), "invalid_request_error")
        if first.finish_reason == "error":
            return _error(503, first.error or "generation failed", "server_error")

        if not body.get("stream"):
            text, last, lps = [first.text], first, first.logprobs
            try:
                async for ev in events:
                    text.append(ev.text)
                    if lps is not None and ev.logprobs:
                        lps.extend(ev.logprobs)
                    last = ev
            finally:
                await events.aclose()
            if last.finish_reason == "error":
                return _error(503, last.error or "generation failed", "server_error")
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": now,
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(text)},
                            "logprobs": choice_logprobs(tokenizer, lps),
                            "finish_reason": last.finish_reason,
                        }
                    ],
                    "usage": _usage(last),
                }
            )

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any] | None, finish: str | None = None, lps: Any = None) -> dict[str, Any]:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}]
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": name,
                "choices": choices,
            }

        async def sse() -> AsyncIterator[bytes]:
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}))
                ev: StreamEvent | None = first
                pending: list[Any] = []  # log-probs of tokens whose text is still held back
                while ev is not None:
                    if ev.finish_reason == "error":
                        yield _sse(
                            {
                                "error": {
                                    "message": ev.error,
                                    "type": "server_error",
                                    "param": None,
                                    "code": None,
                                }
                            }
                        )
                        break
                    pending.extend(ev.logprobs or [])
                    if ev.text or (pending and ev.finish_reason is not None):
                        lps = choice_logprobs(tokenizer, pending) if ev.logprobs is not None else None
                        pending = []
                        yield _sse(chunk({"content": ev.text} if ev.text else {}, lps=lps))
                    if ev.finish_reason is not None:
                        yield _sse(chunk({}, ev.finish_reason))
                        if include_usage:
                            yield _sse({**chunk(None), "usage": _usage(ev)})
                        break
                    ev = await anext(events, None)
                yield b"data: [DONE]\n\n"
            finally:
                await events.aclose()  # a client that went away cancels its request

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def prometheus_text(engine: Engine, model_name: str) -> str:
    m = engine.metrics()
    kv = m["kv_cache"]
    label = f'model="{model_name}"'
    lines = [
        "# HELP concilium_runtime_kv_cache_tokens Tokens held in the KV cache.",
        "# TYPE concilium_runtime_kv_cache_tokens gauge",
        f"concilium_runtime_kv_cache_tokens{{{label}}} {kv['tokens_used']}",
        "# HELP concilium_runtime_kv_cache_capacity_tokens KV-cache capacity in tokens.",
        "# TYPE concilium_runtime_kv_cache_capacity_tokens gauge",
        f"concilium_runtime_kv_cache_capacity_tokens{{{label}}} {kv['tokens_capacity']}",
        "# HELP concilium_runtime_kv_cache_slots_used Sequences holding a KV-cache slot.",
        "# TYPE concilium_runtime_kv_cache_slots_used gauge",
        f"concilium_runtime_kv_cache_slots_used{{{label}}} {kv['slots_used']}",
        "# TYPE concilium_runtime_requests_running gauge",
        f"concilium_runtime_requests_running{{{label}}} {m['running']}",
        "# TYPE concilium_runtime_requests_waiting gauge",
        f"concilium_runtime_requests_waiting{{{label}}} {m['waiting']}",
        "# TYPE concilium_runtime_generated_tokens_total counter",
        f"concilium_runtime_generated_tokens_total{{{label}}} {m['generated_tokens']}",
        "# TYPE concilium_runtime_prefill_tokens_total counter",
        f"concilium_runtime_prefill_tokens_total{{{label}}} {m['prefill_tokens']}",
        "# TYPE concilium_runtime_requests_finished_total counter",
        f"concilium_runtime_requests_finished_total{{{label}}} {m['requests_finished']}",
        "# TYPE concilium_runtime_requests_cancelled_total counter",
        f"concilium_runtime_requests_cancelled_total{{{label}}} {m['requests_cancelled']}",
        "# HELP concilium_runtime_batch_size_max Largest decode batch so far.",
        "# TYPE concilium_runtime_batch_size_max gauge",
        f"concilium_runtime_batch_size_max{{{label}}} {m['max_batch_seen']}",
    ]
    if m["expert_tokens"]:
        lines += [
            "# HELP concilium_runtime_expert_tokens_total Tokens routed to each expert (load balance).",
            "# TYPE concilium_runtime_expert_tokens_total counter",
        ]
        for layer, counts in m["expert_tokens"].items():
            for e, c in enumerate(counts):
                lines.append(
                    f'concilium_runtime_expert_tokens_total{{{label},layer="{layer}",expert="{e}"}} {c}'
                )
    return "\n".join(lines) + "\n"
