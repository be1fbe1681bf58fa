"""The limits store in this process, for a gateway without Redis (and while Redis is down).

All work happens synchronously between two awaits, so on one event loop every reserve and settle is
atomic. It holds one process's view only: several replicas need the Redis store.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from concilium.guard.store import Charge, Denied, ScopeUsage, Window, bucket

IN_FLIGHT_RETRY_S = 1.0  # budget denied only because of requests in flight: they settle soon


@dataclass
class _Scope:
    spend: dict[str, int] = field(default_factory=dict)  # "d:2026-11-23" / "m:2026-11" -> nano
    reservations: dict[str, tuple[int, float]] = field(default_factory=dict)  # rid -> (nano, expires)
    reserved: int = 0
    rq: tuple[float, float] | None = None  # (level, stamp)
    tk: tuple[float, float] | None = None


def check_budget(c: Charge, spent_day: int, spent_month: int, reserved: int, w: Window) -> Denied | None:
    for reason, cap, spent, to_end in (("usd_per_day", c.cap_day, spent_day, w.seconds_to_day_end()),
                                       ("usd_per_month", c.cap_month, spent_month, w.seconds_to_month_end())):
        if cap is not None and spent + reserved + c.nano > cap:
            wait = IN_FLIGHT_RETRY_S if spent + c.nano <= cap else to_end
            return Denied(c.scope, reason, cap / 1e9, wait)
    return None


class MemoryStore:
    def __init__(self) -> None:
        self._scopes: dict[str, _Scope] = {}
        self._gc_day = ""

    def _scope(self, name: str) -> _Scope:
        s = self._scopes.get(name)
        if s is None:
            s = self._scopes[name] = _Scope()
        return s

    def _expire(self, s: _Scope, now: float) -> None:
        if s.reservations and s.reserved:
            for rid, (nano, until) in list(s.reservations.items()):
                if until <= now:
                    del s.reservations[rid]
                    s.reserved -= nano

    def _forget_old_windows(self, w: Window) -> None:
        if self._gc_day == w.day:
            return
        self._gc_day = w.day
        keep = {"d:" + w.day, "m:" + w.month}
        for s in self._scopes.values():
            for k in [k for k in s.spend if k not in keep]:
                del s.spend[k]

    async def reserve(self, rid: str, charges: list[Charge], ttl_s: float, w: Window) -> Denied | None:
        return self.reserve_now(rid, charges, ttl_s, w)

    def reserve_now(self, rid: str, charges: list[Charge], ttl_s: float, w: Window) -> Denied | None:
        self._forget_old_windows(w)
        now = w.now
        levels = []
        for c in charges:  # check everything first: all scopes or none
            s = self._scope(c.scope)
            self._expire(s, now)
            rq = tk = None
            if c.rpm:
                rq = bucket(*(s.rq or (None, None)), c.rpm, now)
                if rq < 1.0:
                    return Denied(c.scope, "requests_per_min", c.rpm, (1.0 - rq) * 60.0 / c.rpm)
            if c.tpm:
                tk = bucket(*(s.tk or (None, None)), c.tpm, now)
                if tk <= 0.0:
                    return Denied(c.scope, "tokens_per_min", c.tpm, (1.0 - tk) * 60.0 / c.tpm)
            denied = check_budget(c, s.spend.get("d:" + w.day, 0), s.spend.get("m:" + w.month, 0),
                                  s.reserved, w)
            if denied:
                return denied
            levels.append((s, rq, tk))
        for c, (s, rq, tk) in zip(charges, levels, strict=True):
            if rq is not None:
                s.rq = (rq - 1.0, now)
            if tk is not None:
                s.tk = (tk - c.tokens, now)
            if c.nano and rid not in s.reservations:
                s.reservations[rid] = (c.nano, now + ttl_s)
                s.reserved += c.nano
        return None

    async def settle(self, rid: str, charges: list[Charge], w: Window) -> None:
        self.settle_now(rid, charges, w)

    def settle_now(self, rid: str, charges: list[Charge], w: Window) -> None:
        for c in charges:
            s = self._scope(c.scope)
            held = s.reservations.pop(rid, None)
            if held is not None:
                s.reserved -= held[0]
            if c.nano:
                for k in ("d:" + w.day, "m:" + w.month):
                    s.spend[k] = s.spend.get(k, 0) + c.nano
            if c.tpm and c.tokens:
                s.tk = (min(float(c.tpm), bucket(*(s.tk or (None, None)), c.tpm, w.now) - c.tokens), w.now)

    async def usage(self, scope: str, rpm: int | None, tpm: int | None, w: Window) -> ScopeUsage:
        s = self._scopes.get(scope) or _Scope()
        self._expire(s, w.now)
        return ScopeUsage(
            spent_day=s.spend.get("d:" + w.day, 0), spent_month=s.spend.get("m:" + w.month, 0),
            reserved=s.reserved,
            requests_left=bucket(*(s.rq or (None, None)), rpm, w.now) if rpm else None,
            tokens_left=bucket(*(s.tk or (None, None)), tpm, w.now) if tpm else None)

    def clear_spend(self) -> None:
        for s in self._scopes.values():
            s.spend.clear()

    async def close(self) -> None:
        return None
