"""What a call costs under the policy's prices, before (an estimate) and after (its usage).

Prices are USD per million tokens (`price`), or for a model paid by the time it holds a GPU,
`options.usd_per_gpu_second` (a call is charged its wall time). Token counts that no tokenizer
reported are estimated here too, from lengths alone. Amounts are USD floats, or integer nano-USD
where they are reserved and settled (the guard), so that equal costs stay equal.
"""

from __future__ import annotations

import math

from concilium.policy.schema import ModelSpec

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4  # role and separators
NANO_PER_USD = 1_000_000_000

# ---------------------------------------------------------------------------------- token estimates


def prompt_tokens(prompt_chars: int, n_messages: int) -> float:
    """A prompt's tokens from its characters (every message) and its number of messages."""
    return prompt_chars / CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * max(n_messages, 1)


def text_tokens(text: str) -> int:
    """The tokens of a generated text."""
    return round(len(text) / CHARS_PER_TOKEN)


def estimated_usage(prompt_chars: int, n_messages: int, completion: str = "") -> dict:
    """Usage for a call that ended before its provider reported any, marked `estimated`."""
    return {"prompt_tokens": max(1, round(prompt_tokens(prompt_chars, n_messages))),
            "completion_tokens": text_tokens(completion), "estimated": True}


def prompt_tokens_bound(body_bytes: int) -> int:
    """An upper bound on prompt tokens: byte-level tokenizers emit at most one token per byte, and the
    JSON around each message is longer than the chat template's special tokens."""
    return max(1, body_bytes)


# ------------------------------------------------------------------------------------------ prices


def gpu_second_price(spec: ModelSpec) -> float | None:
    v = spec.options.get("usd_per_gpu_second")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 else None


def to_nano(usd: float) -> int:
    # round away float noise first (0.6 * 5 = 3.0000000000000004) so equal costs stay equal
    return math.ceil(round(usd * NANO_PER_USD, 3))


def _tokens_usd(spec: ModelSpec, prompt: float, completion: float) -> float:
    return (prompt * spec.price.input + completion * spec.price.output) / 1e6


# ------------------------------------------------------------------------------------ before a call


def estimate_usd(spec: ModelSpec, n_in: float, n_out: float) -> float:
    """The expected token cost of a call (the router's objective), its answer bounded by the model's
    `max_output_tokens`."""
    if spec.max_output_tokens:
        n_out = min(n_out, spec.max_output_tokens)
    return _tokens_usd(spec, n_in, n_out)


def max_cost_usd(spec: ModelSpec, prompt: int, output: int, max_seconds: float) -> float:
    """The most a call may cost: its token bounds, or for a GPU-second model its longest wall time."""
    gpu = gpu_second_price(spec)
    return gpu * max_seconds if gpu is not None else _tokens_usd(spec, prompt, output)


def max_cost_nano(spec: ModelSpec, prompt: int, output: int, max_seconds: float) -> int:
    return to_nano(max_cost_usd(spec, prompt, output, max_seconds))


# ------------------------------------------------------------------------------------- after a call


def cost_usd(spec: ModelSpec, usage: dict | None, seconds: float | None = None) -> float | None:
    """The cost of a finished call: GPU time when the model is priced by it and the call's wall time
    is known, else its reported tokens; None when neither is known."""
    gpu = gpu_second_price(spec)
    if gpu is not None and seconds is not None:
        return gpu * seconds
    if not usage:
        return None
    p, c = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    if not isinstance(p, int | float) or not isinstance(c, int | float):
        return None
    return _tokens_usd(spec, p, c)


def cost_nano(spec: ModelSpec, usage: dict | None, seconds: float, reserved: int) -> int | None:
    """`cost_usd` in nano-USD for settling a reservation: GPU time is charged at most what was
    reserved for it (the plan's timeout)."""
    usd = cost_usd(spec, usage, seconds)
    if usd is None:
        return None
    nano = to_nano(usd)
    return min(reserved, nano) if gpu_second_price(spec) is not None else nano
