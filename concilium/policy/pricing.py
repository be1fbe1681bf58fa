"""What a call costs under the policy's prices: USD per million tokens (`price`), or for a model paid
by the time it holds a GPU, `options.usd_per_gpu_second`."""

from __future__ import annotations

from concilium.policy.schema import ModelSpec


def gpu_second_price(spec: ModelSpec) -> float | None:
    v = spec.options.get("usd_per_gpu_second")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else None


def usage_cost_usd(spec: ModelSpec, usage: dict | None, seconds: float | None = None) -> float | None:
    """The cost of a finished call in USD: GPU time when the model is priced by it and the call's
    wall time is known, else its reported tokens; None when neither is known."""
    gpu = gpu_second_price(spec)
    if gpu is not None and seconds is not None:
        return gpu * seconds
    if not usage:
        return None
    p, c = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    if not isinstance(p, int | float) or not isinstance(c, int | float):
        return None
    return (p * spec.price.input + c * spec.price.output) / 1e6
