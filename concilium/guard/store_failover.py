"""Redis with an in-process fallback, so that a Redis outage never stops interactive traffic.

While Redis is unreachable each replica enforces limits on its own: budgets start from the last spend
it saw in Redis (so one replica alone still never overspends; N replicas together may spend up to N
times what was left), and rate limits count this replica's requests only. Every charge settled while
Redis is down is queued and written to Redis once it is back, so no acknowledged spend is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import replace

from concilium.guard.store import Charge, Denied, ScopeUsage, StoreUnavailable, Window
from concilium.guard.store_memory import MemoryStore
from concilium.guard.store_redis import RedisStore

log = logging.getLogger("concilium.guard")
MAX_PENDING = 100_000


class FailoverStore:
    def __init__(self, primary: RedisStore, retry_every_s: float = 1.0) -> None:
        self.primary = primary
        self.local = MemoryStore()
        self.retry_every_s = retry_every_s
        self.down_until = 0.0
        self.down_reason: str | None = None
        self.pending: deque[tuple[str, list[Charge], Window]] = deque(maxlen=MAX_PENDING)
        self._flushing = False
        self._local_rids: set[str] = set()
        self._probe: asyncio.Task | None = None

    @property
    def degraded(self) -> bool:
        return self.down_reason is not None

    def _down(self, e: StoreUnavailable) -> None:
        if self.down_reason is None:
            log.warning("limits store down, enforcing limits in this process until it is back: %s", e)
        self.down_reason = str(e)
        self.down_until = time.monotonic() + self.retry_every_s
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Notice the store coming back even when no request arrives, and replay what is pending."""
        while self.down_reason is not None:
            await asyncio.sleep(max(self.retry_every_s, 0.05))
            try:
                await self.primary.ping()
            except StoreUnavailable:
                continue
            self._up()

    def _up(self) -> None:
        if self.down_reason is not None:
            log.warning("limits store is back; replaying %d charges", len(self.pending))
        self.down_reason = None
        if self.pending and not self._flushing:
            asyncio.ensure_future(self.flush())

    def _local_caps(self, charges: list[Charge], w: Window) -> list[Charge]:
        out = []
        for c in charges:
            day, sd, sm = self.primary.last_spent.get(c.scope, ("", 0, 0))
            sd = sd if day == w.day else 0
            out.append(replace(c, cap_day=None if c.cap_day is None else c.cap_day - sd,
                               cap_month=None if c.cap_month is None else c.cap_month - sm))
        return out

    async def reserve(self, rid: str, charges: list[Charge], ttl_s: float, w: Window) -> Denied | None:
        if time.monotonic() >= self.down_until:
            try:
                out = await self.primary.reserve(rid, charges, ttl_s, w)
            except StoreUnavailable as e:
                self._down(e)
            else:
                self._up()
                return out
        self._local_rids.add(rid)
        return self.local.reserve_now(rid, self._local_caps(charges, w), ttl_s, w)

    async def settle(self, rid: str, charges: list[Charge], w: Window) -> None:
        if rid in self._local_rids:
            self._local_rids.discard(rid)
            self.local.settle_now(rid, charges, w)
            self.pending.append((rid, charges, w))
            if not self.degraded and not self._flushing:
                asyncio.ensure_future(self.flush())
            return
        try:
            await self.primary.settle(rid, charges, w)
        except StoreUnavailable as e:
            self._down(e)
            self.local.settle_now(rid, charges, w)
            self.pending.append((rid, charges, w))

    async def flush(self) -> None:
        """Write the charges settled during an outage to Redis (oldest first)."""
        self._flushing = True
        try:
            while self.pending:
                rid, charges, w = self.pending[0]
                try:
                    await self.primary.settle(rid, charges, w)
                except StoreUnavailable as e:
                    self._down(e)
                    return
                self.pending.popleft()
            self.local.clear_spend()  # it is all in Redis now
        finally:
            self._flushing = False

    async def usage(self, scope: str, rpm: int | None, tpm: int | None, w: Window) -> ScopeUsage:
        if time.monotonic() >= self.down_until:
            try:
                out = await self.primary.usage(scope, rpm, tpm, w)
            except StoreUnavailable as e:
                self._down(e)
            else:
                self._up()
                return out
        u = await self.local.usage(scope, rpm, tpm, w)
        day, sd, sm = self.primary.last_spent.get(scope, ("", 0, 0))
        return replace(u, spent_day=u.spent_day + (sd if day == w.day else 0), spent_month=u.spent_month + sm)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        if self.pending:
            try:
                await self.flush()
            except Exception:
                pass
        await self.primary.close()
