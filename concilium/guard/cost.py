"""What a request may cost at most (reserved before dispatch) and what it did cost (settled after).

Prices come from the policy: `price` in USD per million tokens, or for a model that is paid by the
time it holds a GPU, `options.usd_per_gpu_second` (charged for the call's wall time, at most the
plan's timeout). All amounts are integer nano-USD.
"""

from __future__ import annotations

import math

from concilium.policy.schema import ModelSpec

NANO_PER_USD = 1_000_000_000


def _nano(usd: float) -> int:
    # round away float noise first (0.6 * 5 = 3.0000000000000004) so equal costs stay equal
    return math.ceil(round(usd * NANO_PER_USD, 3))


def gpu_second_price(spec: ModelSpec) -> float | None:
    v = spec.options.get("usd_per_gpu_second")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else None


def prompt_tokens_bound(body_bytes: int) -> int:
    """An upper bound on prompt tokens: byte-level tokenizers emit at most one token per byte, and the
    JSON around each message is longer than the chat template's special tokens."""
    return max(1, body_bytes)


def max_cost(spec: ModelSpec, prompt_tokens: int, output_tokens: int, max_seconds: float) -> int:
    gpu = gpu_second_price(spec)
    if gpu is not None:
        return _nano(gpu * max_seconds)
    return _nano((spec.price.input * prompt_tokens + spec.price.output * output_tokens) / 1e6)


def actual_cost(spec: ModelSpec, usage: dict | None, seconds: float, reserved: int) -> int | None:
    """The cost of a finished call, or None when it cannot be known (no usage reported)."""
    gpu = gpu_second_price(spec)
    if gpu is not None:
        return min(reserved, _nano(gpu * seconds))
    if not usage:
        return None
    p = usage.get("prompt_tokens") or 0
    c = usage.get("completion_tokens") or 0
    if not isinstance(p, int) or not isinstance(c, int):
        return None
    return _nano((spec.price.input * p + spec.price.output * c) / 1e6)
