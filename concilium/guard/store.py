"""What a limits store does, and the values it trades in.

A store keeps, per scope (a key, a team, a model): spend per UTC day and month, the reservations of
requests in flight, and two token buckets (requests/min, tokens/min). `reserve` checks every scope
of a request and either takes a reservation in all of them or in none; `settle` turns a reservation
into the actual charge. Money is counted in integer nano-USD so sums are exact.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from typing import Protocol

NANO = 1_000_000_000


class StoreUnavailable(Exception):
    """The shared store cannot be reached (Redis down)."""


@dataclass(frozen=True)
class Charge:
    scope: str  # "key:alice", "team:research", "model:gpt-4o", "key-model:alice/gpt-4o"
    nano: int  # reserve: the maximum cost; settle: the actual cost
    tokens: int  # reserve: tokens to count now; settle: correction (actual - counted), may be < 0
    cap_day: int | None = None  # nano-USD
    cap_month: int | None = None
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class Denied:
    scope: str
    reason: str  # usd_per_day | usd_per_month | requests_per_min | tokens_per_min
    limit: float
    retry_after_s: float


@dataclass(frozen=True)
class ScopeUsage:
    spent_day: int = 0
    spent_month: int = 0
    reserved: int = 0
    requests_left: float | None = None
    tokens_left: float | None = None


@dataclass(frozen=True)
class Window:
    now: float
    day: str  # 2026-11-23 (UTC)
    month: str  # 2026-11

    @classmethod
    def at(cls, now: float | None = None) -> Window:
        now = time.time() if now is None else now
        t = time.gmtime(now)
        return cls(now, f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}", f"{t.tm_year:04d}-{t.tm_mon:02d}")

    def seconds_to_day_end(self) -> float:
        return 86400.0 - (self.now % 86400.0)

    def seconds_to_month_end(self) -> float:
        t = time.gmtime(self.now)
        days = calendar.monthrange(t.tm_year, t.tm_mon)[1]
        return (days - t.tm_mday) * 86400.0 + self.seconds_to_day_end()


def bucket(level: float | None, stamp: float | None, cap: int, now: float) -> float:
    """A token bucket's level now: it refills at cap per minute up to cap (a new bucket is full)."""
    if level is None or stamp is None:
        return float(cap)
    return min(float(cap), level + max(0.0, now - stamp) * cap / 60.0)


class Store(Protocol):
    async def reserve(self, rid: str, charges: list[Charge], ttl_s: float, w: Window) -> Denied | None: ...

    async def settle(self, rid: str, charges: list[Charge], w: Window) -> None: ...

    async def usage(self, scope: str, rpm: int | None, tpm: int | None, w: Window) -> ScopeUsage: ...

    async def close(self) -> None: ...
