"""The response cache: what may be cached, the key a request is stored under, and the stores.

    plan = cache_plan(policy)              # None when the policy caches nothing (the hot path's check)
    cfg = plan.for_route(route)            # the route's settings, or None (off there)
    why = uncacheable(body, cfg)           # a reason to bypass, or None
    key = exact_key(body, route, ns)       # ns: the API key's name, or "*" when shared

Exact: the SHA-256 of the request with what cannot change the answer left out (`IGNORED`), `None`
values dropped, `n: 1` dropped, `stop` as a list and numbers as floats, keys sorted. Semantic: the
same hash with the last user message's text left out names a bucket; inside it, the answer to the
prompt whose embedding (the router's static embedder) is the most similar, if at least the route's
threshold and whose words (4+ letters) are the same but for up to two typos, is served. So only the
last user turn may differ, and only in case, punctuation, short words and typos: its numbers, the
system prompt, the history, the model and every sampling parameter must be the same.

Stores: `MemoryStore` (per route, least recently used evicted beyond `max_entries`, entries expire
after `ttl_s`) and `RedisStore` (SET with EX; a sorted set per route trims to `max_entries`).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from concilium.policy.schema import CacheConfig, Policy
from concilium.router.text import content_text

log = logging.getLogger("concilium.cache")

# Request fields that never change the answer: how it is delivered, who asked, what is logged.
IGNORED = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier",
                     "prompt_cache_key", "safety_identifier"})
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")


@dataclass(frozen=True)
class CachePlan:
    """The policy's cache settings, resolved per route once per policy version."""

    default: CacheConfig | None
    routes: dict[str, CacheConfig | None]
    embedder: Any = None  # for semantic lookups (the router's static embedder), when any route uses them

    def for_route(self, route: str) -> CacheConfig | None:
        cfg = self.routes.get(route, self.default)
        return cfg if cfg is not None and cfg.enabled else None


def cache_plan(policy: Policy, dispatcher: Any = None) -> CachePlan | None:
    """None when neither the policy nor any route has a `cache:` section."""
    if policy.cache is None and all(r.cache is None for r in policy.routes):
        return None
    base = policy.cache
    routes: dict[str, CacheConfig | None] = {}
    for r in policy.routes:
        if r.cache is not None:
            routes[r.name] = (base or CacheConfig()).merged(r.cache)
        elif base is not None and (r.strategy == "cascade" or r.mode == "background"):
            routes[r.name] = None  # the cache serves single, interactive routes only
    embedder = None
    if any(c is not None and c.enabled and c.semantic is not None for c in [base, *routes.values()]):
        embedder = router_embedder(dispatcher)
    return CachePlan(base, routes, embedder)


def router_embedder(dispatcher: Any = None) -> Any:
    """The dispatcher's own embedder, else the shipped default artifact's."""
    emb = getattr(getattr(dispatcher, "artifact", None), "embedder", None)
    if emb is not None:
        return emb
    from concilium.router.embedder import StaticEmbedder
    from concilium.router.learned import DEFAULT_ARTIFACT

    return StaticEmbedder.load(DEFAULT_ARTIFACT)


def uncacheable(body: dict[str, Any], cfg: CacheConfig) -> str | None:
    """Why this request must not be cached (and is not looked up), or None."""
    n = body.get("n")
    if n is not None and n != 1:
        return "n"
    if body.get("tools") or body.get("functions"):
        return "tools"
    if not isinstance(body.get("messages"), list):
        return "messages"
    t = body.get("temperature")
    sampled = t is None or t > 0  # OpenAI's default temperature is 1
    if sampled and not cfg.sampled and body.get("seed") is None:
        return "temperature"
    return None


def _normal(body: dict[str, Any], drop_last_user: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in body.items():
        if k in IGNORED or v is None:
            continue
        if k == "n" and v == 1:
            continue
        if k in _FLOATS and isinstance(v, int | float) and not isinstance(v, bool):
            v = float(v)
        elif k == "stop" and isinstance(v, str):
            v = [v]
        elif k == "messages":
            v = [{mk: mv for mk, mv in m.items() if mv is not None} if isinstance(m, dict) else m for m in v]
            if drop_last_user and v and isinstance(v[-1], dict):
                v[-1] = {mk: mv for mk, mv in v[-1].items() if mk != "content"}
        out[k] = v
    return out


def _digest(route: str, ns: str, obj: Any) -> str:
    h = hashlib.sha256(route.encode() + b"\0" + ns.encode() + b"\0")
    h.update(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS))
    return h.hexdigest()


def exact_key(body: dict[str, Any], route: str, ns: str) -> str:
    """The hash a request is stored and looked up under (route and namespace included)."""
    return _digest(route, ns, _normal(body))


_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def prompt_numbers(text: str) -> list[str]:
    """The numbers written in a prompt, in order: a semantic hit needs the same ones (the same GSM8K
    problem with other numbers is another question, however similar its embedding)."""
    return _NUMBER.findall(text)


_WORD = re.compile(r"[^\W\d_]{4,}")


def prompt_words(text: str) -> frozenset[str]:
    """The words (4+ letters, lowercased) of a prompt."""
    return frozenset(w.lower() for w in _WORD.findall(text))


def _one_edit(a: str, b: str) -> bool:
    """Damerau distance <= 1 (a typo: one letter changed, added, dropped, or two swapped)."""
    if abs(len(a) - len(b)) > 1:
        return False
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return (a[i + 1:] == b[i + 1:] or a[i + 1:] == b[i:] or a[i:] == b[i + 1:]
            or (a[i:i + 2] == b[i:i + 2][::-1] and a[i + 2:] == b[i + 2:]))


def same_words(a: frozenset[str], b: frozenset[str], max_typos: int = 2) -> bool:
    """Do two prompts use the same words, but for up to `max_typos` typos? An embedding cannot tell
    "a poem about cats" from "a poem about dogs"; this can."""
    da, db = a - b, b - a
    if len(da) > max_typos or len(db) > max_typos:
        return False
    # a word on one side only is a typo of a word on the other (which may also be spelt right elsewhere)
    return all(any(_one_edit(x, y) for y in b) for x in da) and all(any(_one_edit(y, x) for x in a) for y in db)


def semantic_parts(body: dict[str, Any], route: str, ns: str) -> tuple[str, str] | None:
    """(bucket, text): everything but the last user message's text, and that text's numbers, hashed;
    and that text. None when the conversation does not end with a user message that has text."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    text = content_text(last.get("content")).strip()
    if not text:
        return None
    return _digest(route, ns, {"semantic": _normal(body, drop_last_user=True), "numbers": prompt_numbers(text)}), text


@dataclass
class Found:
    value: bytes
    similarity: float | None = None  # None: an exact hit


# ------------------------------------------------------------------------------------ stores


class _RouteEntries:
    def __init__(self) -> None:
        self.entries: OrderedDict[str, tuple[float, bytes, str | None]] = OrderedDict()
        self.buckets: dict[str, dict[str, tuple[np.ndarray, frozenset[str]]]] = {}

    def drop(self, key: str) -> None:
        item = self.entries.pop(key, None)
        if item is not None and item[2] is not None:
            bucket = self.buckets.get(item[2])
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self.buckets[item[2]]


class MemoryStore:
    """In process: per route, at most `max_entries` (least recently used go first), each for `ttl_s`."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self._routes: dict[str, _RouteEntries] = {}

    def _route(self, route: str) -> _RouteEntries:
        r = self._routes.get(route)
        if r is None:
            r = self._routes[route] = _RouteEntries()
        return r

    def size(self, route: str) -> int:
        return len(self._route(route).entries)

    async def get(self, route: str, key: str) -> bytes | None:
        r = self._route(route)
        item = r.entries.get(key)
        if item is None:
            return None
        if item[0] <= self.clock():
            r.drop(key)
            return None
        r.entries.move_to_end(key)
        return item[1]

    async def nearest(self, route: str, bucket: str, vec: np.ndarray, threshold: float,
                      words: frozenset[str]) -> Found | None:
        r = self._route(route)
        cands = r.buckets.get(bucket)
        if not cands:
            return None
        keys = list(cands)
        sims = np.stack([cands[k][0] for k in keys]) @ vec
        for i in np.argsort(-sims):
            if sims[i] < threshold:
                return None
            if not same_words(words, cands[keys[i]][1]):
                continue
            value = await self.get(route, keys[i])
            if value is not None:
                return Found(value, float(sims[i]))
        return None

    async def put(self, route: str, key: str, value: bytes, cfg: CacheConfig, bucket: str | None = None,
                  vec: np.ndarray | None = None, words: frozenset[str] = frozenset()) -> None:
        r = self._route(route)
        r.drop(key)
        r.entries[key] = (self.clock() + cfg.ttl_s, value, bucket if vec is not None else None)
        if bucket is not None and vec is not None:
            r.buckets.setdefault(bucket, {})[key] = (np.asarray(vec, dtype=np.float32), words)
        while len(r.entries) > cfg.max_entries:
            r.drop(next(iter(r.entries)))

    async def close(self) -> None:
        self._routes.clear()


class RedisStore:
    """In Redis (CONCILIUM_REDIS_URL): shared by every gateway replica. Each value is SET with EX
    `ttl_s`; a sorted set per route (by store time) trims the route to `max_entries`; a semantic
    bucket is a hash key -> vector that expires with its newest entry."""

    PREFIX = "concilium:cache:"

    def __init__(self, url: str) -> None:
        from concilium.core.redis import connect

        self.client = connect(url, timeout_s=2.0)

    def _k(self, route: str, key: str) -> str:
        return f"{self.PREFIX}v:{route}:{key}"

    async def get(self, route: str, key: str) -> bytes | None:
        return await self.client.get(self._k(route, key))

    async def nearest(self, route: str, bucket: str, vec: np.ndarray, threshold: float,
                      words: frozenset[str]) -> Found | None:
        hkey = f"{self.PREFIX}s:{route}:{bucket}"
        raw = await self.client.hgetall(hkey)
        if not raw:
            return None
        keys = [k.decode() for k in raw]
        n = vec.shape[0] * 4  # a field is the float32 vector, then the prompt's words
        vals = list(raw.values())
        sims = np.stack([np.frombuffer(v[:n], dtype=np.float32) for v in vals]) @ vec
        for i in np.argsort(-sims):
            if sims[i] < threshold:
                return None
            if not same_words(words, frozenset(vals[i][n:].decode().split())):
                continue
            value = await self.get(route, keys[i])
            if value is not None:
                return Found(value, float(sims[i]))
            await self.client.hdel(hkey, keys[i])  # expired
        return None

    async def put(self, route: str, key: str, value: bytes, cfg: CacheConfig, bucket: str | None = None,
                  vec: np.ndarray | None = None, words: frozenset[str] = frozenset()) -> None:
        ttl = max(1, int(np.ceil(cfg.ttl_s * 1000)))
        idx = f"{self.PREFIX}i:{route}"
        p = self.client.pipeline(transaction=False)
        p.set(self._k(route, key), value, px=ttl)
        p.zadd(idx, {key: time.time()})
        if bucket is not None and vec is not None:
            hkey = f"{self.PREFIX}s:{route}:{bucket}"
            p.hset(hkey, key, np.asarray(vec, dtype=np.float32).tobytes() + " ".join(sorted(words)).encode())
            p.pexpire(hkey, ttl)
        p.zcard(idx)
        *_, count = await p.execute()
        if count > cfg.max_entries:
            old = await self.client.zpopmin(idx, count - cfg.max_entries)
            if old:
                await self.client.delete(*(self._k(route, k.decode()) for k, _ in old))

    async def close(self) -> None:
        await self.client.aclose()


def open_store(redis_url: str | None) -> MemoryStore | RedisStore:
    return RedisStore(redis_url) if redis_url else MemoryStore()
