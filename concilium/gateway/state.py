"""The gateway's live state: one immutable snapshot per policy version, swapped atomically on reload.

A request takes the current snapshot when it starts and keeps it to the end, so a reload never
changes a request in flight; providers that a new policy no longer uses are closed after a grace
period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

from concilium.policy.loader import PolicyError, load_policy
from concilium.policy.schema import Policy
from concilium.core.plan import RoutePlan
from concilium.specialists.call import CallContext
from concilium.specialists.health import CircuitBreaker
from concilium.specialists.registry import Registry

log = logging.getLogger("concilium.gateway")
RETIRE_GRACE_S = 120.0


def load_dispatcher(policy: Policy) -> Any:
    """The learned dispatcher for this policy, or None (rules only)."""
    if not policy.router.learned:
        return None
    try:
        from concilium.router.learned import load_dispatcher as _load
    except ImportError:
        return None
    try:
        return _load(policy.router, policy)
    except Exception as e:  # a broken artifact must not take the gateway down
        log.warning("learned router disabled: %s", e)
        return None


@dataclass(frozen=True)
class Snapshot:
    policy: Policy
    registry: Registry
    dispatcher: Any
    ctx: CallContext
    version: int

    def availability(self, model: str) -> str | None:
        return self.registry.unavailable_reason(model) or self.ctx.breaker.open_reason(model)

    def unsupported(self, model: str, body: dict[str, Any]) -> tuple[str, str] | None:
        return self.registry.unsupported(model, body)

    def context_limit(self, model: str) -> int | None:
        return self.registry.context_limit(model)

    def cost_usd(self, model: str, usage: dict | None) -> float | None:
        if not usage:
            return None
        price = self.policy.models[model].price
        return ((usage.get("prompt_tokens") or 0) * price.input
                + (usage.get("completion_tokens") or 0) * price.output) / 1e6


class GatewayState:
    def __init__(self, policy_path: str, metrics: Any = None) -> None:
        self.policy_path = policy_path
        self.metrics = metrics
        self.breaker = CircuitBreaker()
        self._mtime = 0.0
        self._version = 0
        self.current: Snapshot = self._build(load_policy(policy_path), None)
        self._mtime = self._stat()
        self._tasks: list[asyncio.Task] = []

    def _stat(self) -> float:
        try:
            return os.stat(self.policy_path).st_mtime
        except OSError:
            return 0.0

    def _build(self, policy: Policy, previous: Snapshot | None) -> Snapshot:
        registry = Registry.build(policy, previous.registry if previous else None)
        self.breaker.configure(policy.circuit_breaker.failures, policy.circuit_breaker.cooldown_s)

        def on_error(model: str, err: Any) -> None:
            if self.metrics is not None:
                self.metrics.upstream_errors.labels(model, err.code or "error").inc()

        ctx = CallContext(providers=registry.get, breaker=self.breaker, retry=policy.retry,
                          on_attempt_error=on_error)
        self._version += 1
        return Snapshot(policy, registry, load_dispatcher(policy), ctx, self._version)

    async def start(self) -> None:
        await self.current.registry.start_all()

    def start_background(self, watch_s: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload("SIGHUP")))
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        if watch_s > 0:
            self._tasks.append(asyncio.ensure_future(self._watch(watch_s)))

    async def _watch(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            m = self._stat()
            if m and m != self._mtime:
                await self.reload("file change")

    async def reload(self, why: str = "request") -> bool:
        """Load the policy file again; on any error keep the running policy and log why."""
        self._mtime = self._stat()
        try:
            policy = await asyncio.to_thread(load_policy, self.policy_path)
            snap = await asyncio.to_thread(self._build, policy, self.current)
            await snap.registry.start_all()
        except PolicyError as e:
            log.error("policy reload (%s) refused, keeping version %d:\n%s", why, self.current.version, e)
            if self.metrics is not None:
                self.metrics.policy_reloads.labels("refused").inc()
            return False
        old, self.current = self.current, snap
        log.info("policy reloaded (%s): version %d", why, snap.version)
        if self.metrics is not None:
            self.metrics.policy_reloads.labels("ok").inc()
        retired = old.registry.retired(snap.registry)
        if retired:
            self._tasks.append(asyncio.ensure_future(self._close_later(retired)))
        return True

    async def _close_later(self, providers: list) -> None:
        await asyncio.sleep(RETIRE_GRACE_S)
        await asyncio.gather(*(p.close() for p in providers), return_exceptions=True)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.current.registry.close_all()


def header_value(text: str) -> str:
    """`text` as an HTTP header value: printable ASCII stays as it is, every other character and '%'
    itself become percent-encoded UTF-8 (RFC 3986), so `urllib.parse.unquote` gives `text` back.
    Header values are bytes on the wire: a name such as 'défaut-🚀' cannot go out raw."""
    if text.isascii() and text.isprintable() and "%" not in text:
        return text  # every name in a typical policy: no copy
    return "".join(ch if " " <= ch <= "~" and ch != "%" else
                   "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")) for ch in text)


def plan_headers(plan: RoutePlan, model: str | None = None) -> dict[str, str]:
    """The x-concilium-* headers of a planned request; names are encoded with `header_value`."""
    return {
        "x-request-id": plan.request_id,
        "x-concilium-model": header_value(model or (plan.candidates[0].model if plan.candidates else "")),
        "x-concilium-route": header_value(plan.route),
        "x-concilium-reason": header_value(plan.summary),
    }
