"""The live policy: one immutable snapshot per policy version, swapped atomically on reload.

The same class serves the gateway (which watches the file in the background and reloads on SIGHUP)
and every worker process (which looks at the file before each job: `refresh`). A request or a job
takes the current snapshot when it starts and keeps it to the end, so a reload never changes work in
flight; providers that a new policy no longer uses are closed after a grace period, never while
work that started under the old policy may still use them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from concilium.pipeline.cache import cache_plan
from concilium.policy import pricing
from concilium.policy.loader import PolicyError, load_policy
from concilium.policy.schema import Policy
from concilium.specialists.call import CallContext
from concilium.specialists.health import CircuitBreaker
from concilium.specialists.registry import Registry

log = logging.getLogger("concilium.policy")
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
    cache: Any = None  # pipeline.cache.CachePlan, or None when the policy caches nothing

    def availability(self, model: str) -> str | None:
        return self.registry.unavailable_reason(model) or self.ctx.breaker.open_reason(model)

    def unsupported(self, model: str, body: dict[str, Any]) -> tuple[str, str] | None:
        return self.registry.unsupported(model, body)

    def context_limit(self, model: str) -> int | None:
        return self.registry.context_limit(model)

    def cost_usd(self, model: str, usage: dict | None, seconds: float | None = None) -> float | None:
        """What a finished call cost under this policy's prices (`seconds`: its wall time)."""
        spec = self.policy.models.get(model)
        return pricing.cost_usd(spec, usage, seconds) if spec is not None else None


class PolicyState:
    """`current` is the snapshot to use now. `metrics` (optional) counts reloads and upstream errors."""

    def __init__(self, policy_path: str, metrics: Any = None) -> None:
        self.policy_path = policy_path
        self.metrics = metrics
        self.breaker = CircuitBreaker()
        self._version = 0
        self._lock: asyncio.Lock | None = None  # one reload at a time (created on the serving loop)
        self._mtime = self._stat()
        self.current: Snapshot = self._build(self._load(), None)
        self._tasks: list[asyncio.Task] = []
        self._starting: tuple[Snapshot, asyncio.Future] | None = None
        # Why the file on disk is not the policy in force (the last reload was refused), else None.
        self.load_error: str | None = None

    def _stat(self) -> float:
        try:
            return os.stat(self.policy_path).st_mtime
        except OSError:
            return 0.0

    def _load(self) -> Policy:
        """The policy file, checked down to what only this layer can check (cascade scorers)."""
        from concilium.pipeline.cascade import check_strategies

        policy = load_policy(self.policy_path)
        check_strategies(policy, self.policy_path)
        return policy

    def _on_error(self) -> Callable[[str, Any], None] | None:
        if self.metrics is None:
            return None
        errors = self.metrics.upstream_errors
        return lambda model, err: errors.labels(model, err.code or "error").inc()

    def _build(self, policy: Policy, previous: Snapshot | None) -> Snapshot:
        registry = Registry.build(policy, previous.registry if previous else None)
        self.breaker.configure(policy.circuit_breaker.failures, policy.circuit_breaker.cooldown_s)
        ctx = CallContext(providers=registry.get, breaker=self.breaker, retry=policy.retry,
                          on_attempt_error=self._on_error())
        self._version += 1
        dispatcher = load_dispatcher(policy)
        return Snapshot(policy, registry, dispatcher, ctx, self._version, cache_plan(policy, dispatcher))

    async def start(self) -> None:
        """Start the current snapshot's providers, once: concurrent callers wait for the same start."""
        snap = self.current
        if self._starting is None or self._starting[0] is not snap:
            self._starting = (snap, asyncio.ensure_future(snap.registry.start_all()))
        await asyncio.shield(self._starting[1])

    def start_background(self, watch_s: float) -> None:
        """Reload on SIGHUP and, every `watch_s` seconds (0 = never), when the file changed."""
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
            await self.refresh()

    async def refresh(self) -> Snapshot:
        """The current snapshot, reloaded first if the file changed since the last load."""
        m = self._stat()
        if m and m != self._mtime:
            await self.reload("file change")
        return self.current

    async def reload(self, why: str = "request") -> bool:
        """Load the policy file again; on any error keep the running policy and log why."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await self._reload(why)

    async def _reload(self, why: str) -> bool:
        mtime = self._stat()
        if why == "file change" and mtime == self._mtime:
            return True  # loaded by the reload that held the lock
        self._mtime = mtime
        try:
            policy = await asyncio.to_thread(self._load)
            snap = await asyncio.to_thread(self._build, policy, self.current)
            await snap.registry.start_all()  # published only once its providers (a local model) are up
        except PolicyError as e:
            log.error("policy reload (%s) refused, keeping version %d:\n%s", why, self.current.version, e)
            self.load_error = str(e)
            self._count("refused")
            return False
        old, self.current, self.load_error = self.current, snap, None
        log.info("policy reloaded (%s): version %d", why, snap.version)
        self._count("ok")
        retired = old.registry.retired(snap.registry)
        if retired:
            self._tasks.append(asyncio.ensure_future(self._close_later(retired)))
        return True

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.policy_reloads.labels(outcome).inc()

    async def _close_later(self, providers: list) -> None:
        await asyncio.sleep(RETIRE_GRACE_S)
        await asyncio.gather(*(p.close() for p in providers), return_exceptions=True)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.current.registry.close_all()
