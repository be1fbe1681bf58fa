"""A fake OpenAI-compatible upstream with fault injection, for tests, chaos runs and benchmarks.

It stands in for paid external APIs on loopback. Answers are deterministic: the reply echoes the last
user message's words (or "ok") split over `chunks` SSE events.

Faults, per upstream model id, come from a script (consumed one per request) or a default:
  {"status": 500}                       answer with that HTTP status and an OpenAI error body
  {"status": 429, "retry_after": 0.2}   rate limited, with a retry-after header
  {"status": 400, "code": "context_length_exceeded"}   an error body with that error code
  {"delay_s": 2.0}                      slow first byte
  {"drop_after": 3}                     stream: close the connection after 3 events, no [DONE]
  {"malformed_at": 2}                   stream: event 2 is not JSON
  {"hang": true}                        never answer
  {"chunk_delay_s": 0.05}               pause between streamed events
  {"tool_call": {"name": "f", "arguments": {...}}}   answer by calling that tool (finish_reason tool_calls)
  {"garbage": true}                     status 200 with a body that is not JSON
Random chaos (`/_control/chaos`) picks among 500, 429, slow and dropped streams with given odds.

POST /v1/embeddings answers deterministic unit vectors (`fake_vector`), with the same faults.

Control endpoints: POST /_control/script {"model", "faults": [...]}, POST /_control/default
{"model", "fault"}, POST /_control/chaos {"p_500", "p_429", "p_slow", "p_drop", "slow_s", "seed"},
POST /_control/reset, GET /_control/stats (counts, and the last 500 request bodies in `bodies`).

Run: python -m concilium.testing.fake_upstream --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import defaultdict, deque
from typing import Any

import orjson
from aiohttp import web


class Upstream:
    def __init__(self, chunks: int = 13) -> None:
        self.chunks = chunks
        self.reset()

    def reset(self) -> None:
        self.scripts: dict[str, deque[dict]] = defaultdict(deque)
        self.defaults: dict[str, dict] = {}
        self.chaos: dict[str, float] | None = None
        self.rng = random.Random(0)
        self.stats: dict[str, Any] = {"requests": 0, "completed": 0, "disconnected": 0, "in_flight": 0,
                                      "faults": defaultdict(int), "by_model": defaultdict(int),
                                      "last_body": None, "bodies": deque(maxlen=500)}

    def fault_for(self, model: str) -> dict:
        if self.scripts[model]:
            return self.scripts[model].popleft()
        if self.scripts["*"]:
            return self.scripts["*"].popleft()
        if self.chaos:
            c, r = self.chaos, self.rng.random()
            edges = [("p_500", {"status": 500}), ("p_429", {"status": 429, "retry_after": 0.05}),
                     ("p_slow", {"delay_s": c.get("slow_s", 2.0)}), ("p_drop", {"drop_after": 2})]
            acc = 0.0
            for key, fault in edges:
                acc += c.get(key, 0.0)
                if r < acc:
                    return fault
            return {}
        return self.defaults.get(model) or self.defaults.get("*") or {}


def _reply_words(body: dict) -> list[str]:
    text = "ok"
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            text = m["content"] or "ok"
            break
    return text.split() or ["ok"]


def _split(words: list[str], n: int) -> list[str]:
    """Split the reply into exactly n non-empty pieces (repeating words if needed)."""
    while len(words) < n:
        words = words + words
    size, extra = divmod(len(words), n)
    out, i = [], 0
    for k in range(n):
        j = i + size + (1 if k < extra else 0)
        out.append((" " if k else "") + " ".join(words[i:j]))
        i = j
    return out


def _error(status: int, message: str, headers: dict | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                      "code": code, "param": None}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json",
                        headers=headers)


async def chat(request: web.Request) -> web.StreamResponse:
    up: Upstream = request.app["upstream"]
    st = up.stats
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid JSON")
    model = str(body.get("model", ""))
    st["requests"] += 1
    st["by_model"][model] += 1
    st["last_body"] = body
    st["bodies"].append(body)
    fault = up.fault_for(model)
    if fault:
        st["faults"][orjson.dumps(fault).decode()] += 1
    st["in_flight"] += 1
    try:
        if fault.get("hang"):
            await asyncio.sleep(3600)
        if fault.get("delay_s"):
            await asyncio.sleep(float(fault["delay_s"]))
        status = int(fault.get("status", 200))
        if status != 200:
            headers = {"retry-after": str(fault["retry_after"])} if "retry_after" in fault else None
            return _error(status, f"injected {status}", headers, fault.get("code"))
        if fault.get("garbage"):
            return web.Response(body=b"<html>upstream proxy error</html>", content_type="application/json")
        if fault.get("tool_call"):
            return await _tool_call(request, up, body, model, fault["tool_call"])
        words = _reply_words(body)
        n = max(1, int(body.get("max_tokens") or 0) and min(up.chunks, int(body["max_tokens"])) or up.chunks)
        pieces = _split(words, n)
        cid, created = f"chatcmpl-fake{st['requests']}", int(time.time())
        usage = {"prompt_tokens": sum(len(str(m.get("content", "")).split()) for m in body.get("messages", [])),
                 "completion_tokens": len(pieces)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not body.get("stream"):
            resp = {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                 "finish_reason": "stop"}], "usage": usage}
            st["completed"] += 1
            return web.Response(body=orjson.dumps(resp), content_type="application/json")
        return await _stream(request, up, body, model, cid, created, pieces, usage, fault)
    finally:
        st["in_flight"] -= 1


async def _stream(request: web.Request, up: Upstream, body: dict, model: str, cid: str, created: int,
                  pieces: list[str], usage: dict, fault: dict) -> web.StreamResponse:
    st = up.stats
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)

    def ev(delta: dict | None, finish: str | None = None, use: dict | None = None) -> bytes:
        obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [] if delta is None else
                               [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if use is not None:
            obj["usage"] = use
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    events = [ev({"role": "assistant", "content": ""})]
    events += [ev({"content": p}) for p in pieces]
    events.append(ev({}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(ev(None, use=usage))
    drop_after = fault.get("drop_after")
    malformed_at = fault.get("malformed_at")
    delay = float(fault.get("chunk_delay_s", 0))
    try:
        for i, e in enumerate(events):
            if drop_after is not None and i >= int(drop_after):
                request.transport.close()  # drop the connection mid-stream, no [DONE]
                return resp
            await resp.write(b"data: {not json\n\n" if i == malformed_at else e)
            if delay:
                await asyncio.sleep(delay)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        st["completed"] += 1
    except (ConnectionResetError, asyncio.CancelledError):
        st["disconnected"] += 1
        raise
    return resp


async def _tool_call(request: web.Request, up: Upstream, body: dict, model: str, call: dict) -> web.StreamResponse:
    """An answer that calls one tool; streamed, its arguments come in two pieces."""
    st = up.stats
    cid, created = f"chatcmpl-fake{st['requests']}", int(time.time())
    args = orjson.dumps(call.get("arguments") or {}).decode()
    tid = f"call_fake{st['requests']}"
    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    if not body.get("stream"):
        msg = {"role": "assistant", "content": None, "tool_calls": [
            {"id": tid, "type": "function", "function": {"name": call["name"], "arguments": args}}]}
        st["completed"] += 1
        return web.json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                  "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls"}],
                                  "usage": usage}, dumps=lambda o: orjson.dumps(o).decode())
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)

    def ev(choices: list, use: dict | None = None) -> bytes:
        obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": choices}
        if use is not None:
            obj["usage"] = use
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    half = len(args) // 2
    first = {"index": 0, "id": tid, "type": "function", "function": {"name": call["name"], "arguments": ""}}
    events = [ev([{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [first]},
                   "finish_reason": None}])]
    events += [ev([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                    "finish_reason": None}]) for piece in (args[:half], args[half:]) if piece]
    events.append(ev([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]))
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append(ev([], usage))
    for e in events:
        await resp.write(e)
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    st["completed"] += 1
    return resp


def fake_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit vector for `text` (the same text always gets the same vector)."""
    import hashlib
    import math

    raw = hashlib.sha256(text.encode()).digest() * (dims // 32 + 1)
    v = [b / 255.0 - 0.5 for b in raw[:dims]]
    n = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / n for x in v]


async def embeddings(request: web.Request) -> web.Response:
    """OpenAI embeddings: `dimensions` (default 8) floats per input, base64 when asked; faults apply."""
    up: Upstream = request.app["upstream"]
    st = up.stats
    body = orjson.loads(await request.read())
    model = str(body.get("model", ""))
    st["requests"] += 1
    st["by_model"][model] += 1
    st["last_body"] = body
    st["bodies"].append(body)
    fault = up.fault_for(model)
    if fault.get("delay_s"):
        await asyncio.sleep(float(fault["delay_s"]))
    if int(fault.get("status", 200)) != 200:
        headers = {"retry-after": str(fault["retry_after"])} if "retry_after" in fault else None
        return _error(int(fault["status"]), f"injected {fault['status']}", headers, fault.get("code"))
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                                      and isinstance(inputs[0], int)) else inputs
    data = []
    for i, x in enumerate(inputs):
        vec = fake_vector(x if isinstance(x, str) else " ".join(map(str, x)), int(body.get("dimensions") or 8))
        if body.get("encoding_format") == "base64":
            import base64
            import struct

            vec = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vec})
    tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in inputs)
    st["completed"] += 1
    return web.Response(body=orjson.dumps({"object": "list", "data": data, "model": model,
                                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
                        content_type="application/json")


async def control(request: web.Request) -> web.Response:
    up: Upstream = request.app["upstream"]
    what = request.match_info["what"]
    data = orjson.loads(await request.read() or b"{}") if request.method == "POST" else {}
    if what == "script":
        up.scripts[data.get("model", "*")].extend(data.get("faults", []))
    elif what == "default":
        up.defaults[data.get("model", "*")] = data.get("fault") or {}
    elif what == "chaos":
        up.chaos = {k: float(v) for k, v in data.items() if k != "seed"} or None
        up.rng = random.Random(int(data.get("seed", 0)))
    elif what == "reset":
        up.reset()
    elif what != "stats":
        return _error(404, f"unknown control {what}")
    st = dict(up.stats)
    st["faults"], st["by_model"], st["bodies"] = dict(st["faults"]), dict(st["by_model"]), list(st["bodies"])
    return web.Response(body=orjson.dumps(st), content_type="application/json")


async def models(request: web.Request) -> web.Response:
    return web.Response(body=b'{"object":"list","data":[]}', content_type="application/json")


def make_app(chunks: int = 13) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["upstream"] = Upstream(chunks)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/_control/{what}", control)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--chunks", type=int, default=13)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(args.chunks), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
