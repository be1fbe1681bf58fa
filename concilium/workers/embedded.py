"""The embedded worker: Celery's thread pool inside the gateway process, on the in-memory broker.

It runs the same task as a `concilium worker` process. Its threads hand each job to the gateway's
event loop (see `runtime.py`), so jobs use the gateway's providers and a local model loads once.
Differences from a Redis deployment: jobs live as long as the process, the queues are served
round-robin rather than strictly by priority, and the hard timeout is enforced by the job itself
(a thread cannot be killed).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery

log = logging.getLogger("concilium.workers")


class EmbeddedWorker:
    def __init__(self, app: Celery, queues: list[str], concurrency: int) -> None:
        self.app = app
        self.queues = list(queues)
        self.concurrency = concurrency
        self._controller: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._controller = self.app.WorkController(
            pool_cls="threads", concurrency=self.concurrency, queues=self.queues, loglevel="WARNING",
            without_heartbeat=True, without_mingle=True, without_gossip=True, hostname="embedded@concilium")
        self._thread = threading.Thread(target=self._controller.start, name="concilium-embedded-worker",
                                        daemon=True)
        self._thread.start()
        log.info("embedded job worker: %d threads on queues %s", self.concurrency, ", ".join(self.queues))

    def stop(self, timeout: float = 5.0) -> None:
        if self._controller is None:
            return
        try:
            self._controller.stop(in_sighandler=False)
        except Exception as e:  # shutting down anyway
            log.warning("embedded worker stop: %s", e)
        if self._thread is not None:
            self._thread.join(timeout)
        self._controller = None
