"""The job store: job records, one event log per job, leases, idempotency keys, caps and the bill.

Two implementations with one contract: `RedisJobStore` (`store_redis.py`; any gateway replica and
any worker see the same jobs) and `MemoryJobStore` (here; the embedded mode, one process).

The contract, which the tests check on both:
- A job's events get sequence numbers 0, 1, 2, ... in the order they were appended; readers ask for
  the events after a number (`starting_after`) and may block until more arrive.
- Only the current owner of a job (the worker that claimed it last, by token) may append events:
  a worker that lost its lease is fenced off.
- `finish()` moves a job to a terminal status exactly once; it appends the terminal events,
  writes the bill and frees the key's slot in the same step. Later calls change nothing.
- A terminal job and its events expire `ttl_s` after they end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})


class StoreUnavailable(Exception):
    """The store (Redis) could not be reached within its retry window."""


class CapExceeded(Exception):
    def __init__(self, active: int, cap: int) -> None:
        super().__init__(f"{active} jobs are already queued or running for this key (cap {cap})")
        self.active, self.cap = active, cap


class IdempotencyConflict(Exception):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"this Idempotency-Key was used for a different request (job {job_id})")
        self.job_id = job_id


@dataclass
class Claim:
    """What `claim()` found: the job is now ours (`claimed`), or why not."""

    state: str  # claimed | missing | terminal | busy | exhausted
    attempts: int = 0
    started_at: float = 0.0
    retry_in: float = 0.0  # busy: seconds until the current owner's lease lapses
    status: str = ""


@dataclass
class Event:
    seq: int
    type: str
    data: bytes  # the event's JSON object, `sequence_number` included

    def json(self) -> dict[str, Any]:
        return orjson.loads(self.data)


def with_seq(data: bytes, seq: int) -> bytes:
    """Put `sequence_number` first into an event's JSON object (no re-encoding)."""
    return b'{"sequence_number":%d,' % seq + data[1:]


NewEvent = tuple[str, bytes]  # (type, JSON object without sequence_number)


class JobStore(ABC):
    @abstractmethod
    async def create(self, job_id: str, spec: dict[str, Any], events: list[NewEvent], *, owner: str,
                     cap: int, idem: str | None, fingerprint: str, ttl_s: int,
                     active_until: float) -> tuple[str, bool]:
        """Store a new queued job with its first events. With an idempotency key already used by
        this owner, return that job instead (created=False), or raise IdempotencyConflict when the
        request differs. Raise CapExceeded when the owner has `cap` jobs queued or running."""

    @abstractmethod
    async def get(self, job_id: str) -> dict[str, Any] | None:
        """{status, spec, result, attempts, worker, started_at, cancel, seq, owner, model} or None."""

    @abstractmethod
    async def claim(self, job_id: str, token: str, worker: str, lease_s: float, max_attempts: int) -> Claim:
        ...

    @abstractmethod
    async def renew(self, job_id: str, token: str, lease_s: float) -> bool:
        """Extend our lease; False when the job ended or another worker owns it."""

    @abstractmethod
    async def append(self, job_id: str, token: str, events: list[NewEvent], model: str | None = None) -> int | None:
        """Append events as the owner (and note the answering model); the last sequence number, or
        None when the job ended or another worker owns it now."""

    @abstractmethod
    async def finish(self, job_id: str, *, token: str | None, status: str, result: dict[str, Any],
                     events: list[NewEvent], bill: dict[str, Any] | None, ttl_s: int,
                     only_if: str | None = None) -> bool:
        """End the job (owner token, or None to force; `only_if` = required current status)."""

    @abstractmethod
    async def read(self, job_id: str, after: int = -1, block_s: float = 0.0, count: int = 1000) -> list[Event]:
        """Events with sequence number > `after`; waits up to `block_s` for the first one."""

    @abstractmethod
    async def request_cancel(self, job_id: str) -> bool:
        """Raise the job's cancel flag; False if there is no such job."""

    @abstractmethod
    async def cancel_requested(self, job_id: str) -> bool: ...

    @abstractmethod
    async def wait_cancel(self, job_id: str, timeout: float) -> bool:
        """True as soon as a cancel is requested for the job (at once if one is pending), False
        after `timeout` seconds without one."""

    @abstractmethod
    async def bills(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """The billing ledger (one entry per ended job that used tokens)."""

    async def close(self) -> None:
        return None

    async def all_events(self, job_id: str) -> list[Event]:
        out: list[Event] = []
        after = -1
        while True:
            batch = await self.read(job_id, after, 0.0, 1000)
            if not batch:
                return out
            out += batch
            after = batch[-1].seq


# --------------------------------------------------------------------------- in memory


@dataclass
class _Job:
    spec: dict[str, Any]
    owner: str
    status: str = "queued"
    events: list[Event] = field(default_factory=list)
    result: dict[str, Any] | None = None
    attempts: int = 0
    worker: str = ""
    started_at: float = 0.0
    token: str = ""
    lease_until: float = 0.0
    cancel: bool = False
    expires_at: float = 0.0
    model: str = ""


class MemoryJobStore(JobStore):
    """One process's jobs, safe to use from several threads and event loops."""

    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._idem: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._active: dict[str, dict[str, float]] = {}
        self._bills: deque[dict[str, Any]] = deque(maxlen=100_000)
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._cancel_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._next_sweep = 0.0

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 30.0
        for jid in [j for j, job in self._jobs.items() if job.expires_at <= now]:
            del self._jobs[jid]
        for k in [k for k, v in self._idem.items() if v[2] <= now]:
            del self._idem[k]

    def _job(self, job_id: str) -> _Job | None:
        job = self._jobs.get(job_id)
        if job is not None and job.expires_at <= self._clock():
            del self._jobs[job_id]
            return None
        return job

    def _add(self, job_id: str, job: _Job, events: Iterable[NewEvent]) -> int:
        for etype, data in events:
            seq = len(job.events)
            job.events.append(Event(seq, etype, with_seq(data, seq)))
        self._wake(job_id)
        return len(job.events) - 1

    def _wake(self, job_id: str, waiters: dict | None = None) -> None:
        for loop, fut in (self._waiters if waiters is None else waiters).pop(job_id, []):
            loop.call_soon_threadsafe(_resolve, fut)

    async def _wait(self, waiters: dict, job_id: str, ready, timeout: float) -> bool:
        """Wait until `ready(job)` (checked under the lock, re-checked on each wake-up) or timeout."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                job = self._job(job_id)
                if job is None:
                    return False
                if ready(job):
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                fut: asyncio.Future[None] = loop.create_future()
                waiters.setdefault(job_id, []).append((loop, fut))
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                pass
            finally:
                with self._lock:
                    waiting = waiters.get(job_id, [])
                    if (loop, fut) in waiting:
                        waiting.remove((loop, fut))

    async def create(self, job_id, spec, events, *, owner, cap, idem, fingerprint, ttl_s, active_until):
        now = self._clock()
        with self._lock:
            self._sweep(now)
            if idem is not None:
                hit = self._idem.get((owner, idem))
                if hit is not None and hit[2] > now:
                    if hit[1] != fingerprint:
                        raise IdempotencyConflict(hit[0])
                    return hit[0], False
            active = self._active.setdefault(owner, {})
            for jid in [j for j, until in active.items() if until <= now]:
                del active[jid]
            if len(active) >= cap:
                raise CapExceeded(len(active), cap)
            active[job_id] = active_until
            job = _Job(spec=spec, owner=owner, expires_at=now + ttl_s)
            self._jobs[job_id] = job
            self._add(job_id, job, events)
            if idem is not None:
                self._idem[(owner, idem)] = (job_id, fingerprint, now + ttl_s)
        return job_id, True

    async def get(self, job_id):
        with self._lock:
            job = self._job(job_id)
            if job is None:
                return None
            return {"status": job.status, "spec": job.spec, "result": job.result, "attempts": job.attempts,
                    "worker": job.worker, "started_at": job.started_at, "cancel": job.cancel,
                    "seq": len(job.events) - 1, "owner": job.owner, "model": job.model}

    async def claim(self, job_id, token, worker, lease_s, max_attempts):
        now = self._clock()
        with self._lock:
            job = self._job(job_id)
            if job is None:
                return Claim("missing")
            if job.status in TERMINAL:
                return Claim("terminal", status=job.status)
            if job.token and job.token != token and job.lease_until > now:
                return Claim("busy", retry_in=job.lease_until - now)
            job.attempts += 1
            if job.attempts > max_attempts:
                return Claim("exhausted", attempts=job.attempts, started_at=job.started_at)
            job.token, job.lease_until, job.worker = token, now + lease_s, worker
            job.status = "in_progress"
            job.started_at = job.started_at or now
            return Claim("claimed", attempts=job.attempts, started_at=job.started_at)

    async def renew(self, job_id, token, lease_s):
        with self._lock:
            job = self._job(job_id)
            if job is None or job.token != token or job.status in TERMINAL:
                return False
            job.lease_until = self._clock() + lease_s
            return True

    async def append(self, job_id, token, events, model=None):
        with self._lock:
            job = self._job(job_id)
            if job is None or job.token != token or job.status != "in_progress":
                return None
            if model:
                job.model = model
            return self._add(job_id, job, events)

    async def finish(self, job_id, *, token, status, result, events, bill, ttl_s, only_if=None):
        assert status in TERMINAL, status
        with self._lock:
            job = self._job(job_id)
            if job is None or job.status in TERMINAL:
                return False
            if token is not None and job.token != token:
                return False
            if only_if is not None and job.status != only_if:
                return False
            job.status, job.result = status, result
            job.lease_until = 0.0
            job.expires_at = self._clock() + ttl_s
            self._add(job_id, job, events)
            self._active.get(job.owner, {}).pop(job_id, None)
            if bill is not None:
                self._bills.append(dict(bill, job_id=job_id))
            return True

    async def read(self, job_id, after=-1, block_s=0.0, count=1000):
        start = max(after + 1, 0)
        await self._wait(self._waiters, job_id, lambda job: start < len(job.events), block_s)
        with self._lock:
            job = self._job(job_id)
            return job.events[start:start + count] if job is not None else []

    async def request_cancel(self, job_id):
        with self._lock:
            job = self._job(job_id)
            if job is None:
                return False
            job.cancel = True
            self._wake(job_id, self._cancel_waiters)
            return True

    async def cancel_requested(self, job_id):
        with self._lock:
            job = self._job(job_id)
            return bool(job and job.cancel)

    async def wait_cancel(self, job_id, timeout):
        return await self._wait(self._cancel_waiters, job_id, lambda job: job.cancel, timeout)

    async def bills(self, job_id=None):
        with self._lock:
            return [dict(b) for b in self._bills if job_id is None or b["job_id"] == job_id]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
