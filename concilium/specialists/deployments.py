"""Several replicas (deployments) behind one model name: pick the least loaded healthy one.

Each deployment counts its requests in flight; a call goes to the one with the fewest per unit of
weight (ties take turns). A deployment is out while its circuit is open (`failures` consecutive
failed calls open it for `cooldown_s`, then one trial call may close it) or while its health probe
(GET {base_url}/models every `check_s`) fails. A call that fails on one deployment is tried on the
next before the model itself is said to have failed, so the plan's next model is tried only once
every deployment of this one has been.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from concilium.policy.schema import Deployment, DeploymentHealth

log = logging.getLogger("concilium.providers")


@dataclass(eq=False)
class Replica:
    spec: Deployment
    index: int
    key_env: str | None
    in_flight: int = 0
    failures: int = 0  # consecutive failed calls
    open_until: float = 0.0  # circuit open until this monotonic time
    trial: bool = False  # a half-open trial call is in flight
    healthy: bool = True  # the last health probe answered
    why: str | None = None  # the last failure, for messages
    served: int = field(default=0)

    @property
    def url(self) -> str:
        return self.spec.base_url.rstrip("/")

    def api_key(self) -> str | None:
        return os.environ.get(self.key_env) if self.key_env else None

    def label(self) -> str:
        return f"deployment {self.index} ({self.url})"


class Balancer:
    def __init__(self, deployments: list[Deployment], health: DeploymentHealth, key_env: str | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.replicas = [Replica(d, i, d.api_key_env or key_env) for i, d in enumerate(deployments)]
        self.health = health
        self.clock = clock
        self._turn = itertools.count()
        self._probe: asyncio.Task | None = None

    # -- choosing
    def usable(self, r: Replica, now: float) -> bool:
        if not r.healthy:
            return False
        if r.open_until > now:
            return False
        return not (r.open_until and r.trial)  # half-open: one trial call at a time

    def pick(self, exclude: set[Replica] | frozenset = frozenset()) -> Replica | None:
        """The usable deployment with the fewest requests in flight per unit of weight, or None."""
        now = self.clock()
        live = [r for r in self.replicas if r not in exclude and self.usable(r, now)]
        if not live:
            return None
        turn = next(self._turn)
        n = len(self.replicas)
        best = min(live, key=lambda r: ((r.in_flight + 1) / r.spec.weight, (r.index - turn) % n))
        if best.open_until:
            best.trial = True
        return best

    def unavailable(self) -> str:
        now = self.clock()
        parts = []
        for r in self.replicas:
            if not r.healthy:
                parts.append(f"{r.label()}: health check failed ({r.why or 'no answer'})")
            elif r.open_until > now:
                parts.append(f"{r.label()}: circuit open for {r.open_until - now:.0f}s more ({r.why})")
        return "; ".join(parts) or "no deployment is usable"

    def missing_keys(self) -> str | None:
        """Why no deployment can be called for want of an API key, or None."""
        envs = [r.key_env for r in self.replicas]
        if envs and all(e and not os.environ.get(e) for e in envs):
            return f"{', '.join(sorted(set(envs)))} is not set"  # type: ignore[arg-type]
        return None

    # -- outcomes
    def started(self, r: Replica) -> None:
        r.in_flight += 1

    def finished(self, r: Replica, ok: bool | None, why: str | None = None) -> None:
        """`ok`: the call succeeded (True), failed on this deployment (False), or said nothing about
        it (None: the request itself was refused, or the client left)."""
        r.in_flight -= 1
        r.trial = False
        if ok is None:
            return
        if ok:
            r.failures, r.open_until, r.served = 0, 0.0, r.served + 1
            return
        r.failures += 1
        r.why = why
        if r.failures >= self.health.failures:
            r.open_until = self.clock() + self.health.cooldown_s
            log.warning("%s taken out for %gs after %d failures: %s", r.label(), self.health.cooldown_s,
                        r.failures, why)

    # -- health probes
    def start_probes(self, session: Callable[[], Any]) -> None:
        if self.health.check_s is not None and self._probe is None:
            self._probe = asyncio.ensure_future(self._probe_loop(session))

    async def stop_probes(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except (asyncio.CancelledError, Exception):
                pass
            self._probe = None

    async def probe(self, session: Any) -> None:
        import aiohttp

        async def one(r: Replica) -> None:
            headers = {"authorization": f"Bearer {k}"} if (k := r.api_key()) else {}
            try:
                async with session.get(r.url + "/models", headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=self.health.check_timeout_s)) as resp:
                    ok, why = resp.status < 500, f"GET /models answered {resp.status}"
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                ok, why = False, type(e).__name__
            if ok != r.healthy:
                log.warning("%s is %s", r.label(), "healthy again" if ok else f"unhealthy: {why}")
            r.healthy = ok
            if not ok:
                r.why = why

        await asyncio.gather(*(one(r) for r in self.replicas))

    async def _probe_loop(self, session: Callable[[], Any]) -> None:
        assert self.health.check_s is not None
        while True:
            try:
                await self.probe(session())
            except Exception as e:  # a probe must never stop the loop
                log.warning("deployment health probe failed: %s", e)
            await asyncio.sleep(self.health.check_s)
