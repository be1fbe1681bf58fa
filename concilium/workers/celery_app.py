"""The Celery app and its one task, `concilium.jobs.run(job_id)`.

With CONCILIUM_REDIS_URL the broker is Redis: messages are acknowledged only after the job ended
(`acks_late`), a message whose worker process died is re-queued (`reject_on_worker_lost`), and one
whose whole worker died returns after the visibility timeout. Whichever worker gets a message, the
job store decides whether it runs (see `JobRunner.run`), so a job never answers or bills twice.
Without it the broker is in memory and the worker is a thread pool inside the gateway.

`celery -A concilium.workers.celery_app worker` works too; `concilium worker` sets it up for you.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject, TimeLimitExceeded
from kombu import Queue

from concilium.workers import runtime
from concilium.workers.config import JobsEnv, process_settings
from concilium.workers.store import StoreUnavailable

TASK_NAME = "concilium.jobs.run"
log = logging.getLogger("concilium.workers")


def make_celery(redis_url: str | None, queues: list[str], env: JobsEnv | None = None) -> Celery:
    env = env or JobsEnv()
    app = Celery("concilium", set_as_current=False)
    if redis_url:
        transport = {
            "visibility_timeout": env.visibility_timeout_s,
            "queue_order_strategy": "priority",  # a worker takes from its first non-empty queue
            "global_keyprefix": env.key_prefix,
            "unacked_restore_interval": max(1, int(env.visibility_timeout_s / 4)),
            "unacked_restore_throttle": 1,
        }
    else:
        transport = {"polling_interval": env.embedded_poll_s}
    app.conf.update(
        broker_url=redis_url or "memory://",
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=queues[0] if len(queues) == 1 else "default" if "default" in queues else queues[0],
        task_queues=[Queue(q, routing_key=q) for q in queues],
        task_create_missing_queues=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # A job keeps running while the broker connection is down; its store decides what happens
        # to the message that comes back (see JobRunner.run).
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_pool_limit=10,
    )
    app.task(bind=True, base=JobTask, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True,
             ignore_result=True, max_retries=None)(run_job)
    return app


class JobTask(Task):
    typing = False

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A job whose run did not end it: killed at its hard time limit (this runs in the pool's
        parent process), or a bug in the run. End it from its events so it does not hang."""
        job_id = args[0] if args else task_id
        if isinstance(exc, TimeLimitExceeded):
            error = {"code": "hard_timeout", "message": f"the job ran into its hard timeout and was killed ({exc})"}
        else:
            error = {"code": "server_error", "message": f"the job's worker failed: {type(exc).__name__}: {exc}"}
        try:
            end_outside_run(job_id, error)
        except Exception:
            log.exception("job %s: could not record its failure", job_id)


def run_job(self: Task, job_id: str) -> None:
    worker = f"{self.request.hostname or 'worker'}/{os.getpid()}"
    try:
        result = runtime.current().execute(job_id, worker)
    except StoreUnavailable as e:
        # Leave the job to a later delivery: the message goes back to its queue (or, with the broker
        # down too, returns after the visibility timeout), and the next run takes over from the events.
        log.error("job %s: %s; handing it back to the queue", job_id, e)
        raise Reject(str(e), requeue=True) from None
    if result.state == "retry":
        raise self.retry(countdown=result.retry_in)


def end_outside_run(job_id: str, error: dict[str, str]) -> None:
    from concilium.workers.runner import end_from_events

    rt = runtime.installed()
    if rt is not None:  # a pool child or the embedded gateway: its own loop and store
        state = getattr(rt, "policy", None)
        rt.call(end_from_events(rt.store, job_id, "failed", error=error,
                                cost=state.current.cost_usd if state else None))
        return

    from concilium.policy.loader import PolicyError, load_policy
    from concilium.policy.pricing import cost_usd
    from concilium.workers.store_redis import RedisJobStore

    settings, env = process_settings()
    if not settings.redis_url:
        return

    def cost(model: str, usage: dict | None, seconds: float | None = None) -> float | None:  # the file now
        try:
            spec = load_policy(settings.policy).models.get(model)
        except PolicyError:
            return None
        return cost_usd(spec, usage, seconds) if spec is not None else None

    async def go() -> None:
        store = RedisJobStore(settings.redis_url, env.key_prefix, env.redis_retry_s)
        try:
            await end_from_events(store, job_id, "failed", error=error, cost=cost)
        finally:
            await store.close()

    asyncio.run(go())


@functools.cache
def app_from_env() -> Celery:
    """The app for worker processes: the broker from CONCILIUM_REDIS_URL, queues from the policy."""
    from concilium.policy.loader import load_policy

    settings, _ = process_settings()
    queues = os.environ.get("CONCILIUM_JOBS_QUEUES")
    if queues:
        names = [q.strip() for q in queues.split(",") if q.strip()]
    else:
        names = load_policy(settings.policy).jobs.queues
    return make_celery(settings.redis_url, names)


def __getattr__(name: str) -> Any:  # `celery -A concilium.workers.celery_app` looks for `app`
    if name in ("app", "celery"):
        return app_from_env()
    raise AttributeError(name)
