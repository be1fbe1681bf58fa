"""Reservation and settlement amounts: token prices, GPU-second prices, exact integer sums."""

from __future__ import annotations

from concilium.policy.pricing import cost_nano as actual_cost
from concilium.policy.pricing import max_cost_nano as max_cost
from concilium.policy.pricing import prompt_tokens_bound
from concilium.policy.schema import ModelSpec


def spec(**kw) -> ModelSpec:
    return ModelSpec(provider="local", model="x", **kw)


def test_token_prices_in_nano_usd():
    s = spec(price={"input": 0.15, "output": 0.60})
    assert max_cost(s, 1000, 200, 60) == 150_000 + 120_000
    assert actual_cost(s, {"prompt_tokens": 10, "completion_tokens": 5}, 1.0, 0) == 1500 + 3000
    # no float noise: 0.6 * 5 tokens is exactly 3000 nano-USD, every time
    assert {actual_cost(s, {"prompt_tokens": 0, "completion_tokens": 5}, 0, 0) for _ in range(3)} == {3000}
    assert actual_cost(s, None, 1.0, 0) is None  # unknown usage: the caller keeps the reservation


def test_gpu_second_prices():
    s = spec(options={"usd_per_gpu_second": 0.001})
    assert max_cost(s, 10**6, 10**6, 30) == 30_000_000  # the plan's timeout bounds the time
    assert actual_cost(s, None, 2.5, 30_000_000) == 2_500_000  # wall time, usage not needed
    assert actual_cost(s, None, 99.0, 30_000_000) == 30_000_000  # never more than reserved


def test_prompt_bound_is_the_body_size():
    assert prompt_tokens_bound(0) == 1 and prompt_tokens_bound(5000) == 5000
