"""Who made each recent request: request id -> owner (the key's name), so that `/v1/feedback` only
scores answers that were given, and only the caller's own.

The last `size` ids are kept in process (an ordered dict: one insert per answered request). With
Redis configured, each id is also written there for `ttl_s`, in batches off the request path, so
feedback may reach any replica; a write that fails is logged and dropped (feedback for that id is
then refused, never a request).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import orjson

from concilium.core.batches import Batches
from concilium.core.plan import Decision
from concilium.core.redis import connect

log = logging.getLogger("concilium.gateway")
PREFIX = "concilium:rid:"
SIZE = 100_000
TTL_S = 7 * 86400.0


def _write_failed(e: Exception, lost: int) -> None:
    log.warning("%d recent request ids not written to Redis (%s): feedback on them will be refused",
                lost, type(e).__name__)


class RecentRequests:
    def __init__(self, redis_url: str | None = None, size: int = SIZE, ttl_s: float = TTL_S) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._redis = connect(redis_url) if redis_url else None
        self._writes: Batches[tuple[str, str]] = Batches(self._write, _write_failed)

    def add(self, rid: str, owner: str, decision: Any = None) -> None:
        """Record that `owner` ('' without keys) made request `rid` (called once per answered request);
        `decision`: the online router's, when it decided (what feedback on `rid` teaches it)."""
        ids = self._ids
        ids[rid] = owner if decision is None else (owner, decision)
        if len(ids) > self.size:
            ids.popitem(last=False)
        if self._redis is not None:
            value = owner if decision is None else orjson.dumps({"o": owner, "d": decision.model_dump()}).decode()
            self._writes.add((rid, value))

    async def _write(self, batch: list[tuple[str, str]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for rid, value in batch:
            pipe.set(PREFIX + rid, value, ex=int(self.ttl_s))
        await pipe.execute()

    async def flushed(self) -> None:
        """Wait until every id added so far is written (tests, shutdown)."""
        await self._writes.flushed()

    async def _get(self, rid: str) -> str | tuple[str, Any] | None:
        got = self._ids.get(rid)
        if got is None and self._redis is not None:
            value = await self._redis.get(PREFIX + rid)
            if value is not None and value.startswith(b"{"):  # owner and decision (key names never start so)
                obj = orjson.loads(value)
                got = (obj["o"], Decision.model_validate(obj["d"]))
            elif value is not None:
                got = value.decode()
        return got

    async def owner(self, rid: str) -> str | None:
        """Who made `rid`, or None when it is not a recent request. Raises when Redis cannot say."""
        got = await self._get(rid)
        return got[0] if isinstance(got, tuple) else got

    async def decision(self, rid: str) -> Any:
        """The online router's decision for `rid` (a Decision), or None."""
        got = await self._get(rid)
        return got[1] if isinstance(got, tuple) else None

    async def close(self) -> None:
        if self._redis is not None:
            try:
                await asyncio.wait_for(self.flushed(), 2.0)
            except (TimeoutError, Exception):
                pass
            await self._redis.aclose()
