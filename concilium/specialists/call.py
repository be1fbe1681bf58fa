"""Call a model by working down a RoutePlan: retry with backoff and jitter, then fall back.

The same code runs in the gateway and in a background worker. Streaming calls commit to a candidate
at its first substantive event (content, a tool call or a finish reason); a failure before that
falls back transparently, a failure after it is the caller's to report in-stream.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from concilium.core import tracing
from concilium.core.plan import Candidate, RoutePlan
from concilium.policy.schema import Retry
from concilium.specialists.base import Provider, ProviderError
from concilium.specialists.health import CircuitBreaker

_SUBSTANTIVE = re.compile(rb'"content":\s*"(?!")|"tool_calls"|"finish_reason":\s*"|"refusal":\s*"')


@dataclass
class Attempt:
    model: str
    error: str
    status: int
    code: str | None = None
    retry_after: float | None = None  # seconds, when the model said when to come back (a 429)


@dataclass
class CallContext:
    """Everything a call needs besides the plan; shared by all requests of one policy version."""

    providers: Callable[[str], Provider]
    breaker: CircuitBreaker
    retry: Retry
    on_attempt_error: Callable[[str, ProviderError], None] | None = None


@dataclass
class StreamHandle:
    model: str
    first: list[bytes]  # events read before committing, to send first
    rest: AsyncIterator[bytes]
    attempts: list[Attempt] = field(default_factory=list)


def named(model: str, message: str) -> str:
    """`message` about `model`, starting with the model's name once (providers often put it there)."""
    return message if message.startswith(f"{model}: ") else f"{model}: {message}"


def unnamed(model: str, message: str) -> str:
    """`message` without a leading `model: ` (for a sentence that names the model itself)."""
    return message[len(model) + 2:] if message.startswith(f"{model}: ") else message


class AllCandidatesFailed(Exception):
    def __init__(self, attempts: list[Attempt], last: ProviderError | None) -> None:
        self.attempts = attempts
        self.last = last
        detail = "; ".join(named(a.model, a.error) for a in attempts[-4:]) or "no candidate could be called"
        super().__init__(f"all candidates failed: {detail}")

    @property
    def retry_after(self) -> float | None:
        """The soonest any rate-limited model said it will take requests again, in seconds."""
        waits = [a.retry_after for a in self.attempts if a.status == 429 and a.retry_after is not None]
        return min(waits) if waits else None


def backoff_delay(retry: Retry, attempt: int, retry_after: float | None) -> float | None:
    """Seconds to wait before retry `attempt` (0-based), or None to skip retrying this candidate."""
    if retry_after is not None:
        return retry_after if retry_after <= retry.retry_after_max_s else None
    base = min(retry.backoff_max_s, retry.backoff_s * (2**attempt))
    return base * random.uniform(0.5, 1.5)


DEFAULT_TIMEOUT_S = 60.0


def attempt_timeout(plan: RoutePlan, cand: Candidate) -> float:
    """Seconds one attempt on this candidate may take: its own limit, else the plan's."""
    return cand.timeout_s or plan.timeout_s or DEFAULT_TIMEOUT_S


async def _attempts(plan: RoutePlan, ctx: CallContext, run: Callable[[Provider, float], Any],
                    operation: str = "chat") -> Any:
    """Shared retry/fallback loop; `run(provider, timeout)` returns the result or raises ProviderError."""
    attempts: list[Attempt] = []
    last: ProviderError | None = None
    for i, cand in enumerate(plan.candidates):
        if (why := ctx.breaker.open_reason(cand.model)) is not None:
            attempts.append(Attempt(cand.model, why, 503))
            continue
        provider = ctx.providers(cand.model)
        timeout = attempt_timeout(plan, cand)
        for attempt in range(plan.retries + 1):
            try:
                if tracing.ENABLED:  # one client span per attempt
                    result = await tracing.attempt(run(provider, timeout), model=cand.model, provider=cand.provider,
                                                   number=len(attempts) + 1, fallback=i > 0, retry=attempt,
                                                   operation=operation)
                else:
                    result = await run(provider, timeout)
            except ProviderError as e:
                last = e
                attempts.append(Attempt(cand.model, e.message, e.status, e.code, e.retry_after))
                if ctx.on_attempt_error:
                    ctx.on_attempt_error(cand.model, e)
                if not e.fallback:  # the request itself is bad: no other model will do better
                    raise
                if not e.retryable or attempt == plan.retries or ctx.breaker.open_reason(cand.model):
                    break
                delay = backoff_delay(ctx.retry, attempt, e.retry_after)
                if delay is None:
                    break
                await asyncio.sleep(delay)
                continue
            ctx.breaker.success(cand.model)
            return cand.model, result, attempts
        # One failure per request that gave up on this model, however many retries it took: the
        # breaker counts failing requests, so a retry policy does not change when it opens.
        ctx.breaker.failure(cand.model)
    raise AllCandidatesFailed(attempts, last)


def with_defaults(p: Provider, body: dict[str, Any]) -> dict[str, Any]:
    """The body this candidate is sent: its policy `defaults` fill in what the client left out
    (each model its own, so a fallback never inherits another model's defaults)."""
    spec = getattr(p, "spec", None)  # test doubles may have none
    return spec.defaults.fill(body) if spec is not None else body


async def complete(plan: RoutePlan, body: dict[str, Any], ctx: CallContext) -> tuple[str, dict, list[Attempt]]:
    async def run(p: Provider, timeout: float) -> dict:
        return await p.complete(with_defaults(p, body), timeout=timeout)

    return await _attempts(plan, ctx, run)


async def _open(p: Provider, body: dict[str, Any], timeout: float) -> tuple[list[bytes], AsyncIterator[bytes]]:
    it = p.stream(body, timeout=timeout).__aiter__()
    first: list[bytes] = []
    try:
        while True:
            try:
                ev = await it.__anext__()
            except StopAsyncIteration:
                return first, _empty()
            first.append(ev)
            if _SUBSTANTIVE.search(ev):
                return first, it
    except BaseException:
        await _aclose(it)
        raise


async def _empty() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover


async def _aclose(it: AsyncIterator[bytes]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


async def stream(plan: RoutePlan, body: dict[str, Any], ctx: CallContext) -> StreamHandle:
    async def run(p: Provider, timeout: float) -> tuple[list[bytes], AsyncIterator[bytes]]:
        return await _open(p, with_defaults(p, body), timeout)

    model, (first, rest), attempts = await _attempts(plan, ctx, run)
    return StreamHandle(model=model, first=first, rest=rest, attempts=attempts)


async def embed(plan: RoutePlan, body: dict[str, Any], ctx: CallContext) -> tuple[str, dict, list[Attempt]]:
    """An embeddings request, with the same retries and circuit breaker as a chat call."""
    async def run(p: Provider, timeout: float) -> dict:
        return await p.embed(body, timeout=timeout)

    return await _attempts(plan, ctx, run, "embeddings")
