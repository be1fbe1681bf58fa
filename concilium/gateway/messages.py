"""POST /v1/messages (Anthropic's Messages API) and POST /v1/messages/count_tokens.

The request is translated once into a chat request (`anthropic.to_chat`) and answered by the chat
pipeline (`chat.answer`): the same routing, strategies, keys, budgets, jobs and metrics, billed
once there. What comes back is turned into Anthropic's shapes; every error on these paths, wherever
it is raised (the key check, the body limit, the pipeline), leaves as Anthropic's error JSON
(`AnthropicErrors`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from concilium.gateway import anthropic, chat
from concilium.gateway.errors import APIError
from concilium.gateway.requests import read_json, validate
from concilium.router.decide import context_need

PATH = "/v1/messages"
log = logging.getLogger("concilium.gateway")


def _translated(body: dict[str, Any], schema: type) -> dict[str, Any]:
    validate(schema, body)
    try:
        return anthropic.to_chat(body)
    except anthropic.TranslationError as e:
        raise APIError(400, e.message, param=e.param, code="invalid_request") from None


def _headers(resp: Response) -> dict[str, str]:
    out = {k: v for k, v in resp.headers.items() if k not in ("content-length", "content-type")}
    if "x-request-id" in out:
        out["request-id"] = out["x-request-id"]  # where Anthropic's SDKs read the request id
    return out


async def _events(body: AsyncIterator[Any], model: str) -> AsyncIterator[bytes]:
    tr = anthropic.StreamTranslator(model)
    async for piece in body:
        out = tr.feed(piece if isinstance(piece, bytes) else str(piece).encode())
        if out:
            yield out
    tail = tr.end()
    if tail:
        yield tail


async def create_message(request: Request) -> Response:
    body = await read_json(request)
    chat_body = _translated(body, anthropic.MessagesRequest)
    resp = await chat.answer(request, chat_body)
    if resp.status_code != 200:  # a job still running (202 with its location), a client gone (499)
        return resp
    if isinstance(resp, StreamingResponse):
        resp.body_iterator = _events(resp.body_iterator, body["model"])
        if "x-request-id" in resp.headers:
            resp.headers["request-id"] = resp.headers["x-request-id"]
        return resp
    if resp.media_type == "text/event-stream":  # a whole stream at once (a cascade's accepted draft)
        tr = anthropic.StreamTranslator(body["model"])
        data = tr.feed(resp.body) + tr.end()
        return Response(data, media_type="text/event-stream", headers=_headers(resp))
    result = orjson.loads(resp.body)
    return Response(orjson.dumps(anthropic.from_chat(result, body["model"])), media_type="application/json",
                    headers=_headers(resp))


async def count_tokens(request: Request) -> Response:
    """Estimated as the router estimates prompts (4 characters per token plus 4 per message, tool
    definitions included): no tokenizer runs and no model is called."""
    body = await read_json(request)
    chat_body = _translated(body, anthropic.CountTokensRequest)
    msgs = chat_body["messages"]
    if chat_body.get("tools"):  # tool definitions are read as part of the prompt
        msgs = [*msgs, {"role": "system", "content": orjson.dumps(chat_body["tools"]).decode()}]
    n, _ = context_need({"messages": msgs})
    return JSONResponse({"input_tokens": n}, headers={"x-concilium-estimate": "chars/4+4/message"})


class AnthropicErrors:
    """ASGI middleware: an error answered on /v1/messages... in OpenAI's JSON shape leaves in
    Anthropic's (`{"type": "error", "error": {"type", "message"}}`), same status and headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Every other path is handed straight on (the next layer's awaitable, no coroutine here).
        if scope["type"] != "http" or not scope["path"].startswith(PATH):
            return self.app(scope, receive, send)
        return self._shaped(scope, receive, send)

    async def _shaped(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_shaped(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                ctype = next((v for k, v in message.get("headers", []) if k.lower() == b"content-type"), b"")
                if message["status"] >= 400 and ctype.startswith(b"application/json"):
                    start = message
                    return
                return await send(message)
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            status = start["status"]
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            rid = next((v.decode("latin-1") for k, v in [*headers, *scope["headers"]]
                        if k.lower() == b"x-request-id"), None)
            try:
                payload = orjson.loads(b"".join(chunks))
            except orjson.JSONDecodeError:
                payload = None
            data = orjson.dumps(anthropic.from_openai_error(status, payload, rid))
            headers.append((b"content-length", str(len(data)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": data})

        sent = False

        async def send_tracked(message: Message) -> None:
            nonlocal sent
            sent = sent or message["type"] == "http.response.start"
            await send_shaped(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            if sent:
                raise
            log.exception("unhandled error")
            data = orjson.dumps(anthropic.error_body(500, f"internal error: {type(exc).__name__}"))
            await send({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
