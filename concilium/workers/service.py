"""The gateway's side of jobs: submit, look up, follow, wait for and cancel them.

One `JobService` per gateway process. With a Redis URL it only publishes tasks (workers run them)
and reads the shared store, so any replica can serve any job; without one it also hosts the
embedded worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from concilium.core import tracing
from concilium.core.plan import RoutePlan
from concilium.pipeline.state import PolicyState, Snapshot
from concilium.policy.jobs import JobsConfig
from concilium.policy.schema import Route
from concilium.workers.celery_app import TASK_NAME, make_celery
from concilium.workers.config import JobsEnv
from concilium.workers.responses import TERMINAL_EVENT_TYPES, ev, new_job_id, response_object
from concilium.workers.runner import JobRunner, end_from_events
from concilium.workers.store import TERMINAL, Event, JobStore, MemoryJobStore

if TYPE_CHECKING:
    from concilium.workers.embedded import EmbeddedWorker

log = logging.getLogger("concilium.workers")

QUEUE_WAIT_S = 86400  # how long a job may wait in its queue before its records lapse
CANCEL_WAIT_S = 0.8  # a running job has this long to stop by itself before the gateway ends it


class PublishError(Exception):
    pass


def route_of(plan: RoutePlan, policy: Any) -> Route | None:
    if plan.route == "pinned":
        return next((r for r in policy.routes if plan.requested_model in r.targets[:1]), None)
    return next((r for r in policy.routes if r.name == plan.route), None)


class JobService:
    def __init__(self, store: JobStore, env: JobsEnv, redis_url: str | None, queues: list[str]) -> None:
        self.store = store
        self.env = env
        self.redis_url = redis_url
        self.queues = list(queues)
        self.app = make_celery(redis_url, self.queues, env)
        self.embedded: EmbeddedWorker | None = None  # the embedded mode's worker threads, once started

    @classmethod
    def for_gateway(cls, redis_url: str | None, cfg: JobsConfig, env: JobsEnv | None = None) -> JobService:
        env = env or JobsEnv()
        if redis_url:
            from concilium.workers.store_redis import RedisJobStore

            store: JobStore = RedisJobStore(redis_url, env.key_prefix, env.request_redis_retry_s)
        else:
            store = MemoryJobStore()
        return cls(store, env, redis_url, cfg.queues)

    async def start(self, state: PolicyState) -> None:
        """Embedded mode: run the worker threads, with jobs on this (the gateway's) event loop."""
        if self.redis_url:
            return
        from concilium.workers import runtime
        from concilium.workers.embedded import EmbeddedWorker

        async def snapshot() -> Snapshot:
            return state.current

        runner = JobRunner(self.store, self.env, snapshot, can_kill=False)
        runtime.install(runtime.Runtime(self.store, runner, asyncio.get_running_loop()))
        self.embedded = EmbeddedWorker(self.app, self.queues, self.env.embedded_concurrency)
        self.embedded.start()

    async def close(self) -> None:
        if self.embedded is not None:
            from concilium.workers import runtime

            rt = runtime.installed()
            if rt is not None:
                rt.cancel_all()
            await asyncio.to_thread(self.embedded.stop)
            runtime.install(None)
        await asyncio.to_thread(self.app.close)
        await self.store.close()

    def queue_depths(self) -> dict[str, int]:
        """Jobs waiting in each queue for a worker (not yet taken), as the broker counts them.
        Blocking (a broker round trip per queue): call it from a thread."""
        out: dict[str, int] = {}
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.default_channel
            for q in self.queues:  # kombu's virtual channels (Redis, memory) count a queue with `_size`
                out[q] = int(channel._size(q) or 0)
        return out

    # ------------------------------------------------------------------ submit

    async def submit(self, *, kind: str, chat_body: dict[str, Any], template: dict[str, Any], plan: RoutePlan,
                     snap: Snapshot, owner: str, idem: str | None, fingerprint: str) -> tuple[str, bool]:
        """Store a job and queue it; (job id, created). Raises CapExceeded, IdempotencyConflict,
        PublishError."""
        cfg = snap.policy.jobs
        soft, hard = cfg.timeouts(route_of(plan, snap.policy))
        queue = cfg.queue_for(plan.queue, chat_body.get("service_tier"))
        if self.embedded is not None and queue not in self.queues:
            queue = self.queues[0]  # a queue added by a policy reload: the embedded worker serves its own
        plan = plan.model_copy(update={"timeout_s": max(plan.timeout_s or 0.0, hard)})
        now = time.time()
        spec = {"kind": kind, "body": {**chat_body, "stream": True}, "plan": plan.model_dump(mode="json"),
                "soft_timeout_s": soft, "hard_timeout_s": hard, "queue": queue, "owner": owner,
                "response": template, "max_attempts": cfg.max_attempts, "ttl_s": cfg.result_ttl_s,
                "request_id": plan.request_id, "submitted_at": now}
        if tracing.ENABLED and (parent := tracing.traceparent()):  # the worker's job span joins this trace
            spec["traceparent"] = parent
        job_id = new_job_id()
        queued = response_object(job_id, {"status": "queued", "spec": spec})
        events = [ev("response.created", response=queued), ev("response.queued", response=queued)]
        job_id, created = await self.store.create(
            job_id, spec, events, owner=owner, cap=cfg.cap_for(owner), idem=idem, fingerprint=fingerprint,
            ttl_s=cfg.result_ttl_s + int(hard) + QUEUE_WAIT_S, active_until=now + QUEUE_WAIT_S + hard)
        if created:
            try:
                await self._publish(job_id, queue, hard)
            except Exception as e:
                log.error("job %s: could not be queued: %s", job_id, e)
                await end_from_events(self.store, job_id, "failed", only_if="queued", error={
                    "code": "server_error", "message": f"the job could not be queued: {e}"})
                raise PublishError(str(e)) from None
        return job_id, created

    async def _publish(self, job_id: str, queue: str, hard: float) -> None:
        if not self.redis_url:  # in-memory broker: a plain queue put
            self.app.send_task(TASK_NAME, args=[job_id], task_id=job_id, queue=queue)
            return
        # The pool kills a job at its hard time limit (prefork workers).
        await asyncio.to_thread(
            self.app.send_task, TASK_NAME, args=[job_id], task_id=job_id, queue=queue, time_limit=hard,
            retry=True, retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 1.0})

    # ------------------------------------------------------------------ read

    async def get(self, job_id: str, owner: str) -> dict[str, Any] | None:
        rec = await self.store.get(job_id)
        return rec if rec is not None and rec["owner"] == owner else None

    async def events(self, job_id: str, after: int = -1, keepalive_s: float | None = None) -> AsyncIterator[Event | None]:
        """The job's events after `after`, as they come, up to its terminal event; None = no event
        for `keepalive_s` (the caller sends a keep-alive). A job that already ended ends at once."""
        keepalive_s = self.env.keepalive_s if keepalive_s is None else keepalive_s
        while True:
            batch = await self.store.read(job_id, after)
            if not batch:
                rec = await self.store.get(job_id)
                if rec is None or (rec["status"] in TERMINAL and rec["seq"] <= after):
                    return
                batch = await self.store.read(job_id, after, block_s=keepalive_s)
            if not batch:
                yield None
                continue
            for e in batch:
                yield e
                after = e.seq
                if e.type in TERMINAL_EVENT_TYPES:
                    return

    async def wait(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """The job's record once it ended, or as it is after `timeout` seconds."""
        rec = await self.store.get(job_id)
        if rec is None or rec["status"] in TERMINAL:
            return rec
        after, deadline = rec["seq"], time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            batch = await self.store.read(job_id, after, block_s=left)
            if any(e.type in TERMINAL_EVENT_TYPES for e in batch):
                break
            if batch:
                after = batch[-1].seq
        return await self.store.get(job_id)

    # ------------------------------------------------------------------ cancel

    async def cancel(self, job_id: str, snap: Snapshot) -> dict[str, Any] | None:
        """Raise the flag; a queued job ends now, a running one is woken by it, stops its model call
        and keeps its partial answer. One that does not stop
        in time (a stuck or lost worker) is ended here from its events, and its process killed."""
        if not await self.store.request_cancel(job_id):
            return None
        rec = await self.store.get(job_id)
        if rec is None or rec["status"] in TERMINAL:
            return rec
        if rec["status"] == "queued" and await end_from_events(self.store, job_id, "cancelled",
                                                                cost=snap.cost_usd, only_if="queued"):
            self._revoke(job_id, terminate=False)
            return await self.store.get(job_id)
        rec = await self.wait(job_id, CANCEL_WAIT_S)
        if rec is not None and rec["status"] not in TERMINAL:
            log.warning("job %s did not stop within %.1fs of its cancel; ending it here", job_id, CANCEL_WAIT_S)
            await end_from_events(self.store, job_id, "cancelled", cost=snap.cost_usd)
            self._revoke(job_id, terminate=True)
            rec = await self.store.get(job_id)
        return rec

    def _revoke(self, job_id: str, terminate: bool) -> None:
        """Tell the workers to drop the job's message (and kill its process when `terminate`)."""
        terminate = terminate and bool(self.redis_url)  # a thread cannot be killed

        def send() -> None:
            try:
                self.app.control.revoke(job_id, terminate=terminate, signal="SIGKILL")
            except Exception as e:
                log.warning("job %s: revoke failed: %s", job_id, e)

        asyncio.get_running_loop().run_in_executor(None, send)
