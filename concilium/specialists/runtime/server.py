"""The model server behind `concilium serve-model`: one local model behind an OpenAI-compatible HTTP
API (what a GPU worker container runs; the gateway reaches it with its native OpenAI client).

Routes: POST /v1/chat/completions (streaming and not; usage, stop, max_tokens, temperature, top_p,
top_k, seed, logprobs/top_logprobs, logit_bias, presence/frequency penalties, JSON mode), GET /v1/models, GET /health, GET /metrics
(Prometheus: KV-cache use, batch, tokens, per-expert token counts). Requests are read and answered by
`openai_adapter`, as the gateway's in-process `local` provider reads them. Errors use the OpenAI error
shape; a feature the runtime cannot honour (tool_choice that forces a call, `json_schema` response
formats, image parts) is a 400 `unsupported_parameter` naming the field.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from concilium.specialists.runtime.engine import ContextLengthError, Engine, StreamEvent
from concilium.specialists.runtime.openai_adapter import Answer, RequestError, engine_request, sse


def _error(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def create_app(engine: Engine, model_name: str, *, default_max_tokens: int = 512) -> FastAPI:
    if engine.tokenizer is None:
        raise ValueError("the model server needs a tokenizer")
    tokenizer = engine.tokenizer
    registry = CollectorRegistry()
    registry.register(RuntimeCollector(engine, model_name))

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
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            return _error(400, f"request body is not valid JSON: {e}", "invalid_request_error")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_request_error")
        try:
            req = engine_request(body, engine, default_max_tokens=default_max_tokens)
        except RequestError as e:
            return _error(400, e.message, "invalid_request_error", e.param, e.code)
        name = body.get("model") if isinstance(body.get("model"), str) else model_name
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        answer = Answer(name, tokenizer, include_usage=include_usage)
        try:
            events = engine.stream(req.ids, req.params)
            first = await anext(events)  # surfaces submit errors before the response starts
        except ContextLengthError as e:
            return _error(400, str(e), "invalid_request_error", "messages", "context_length_exceeded")
        except ValueError as e:
            return _error(400, str(e), "invalid_request_error")
        if first.finish_reason == "error":
            return _error(503, first.error or "generation failed", "server_error")

        if not body.get("stream"):
            got = [first]
            try:
                got += [ev async for ev in events]
            finally:
                await events.aclose()
            if got[-1].finish_reason == "error":
                return _error(503, got[-1].error or "generation failed", "server_error")
            return JSONResponse(answer.completion(got))

        async def stream() -> AsyncIterator[bytes]:
            try:
                yield answer.opening()
                ev: StreamEvent | None = first
                while ev is not None:
                    if ev.finish_reason == "error":
                        yield sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                        break
                    for out in answer.chunks(ev):
                        yield out
                    if ev.finish_reason is not None:
                        break
                    ev = await anext(events, None)
                yield b"data: [DONE]\n\n"
            finally:
                await events.aclose()  # a client that went away cancels its request

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


class RuntimeCollector:
    """The engine's counters and gauges, read when /metrics is scraped."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        m = self.engine.metrics()
        kv = m["kv_cache"]
        label = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"concilium_runtime_{name}", doc, labels=["model"])
            g.add_metric(label, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"concilium_runtime_{name}", doc, labels=["model"])
            c.add_metric(label, value)
            return c

        yield gauge("kv_cache_tokens", "Tokens held in the KV cache.", kv["tokens_used"])
        yield gauge("kv_cache_capacity_tokens", "KV-cache capacity in tokens.", kv["tokens_capacity"])
        yield gauge("kv_cache_slots_used", "Sequences holding a KV-cache slot.", kv["slots_used"])
        yield gauge("requests_running", "Requests being decoded.", m["running"])
        yield gauge("requests_waiting", "Requests waiting for a KV-cache slot.", m["waiting"])
        yield counter("generated_tokens", "Tokens generated.", m["generated_tokens"])
        yield counter("prefill_tokens", "Prompt tokens prefilled.", m["prefill_tokens"])
        yield counter("requests_finished", "Requests finished.", m["requests_finished"])
        yield counter("requests_cancelled", "Requests cancelled (the client went away).", m["requests_cancelled"])
        yield gauge("batch_size_max", "Largest decode batch so far.", m["max_batch_seen"])
        if m["expert_tokens"]:
            experts = CounterMetricFamily("concilium_runtime_expert_tokens",
                                          "Tokens routed to each expert (load balance).",
                                          labels=["model", "layer", "expert"])
            for layer, counts in m["expert_tokens"].items():
                for e, c in enumerate(counts):
                    experts.add_metric([self.model_name, str(layer), str(e)], c)
            yield experts
