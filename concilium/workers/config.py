"""Where the job machinery runs and how its broker behaves: read from the environment.

What becomes a job, its queues, caps and timeouts are the policy's (`concilium.policy.jobs`); this
is the deployment side. Without CONCILIUM_REDIS_URL everything runs in the gateway process
(embedded mode: an in-memory broker and an in-process worker thread).
"""

from __future__ import annotations

import functools

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from concilium.settings import Settings


class JobsEnv(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONCILIUM_JOBS_", extra="ignore")

    # Prefix of every Redis key the jobs use (job records, event streams, and the broker's queues).
    key_prefix: str = "concilium:jobs:"
    # A message a worker took but never acknowledged (the worker died) goes back to its queue after
    # this many seconds. Jobs that run longer are protected from a second run by their lease.
    visibility_timeout_s: float = Field(60.0, gt=0)
    # How long a running job's lease lasts without renewal (renewed every third of it). After a
    # worker dies, another one takes the job over once the lease has lapsed.
    lease_s: float = Field(6.0, gt=0.5)
    # Embedded mode: worker threads in the gateway process and the in-memory broker's poll interval.
    embedded_concurrency: int = Field(4, ge=1, le=256)
    embedded_poll_s: float = Field(0.05, gt=0)  # idle cost vs. job start delay
    # The hard timeout kills: in a prefork worker the pool kills the process at the job's hard time
    # limit. The job's own cooperative deadline comes this much later, as the fallback for pools that
    # cannot kill (threads: the embedded mode) and for jobs re-delivered after a worker died.
    kill_grace_s: float = Field(2.0, ge=0)
    # How long a worker's store operations keep retrying while Redis is unreachable (e.g. restarting).
    redis_retry_s: float = Field(30.0, ge=0)
    # A job's event stream sends a keep-alive comment after this many seconds without an event.
    keepalive_s: float = Field(15.0, gt=0)
    # How long a gateway request waits for an unreachable Redis before it answers 503.
    request_redis_retry_s: float = Field(2.0, ge=0)


def jobs_env() -> JobsEnv:
    return JobsEnv()


@functools.cache
def process_settings() -> tuple[Settings, JobsEnv]:
    """A worker process's settings, read from its environment once (the gateway builds its own and
    passes them down; a worker process has no such root, so every part of it asks here)."""
    return Settings(), JobsEnv()
