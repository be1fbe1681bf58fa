"""In-process units: the rule-based decision, the retry/fallback loop and the circuit breaker."""

from __future__ import annotations

import pytest

from concilium.core.plan import Prediction
from concilium.policy.loader import parse_policy
from concilium.router.decide import DecisionError, decide
from concilium.specialists import call
from concilium.specialists.base import Provider, ProviderError
from concilium.specialists.health import CircuitBreaker
from tests.gateway.policies import two_models

POLICY = parse_policy(two_models("http://127.0.0.1:1/v1"))


def body(model="concilium/auto", **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def test_decide_virtual_model_uses_first_matching_route():
    plan = decide(body(), POLICY)
    assert plan.route == "main"
    assert [c.model for c in plan.candidates] == ["primary", "backup"]
    assert plan.timeout_s == 2.0 and plan.retries == 2
    assert plan.reasons[0] == "chose primary"


def test_decide_pinned_and_unknown_models():
    plan = decide(body("backup"), POLICY)
    assert plan.route == "pinned" and [c.model for c in plan.candidates] == ["backup"]
    with pytest.raises(DecisionError) as e:
        decide(body("gpt-9"), POLICY)
    assert e.value.status == 404 and "gpt-9" in e.value.message


def test_decide_skips_unavailable_with_reason():
    def availability(m):
        return "CONCILIUM_TEST_MISSING_KEY is not set" if m == "keyed" else None

    plan = decide(body("concilium/keyed"), POLICY, availability=availability)
    assert [c.model for c in plan.candidates] == ["backup"]
    assert plan.skipped[0].model == "keyed" and "not set" in plan.skipped[0].reason
    assert any("skipped keyed" in r for r in plan.reasons)


class _Dispatcher:
    def predict(self, body, policy):
        return Prediction(category="code", difficulty=0.9, quality={"primary": 0.4, "backup": 0.8})

    def rank(self, candidates, prediction, policy, body):
        return [("backup", 0.8, 0.001, "cheaper"), ("primary", 0.4, 0.002, "")], 0.5, "min_cost"


def test_decide_matches_on_prediction_and_ranks():
    text = two_models("http://127.0.0.1:1/v1").replace(
        "  - name: keyed-route\n",
        "  - name: code\n    match: {category: [code], difficulty: {min: 0.8}}\n"
        "    targets: [primary, backup]\n  - name: keyed-route\n")
    pol = parse_policy(text)
    plan = decide(body(), pol, dispatcher=_Dispatcher())
    assert plan.route == "code"
    assert [c.model for c in plan.candidates] == ["backup", "primary"]
    assert plan.candidates[0].predicted_quality == 0.8 and plan.threshold == 0.5
    assert plan.prediction.category == "code"
    assert decide(body(), pol).route == "main"  # without predictions the category rule cannot match


class _Scripted(Provider):
    kind = "openai"

    def __init__(self, name, outcomes):
        self.name, self.outcomes, self.calls = name, list(outcomes), 0

    async def complete(self, body, *, timeout):
        self.calls += 1
        out = self.outcomes.pop(0) if self.outcomes else {"ok": self.name}
        if isinstance(out, Exception):
            raise out
        return out

    async def stream(self, body, *, timeout):
        self.calls += 1
        out = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(out, Exception):
            raise out
        yield b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'


def _ctx(providers, breaker=None):
    return call.CallContext(providers=providers.__getitem__, breaker=breaker or CircuitBreaker(3, 30),
                            retry=POLICY.retry)


async def test_retry_then_success_then_fallback():
    p = _Scripted("primary", [ProviderError("boom", status=502), {"ok": "primary"}])
    b = _Scripted("backup", [])
    model, result, attempts = await call.complete(decide(body(), POLICY), body(), _ctx({"primary": p, "backup": b}))
    assert (model, result, p.calls, b.calls, len(attempts)) == ("primary", {"ok": "primary"}, 2, 0, 1)

    p = _Scripted("primary", [ProviderError("down", status=503)] * 5)
    model, _, attempts = await call.complete(decide(body(), POLICY), body(), _ctx({"primary": p, "backup": b}))
    assert model == "backup" and p.calls == 3  # 1 try + 2 retries, then fallback


async def test_client_errors_do_not_fall_back():
    p = _Scripted("primary", [ProviderError("bad request", status=400, retryable=False)])
    b = _Scripted("backup", [])
    with pytest.raises(ProviderError):
        await call.complete(decide(body(), POLICY), body(), _ctx({"primary": p, "backup": b}))
    assert b.calls == 0


async def test_breaker_opens_and_plan_skips_it():
    now = [0.0]
    breaker = CircuitBreaker(2, 10, clock=lambda: now[0])
    p = _Scripted("primary", [ProviderError("down", status=500)] * 10)
    b = _Scripted("backup", [])
    ctx = _ctx({"primary": p, "backup": b}, breaker)
    await call.complete(decide(body(), POLICY), body(), ctx)
    assert p.calls == 3 and breaker.open_reason("primary") is None  # a request's retries: one failure
    await call.complete(decide(body(), POLICY), body(), ctx)
    assert p.calls == 6 and breaker.open_reason("primary").startswith("circuit open")
    await call.complete(decide(body(), POLICY), body(), ctx)
    assert p.calls == 6  # skipped while open
    now[0] = 11.0
    assert breaker.open_reason("primary") is None  # half-open: next call is a trial


async def test_retry_after_is_honoured_or_skips():
    retry = POLICY.retry
    assert call.backoff_delay(retry, 0, 1.5) == 1.5
    assert call.backoff_delay(retry, 0, 60.0) is None  # longer than retry_after_max_s: fall back now
    d = call.backoff_delay(retry, 3, None)
    assert 0 < d <= retry.backoff_max_s * 1.5


async def test_stream_cleanup_runs_when_the_client_leaves_before_the_first_byte():
    import asyncio

    from concilium.gateway.responses import EventStreamResponse

    started, closed = [], []

    async def body():
        started.append(True)
        yield b"data: {}\n\n"

    async def on_close():
        closed.append(True)

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(0.5)  # the client is gone while the response head is still being sent

    resp = EventStreamResponse(body(), media_type="text/event-stream", on_close=on_close)
    await resp({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
    assert closed == [True] and started == []  # the body never ran, the cleanup did
