"""The gateway's services, built once by `create_app` and handed to the routes.

FastAPI routes take them as a dependency (`Depends(services)`); the hot chat route, which runs
without FastAPI's dependency machinery (see `fastpath.py`), reads the same object from the app.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.requests import Request

from concilium.gateway.metrics import Metrics
from concilium.gateway.recent import RecentRequests
from concilium.guard import logs, privacy
from concilium.guard.service import Guard
from concilium.pipeline.cache import MemoryStore, RedisStore
from concilium.pipeline.cache import open_store as open_cache
from concilium.pipeline.learning import OnlineRouter
from concilium.pipeline.learning import open_store as open_learning
from concilium.pipeline.state import PolicyState
from concilium.policy.loader import PolicyError
from concilium.router.feedback import FeedbackStore, open_store
from concilium.settings import Settings
from concilium.workers.service import JobService

log = logging.getLogger("concilium.gateway")


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    policy: PolicyState
    guard: Guard  # inactive (and never consulted) when the policy defines no keys
    jobs: JobService
    feedback: FeedbackStore
    recent: RecentRequests  # request id -> key, for /v1/feedback
    cache: MemoryStore | RedisStore  # the response cache's entries (used only by a policy with `cache:`)
    learning: OnlineRouter  # router.learning (consulted only while the policy enables it)

    @classmethod
    def build(cls, settings: Settings, policy_path: str) -> Services:
        """Everything the gateway serves with; a broken policy, key file or jobs section stops it
        here, naming the file and the key."""
        metrics = Metrics()
        policy = PolicyState(policy_path, metrics)
        snap = policy.current
        logs.configure(snap.policy.privacy.redact_logs)  # before anything logs a prompt
        privacy.configure(settings.log_prompts)
        try:
            guard = Guard(policy, settings)
        except PolicyError as e:
            raise SystemExit(str(e)) from None
        jobs = JobService.for_gateway(settings.redis_url, snap.policy.jobs)
        feedback = open_store(settings.redis_url, settings.data_dir)
        learning = OnlineRouter(policy, open_learning(settings.redis_url, settings.data_dir,
                                                      snap.policy.router.learning.log_retention), metrics)
        return cls(settings, metrics, policy, guard, jobs, feedback, RecentRequests(settings.redis_url),
                   open_cache(settings.redis_url), learning)

    async def start(self) -> None:
        self.policy.start_background(self.settings.policy_watch_s)
        await self.policy.start()
        await self.jobs.start(self.policy)
        await self.learning.start()

    async def close(self) -> None:
        for part in (self.jobs, self.guard, self.feedback, self.recent, self.cache, self.learning, self.policy):
            try:
                await part.close()
            except Exception as e:  # one part failing to close must not keep the others open
                log.warning("closing %s failed: %s", type(part).__name__, e)


def services(request: Request) -> Services:
    """The app's `Services` (a FastAPI dependency)."""
    return request.app.state.services
