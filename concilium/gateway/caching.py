"""The response cache in front of the chat route (see `pipeline.cache` for keys and stores).

`lookup()` runs after the guard admitted the request (the key is known, access checked): it returns
a `Lookup` whose `hit` is the cached completion to serve, or whose `save` stores the answer that is
about to be made. A hit is free (the ticket settles 0), streamed as SSE chunks when the client asked
for a stream, and says `x-concilium-cache: hit`."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from concilium.core.plan import RoutePlan
from concilium.gateway.headers import plan_headers
from concilium.gateway.requests import request_header
from concilium.guard.pii import findings, prompt_text
from concilium.pipeline import cache as pcache
from concilium.pipeline.cascade import completion_events
from concilium.pipeline.state import Snapshot
from concilium.policy.schema import CacheConfig

log = logging.getLogger("concilium.cache")
HEADER = "x-concilium-cache"


@dataclass
class Lookup:
    route: str
    result: str  # hit | miss | bypass
    cfg: CacheConfig | None = None
    key: str | None = None
    bucket: str | None = None
    vec: Any = None
    words: frozenset[str] = frozenset()
    store: bool = False  # save the answer made for this request
    hit: dict | None = None  # {"m": model, "r": completion}
    similarity: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _namespace(request: Request, ticket: Any, cfg: CacheConfig) -> str:
    """Whose cache: the API key's name (keys on), else a hash of the presented credential."""
    if cfg.share_across_keys:
        return "*"
    if ticket is not None:
        return "key:" + ticket.key.name
    cred = request_header(request, b"authorization") or request_header(request, b"x-api-key") or ""
    return "cred:" + hashlib.sha256(cred.encode()).hexdigest()[:32]


def _directives(request: Request) -> tuple[bool, bool]:
    """(no_cache, no_store) from the client's Cache-Control."""
    cc = (request_header(request, b"cache-control") or "").lower()
    if not cc:
        return False, False
    parts = {p.strip().split("=", 1)[0] for p in cc.split(",")}
    return "no-cache" in parts, "no-store" in parts


async def lookup(request: Request, body: dict[str, Any], plan: RoutePlan, snap: Snapshot, ticket: Any) -> Lookup:
    svc = request.app.state.services
    route = plan.route
    cfg = snap.cache.for_route(route) if plan.strategy == "single" and plan.mode == "interactive" else None
    if cfg is None:
        return Lookup(route, "bypass", headers={HEADER: "bypass"})
    why = pcache.uncacheable(body, cfg)
    if why is None and findings(prompt_text(body), snap.policy.privacy.detect, first_only=True):
        why = "pii"
    no_cache, no_store = _directives(request)
    if why is not None or (no_cache and no_store):
        return _counted(svc, Lookup(route, "bypass", headers={HEADER: "bypass"}))
    ns = _namespace(request, ticket, cfg)
    look = Lookup(route, "miss", cfg, pcache.exact_key(body, route, ns), store=not no_store)
    if cfg.semantic is not None and snap.cache.embedder is not None:
        parts = pcache.semantic_parts(body, route, ns)
        if parts is not None:
            look.bucket, text = parts
            look.vec = snap.cache.embedder.encode(text)
            look.words = pcache.prompt_words(text)
    if no_cache:  # a fresh answer, stored for the next request
        look.result = "bypass"
        look.headers = {HEADER: "bypass"}
        return _counted(svc, look)
    try:
        found = None
        if cfg.exact:
            raw = await svc.cache.get(route, look.key)
            found = pcache.Found(raw) if raw is not None else None
        if found is None and look.vec is not None:
            found = await svc.cache.nearest(route, look.bucket, look.vec, cfg.semantic.threshold, look.words)
    except Exception as e:  # a cache that is down is a cache that misses
        log.warning("cache lookup failed: %s", e)
        found = None
    if found is not None:
        look.result, look.hit, look.similarity, look.store = "hit", orjson.loads(found.value), found.similarity, False
        look.headers = {HEADER: "hit"}
        if found.similarity is not None:
            look.headers["x-concilium-cache-similarity"] = f"{found.similarity:.4f}"
    else:
        look.headers = {HEADER: "miss"}
    return _counted(svc, look)


def _counted(svc: Any, look: Lookup) -> Lookup:
    m = svc.metrics
    kind = "semantic" if look.similarity is not None else ("exact" if look.result == "hit" else "")
    m.child(m.cache, look.route, look.result, kind).inc()
    return look


def serve_hit(request: Request, body: dict[str, Any], plan: RoutePlan, look: Lookup, t0: float) -> Response:
    """The cached completion, as JSON or as the SSE chunks of a stream."""
    m = request.app.state.services.metrics
    model, result = look.hit["m"], look.hit["r"]  # type: ignore[index]
    m.record(model, plan.route, "cached", time.perf_counter() - t0, None, None)
    headers = {**plan_headers(plan, model), **look.headers}
    if body.get("stream"):
        want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Response(b"".join(completion_events(result, want_usage)), media_type="text/event-stream",
                        headers={**headers, "cache-control": "no-cache"})
    return Response(orjson.dumps(result), media_type="application/json", headers=headers)


async def save(request: Request, look: Lookup, model: str, result: dict) -> None:
    """Store a finished answer (a plain text answer that ended normally) for later requests."""
    if not look.store or look.cfg is None:
        return
    choice = (result.get("choices") or [None])[0]
    if not isinstance(choice, dict) or choice.get("finish_reason") not in ("stop", "length"):
        return
    msg = choice.get("message") or {}
    if msg.get("tool_calls") or not isinstance(msg.get("content"), str):
        return
    value = orjson.dumps({"m": model, "r": result})
    try:
        await request.app.state.services.cache.put(look.route, look.key, value, look.cfg, look.bucket, look.vec,
                                                   look.words)
    except Exception as e:
        log.warning("cache store failed: %s", e)


class StreamCollector:
    """Rebuilds a chat.completion from the SSE events of a streamed answer, to store it."""

    def __init__(self, look: Lookup) -> None:
        self.look = look
        self.parts: list[str] = []
        self.meta: dict[str, Any] = {}
        self.finish: str | None = None
        self.usage: dict | None = None
        self.broken = False

    def feed(self, ev: bytes) -> None:
        if self.broken:
            return
        for line in ev.split(b"\n"):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            try:
                obj = orjson.loads(line[6:])
            except orjson.JSONDecodeError:
                self.broken = True
                return
            if not self.meta:
                self.meta = {k: obj.get(k) for k in ("id", "created", "model")}
            if isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
            for ch in obj.get("choices") or ():
                if ch.get("index", 0) != 0:
                    self.broken = True
                    return
                delta = ch.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    self.broken = True
                    return
                if isinstance(delta.get("content"), str):
                    self.parts.append(delta["content"])
                if ch.get("finish_reason"):
                    self.finish = ch["finish_reason"]

    def completion(self) -> dict | None:
        if self.broken or self.finish is None:
            return None
        return {"id": self.meta.get("id"), "object": "chat.completion", "created": self.meta.get("created"),
                "model": self.meta.get("model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.parts)},
                             "finish_reason": self.finish}],
                **({"usage": self.usage} if self.usage else {})}
