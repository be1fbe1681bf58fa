"""An OpenAI-compatible upstream that answers with recorded responses, for replay evaluation.

Outcome records with `responses: {model: text}` (see `concilium.router.outcomes`) are indexed by
(model, prompt); a chat completion for `model` whose last user message is a recorded prompt gets
that model's recorded answer, non-streamed or streamed as SSE chunks (with usage when asked by
`stream_options.include_usage`). Prompts match whitespace- and case-insensitively. A model or
prompt with no recording answers 404 with an OpenAI error body, so a replay never silently
invents an answer. `logprobs: true` is not replayed (the records hold none): the completion's
`logprobs` stays null.

Usage counts are estimates (characters / 4), the same estimate the router's cost model uses.
GET /_control/stats gives the calls per model; POST /_control/reset clears them.

Run: python -m concilium.testing.replay_upstream --outcomes FILE.jsonl --port 9200
"""

from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import orjson
from aiohttp import web

from concilium.router.outcomes import Outcome, prompt_key
from concilium.router.text import content_text

CHARS_PER_TOKEN = 4.0


class Recordings:
    def __init__(self, records: Iterable[Outcome]) -> None:
        self.answers: dict[tuple[str, str], str] = {}
        self.models: set[str] = set()
        for r in records:
            for model, text in r.responses.items():
                self.answers[(model, prompt_key(r.prompt))] = text
                self.models.add(model)
        self.reset()

    def reset(self) -> None:
        self.stats: dict[str, Any] = {"requests": 0, "answered": 0, "missing": 0, "by_model": defaultdict(int)}

    def lookup(self, model: str, prompt: str) -> str | None:
        return self.answers.get((model, prompt_key(prompt)))


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN)) if text else 0


def _error(status: int, message: str, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "code": code, "param": None}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _last_user(body: dict[str, Any]) -> str | None:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            return content_text(m.get("content"))
    return None


def chunks_of(text: str, n: int) -> list[str]:
    """`text` split into at most n pieces on word boundaries (joined they give `text` back)."""
    if not text:
        return [""]
    words = text.split(" ")
    size = max(1, math.ceil(len(words) / n))
    pieces = [" ".join(words[i:i + size]) for i in range(0, len(words), size)]
    return [p if i == 0 else " " + p for i, p in enumerate(pieces)]


async def chat(request: web.Request) -> web.StreamResponse:
    rec: Recordings = request.app["recordings"]
    st = rec.stats
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "invalid JSON")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    st["requests"] += 1
    model = str(body.get("model", ""))
    prompt = _last_user(body)
    if model not in rec.models:
        st["missing"] += 1
        return _error(404, f"no recorded answers for model {model!r}", "model_not_found")
    answer = rec.lookup(model, prompt or "")
    if answer is None:
        st["missing"] += 1
        return _error(404, f"no recorded answer of {model!r} for this prompt", "not_recorded")
    st["answered"] += 1
    st["by_model"][model] += 1
    prompt_chars = sum(len(content_text(m.get("content"))) for m in body.get("messages") or [] if isinstance(m, dict))
    usage = {"prompt_tokens": _tokens("x" * prompt_chars), "completion_tokens": _tokens(answer)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    cid, created = f"chatcmpl-replay{st['requests']}", int(time.time())
    if not body.get("stream"):
        resp = {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "logprobs": None, "finish_reason": "stop"}], "usage": usage}
        return web.Response(body=orjson.dumps(resp), content_type="application/json")
    resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
    await resp.prepare(request)

    def ev(delta: dict | None, finish: str | None = None, use: dict | None = None) -> bytes:
        obj: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                               "choices": [] if delta is None else
                               [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if use is not None:
            obj["usage"] = use
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    await resp.write(ev({"role": "assistant", "content": ""}))
    for piece in chunks_of(answer, request.app["chunks"]):
        await resp.write(ev({"content": piece}))
    await resp.write(ev({}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(ev(None, use=usage))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def control(request: web.Request) -> web.Response:
    rec: Recordings = request.app["recordings"]
    what = request.match_info["what"]
    if what == "reset":
        rec.reset()
    elif what != "stats":
        return _error(404, f"unknown control {what}")
    st = dict(rec.stats)
    st["by_model"] = dict(st["by_model"])
    return web.Response(body=orjson.dumps(st), content_type="application/json")


async def models(request: web.Request) -> web.Response:
    rec: Recordings = request.app["recordings"]
    data = [{"id": m, "object": "model", "owned_by": "replay"} for m in sorted(rec.models)]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


def make_app(records: Iterable[Outcome], chunks: int = 8) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["recordings"] = Recordings(records)
    app["chunks"] = max(1, int(chunks))
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/_control/{what}", control)
    return app


def main() -> None:
    from concilium.router.outcomes import read_outcomes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outcomes", required=True, nargs="+", metavar="FILE")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9200)
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    records = [r for f in args.outcomes for r in read_outcomes(f)]
    web.run_app(make_app(records, args.chunks), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
