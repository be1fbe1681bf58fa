"""Where a job's coroutine runs: a Celery task thread hands it to an asyncio loop and waits.

- In a worker process (`concilium worker`, Redis), each process has its own loop thread, its own
  Redis store and its own providers, built from the policy file and rebuilt when the file changes.
- In the embedded mode, the loop is the gateway's own, with the gateway's providers (a local model
  is loaded once) and the in-memory store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any

from concilium.gateway.state import Snapshot
from concilium.policy.loader import PolicyError, load_policy
from concilium.policy.schema import Policy
from concilium.specialists.call import CallContext
from concilium.specialists.health import CircuitBreaker
from concilium.specialists.registry import Registry
from concilium.workers.config import JobsEnv
from concilium.workers.runner import JobRunner, RunResult
from concilium.workers.store import JobStore

log = logging.getLogger("concilium.workers")


class PolicySnapshots:
    """A worker's providers for the policy file, rebuilt (keeping unchanged providers) on change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.breaker = CircuitBreaker()
        self._snap: Snapshot | None = None
        self._mtime = 0.0
        self._version = 0
        self._lock: asyncio.Lock | None = None  # one (re)load at a time: the warm-up and a first job share it

    def _stat(self) -> float:
        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return self._mtime

    def build(self, policy: Policy) -> Snapshot:
        registry = Registry.build(policy, self._snap.registry if self._snap else None)
        self.breaker.configure(policy.circuit_breaker.failures, policy.circuit_breaker.cooldown_s)
        ctx = CallContext(providers=registry.get, breaker=self.breaker, retry=policy.retry)
        self._version += 1
        return Snapshot(policy, registry, None, ctx, self._version)

    async def current(self) -> Snapshot:
        mtime = self._stat()
        if self._snap is not None and mtime == self._mtime:
            return self._snap
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._snap is not None and self._stat() == self._mtime:
                return self._snap  # loaded by whoever held the lock
            return await self._reload(mtime)

    async def _reload(self, mtime: float) -> Snapshot:
        try:
            policy = await asyncio.to_thread(load_policy, self.path)
        except PolicyError as e:
            if self._snap is None:
                raise
            log.error("policy reload refused, keeping version %d:\n%s", self._snap.version, e)
            self._mtime = mtime
            return self._snap
        new = self.build(policy)
        await new.registry.start_all()  # published only once its providers (a local model) are up
        old, self._snap, self._mtime = self._snap, new, mtime
        if old is not None:
            retired = old.registry.retired(self._snap.registry)
            await asyncio.gather(*(p.close() for p in retired), return_exceptions=True)
        return self._snap

    def cost_usd(self, model: str, usage: dict | None) -> float | None:
        """Price of a usage under the policy file as it is now (no providers started)."""
        try:
            snap = self._snap or self.build(load_policy(self.path))
        except PolicyError:
            return None
        return snap.cost_usd(model, usage) if model in snap.policy.models else None


class Runtime:
    """Runs job coroutines on `loop` for callers in other threads (Celery's pool)."""

    def __init__(self, store: JobStore, runner: JobRunner, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.runner = runner
        self.loop = loop
        self._running: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()

    def call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        with self._lock:
            self._running.add(fut)
        try:
            return fut.result()
        finally:
            with self._lock:
                self._running.discard(fut)

    def execute(self, job_id: str, worker: str) -> RunResult:
        return self.call(self.runner.run(job_id, worker))

    def cancel_all(self) -> None:
        """Stop every job coroutine (the hosting process is going away)."""
        with self._lock:
            for fut in self._running:
                fut.cancel()


class ProcessRuntime(Runtime):
    """A worker process's runtime: a loop thread, a Redis store and providers from the policy file."""

    def __init__(self, policy_path: str, redis_url: str, env: JobsEnv, can_kill: bool) -> None:
        from concilium.workers.store_redis import RedisJobStore

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="concilium-jobs-loop", daemon=True).start()
        self.snapshots = PolicySnapshots(policy_path)
        store = RedisJobStore(redis_url, env.key_prefix, env.redis_retry_s)
        runner = JobRunner(store, env, self.snapshots.current, can_kill)
        super().__init__(store, runner, loop)


_installed: Runtime | None = None
_installed_pid = 0
_install_lock = threading.Lock()


def install(rt: Runtime | None) -> None:
    """Use `rt` for this process's jobs (the embedded mode installs the gateway's)."""
    global _installed, _installed_pid
    _installed, _installed_pid = rt, os.getpid()


def installed() -> Runtime | None:
    return _installed if _installed_pid == os.getpid() else None


def current() -> Runtime:
    """This process's runtime; a worker process (or a forked pool child) builds its own on first use."""
    global _installed, _installed_pid
    rt = installed()
    if rt is not None:
        return rt
    with _install_lock:
        if installed() is None:
            from billiard.process import current_process

            from concilium.settings import Settings

            settings = Settings()
            if not settings.redis_url:
                raise RuntimeError("no job runtime: set CONCILIUM_REDIS_URL for worker processes")
            can_kill = current_process().name != "MainProcess"  # a prefork pool child
            install(ProcessRuntime(settings.policy, settings.redis_url, JobsEnv(), can_kill))
        return _installed  # type: ignore[return-value]
