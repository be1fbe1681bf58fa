"""specialists.call: each attempt runs under its candidate's own timeout."""

from __future__ import annotations

from concilium.core.plan import Candidate, RoutePlan
from concilium.policy.schema import Retry
from concilium.specialists import call
from concilium.specialists.base import Provider, ProviderError
from concilium.specialists.health import CircuitBreaker


class _Recording(Provider):
    kind = "openai"

    def __init__(self, name, fail=False):
        self.name, self.fail, self.timeouts = name, fail, []

    async def complete(self, body, *, timeout):
        self.timeouts.append(timeout)
        if self.fail:
            raise ProviderError(f"{self.name}: timed out after {timeout:g}s", status=504, code="timeout")
        return {"choices": [], "model": self.name}

    async def stream(self, body, *, timeout):
        self.timeouts.append(timeout)
        if self.fail:
            raise ProviderError(f"{self.name}: no token for {timeout:g}s", status=504, code="timeout")
        yield b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'


def _plan(**kw):
    return RoutePlan(request_id="r", requested_model="concilium/auto", route="main", timeout_s=30, retries=1,
                     candidates=[Candidate(model="quick", provider="openai", timeout_s=1),
                                 Candidate(model="steady", provider="openai")], **kw)


def _ctx(providers):
    return call.CallContext(providers=providers.__getitem__, breaker=CircuitBreaker(10, 30),
                            retry=Retry(attempts=1, backoff_s=0, backoff_max_s=0))


async def test_each_candidate_runs_under_its_own_timeout():
    quick, steady = _Recording("quick", fail=True), _Recording("steady")
    model, _, attempts = await call.complete(_plan(), {}, _ctx({"quick": quick, "steady": steady}))
    assert model == "steady"
    assert quick.timeouts == [1, 1] and steady.timeouts == [30]
    assert all("1s" in a.error for a in attempts)


async def test_streams_use_the_candidates_timeout_too():
    quick, steady = _Recording("quick", fail=True), _Recording("steady")
    handle = await call.stream(_plan(), {}, _ctx({"quick": quick, "steady": steady}))
    assert handle.model == "steady" and quick.timeouts == [1, 1] and steady.timeouts == [30]
    await call._aclose(handle.rest)


async def test_a_requests_retries_count_as_one_breaker_failure():
    quick, steady = _Recording("quick", fail=True), _Recording("steady")
    breaker = CircuitBreaker(2, 30)
    ctx = call.CallContext(providers={"quick": quick, "steady": steady}.__getitem__, breaker=breaker,
                           retry=Retry(attempts=3, backoff_s=0, backoff_max_s=0))
    plan = _plan().model_copy(update={"retries": 3})
    await call.complete(plan, {}, ctx)
    assert len(quick.timeouts) == 4  # one try and three retries ...
    assert breaker.snapshot()["quick"]["failures"] == 1 and breaker.open_reason("quick") is None  # ... one failure
    await call.complete(plan, {}, ctx)
    assert breaker.open_reason("quick") is not None  # the second failed request opens it


async def test_all_candidates_failed_names_each_model_once():
    quick, steady = _Recording("quick", fail=True), _Recording("steady", fail=True)
    try:
        await call.complete(_plan(), {}, _ctx({"quick": quick, "steady": steady}))
    except call.AllCandidatesFailed as e:
        text = str(e)
    assert "quick: quick:" not in text and "steady: steady:" not in text
    assert "quick: timed out after 1s" in text and "steady: timed out after 30s" in text
    assert call.AllCandidatesFailed([call.Attempt("quick", "circuit open for 3.0s after 3 failures", 503)],
                                    None).args[0] == "all candidates failed: quick: circuit open for 3.0s after 3 failures"
