"""Where a job's coroutine runs: a Celery task thread hands it to an asyncio loop and waits.

- In a worker process (`concilium worker`, Redis), each process has its own loop thread, its own
  Redis store and its own `PolicyState` (the gateway's class), looked at before each job and
  reloaded when the file changed.
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

from concilium.pipeline.state import PolicyState, Snapshot
from concilium.workers.config import JobsEnv, process_settings
from concilium.workers.runner import JobRunner, RunResult
from concilium.workers.store import JobStore

log = logging.getLogger("concilium.workers")


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
    """A worker process's runtime: a loop thread, a Redis store and the policy file's state."""

    def __init__(self, policy_path: str, redis_url: str, env: JobsEnv, can_kill: bool) -> None:
        from concilium.workers.store_redis import RedisJobStore

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="concilium-jobs-loop", daemon=True).start()
        self.policy = PolicyState(policy_path)  # raises PolicyError for a broken file
        store = RedisJobStore(redis_url, env.key_prefix, env.redis_retry_s)
        runner = JobRunner(store, env, self.snapshot, can_kill)
        super().__init__(store, runner, loop)

    async def snapshot(self) -> Snapshot:
        """The policy for the next job: providers started (a local model loads once; whoever comes
        first waits for it), the file looked at again."""
        await self.policy.start()
        return await self.policy.refresh()


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

            settings, env = process_settings()
            if not settings.redis_url:
                raise RuntimeError("no job runtime: set CONCILIUM_REDIS_URL for worker processes")
            can_kill = current_process().name != "MainProcess"  # a prefork pool child
            install(ProcessRuntime(settings.policy, settings.redis_url, env, can_kill))
        return _installed  # type: ignore[return-value]
