"""OpenAI chat-completions request bodies -> the engine's prompt ids and sampling parameters.

Shared by the model server and the gateway's in-process `local` provider so both read a request the
same way. Problems raise `RequestError` naming the offending parameter (a 400 for clients).
"""

from __future__ import annotations

from typing import Any

from concilium.specialists.runtime.sampling import SamplingError, SamplingParams
from concilium.specialists.runtime.tokenizer import Tokenizer, TokenizerError, normalize_messages


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _number(body: dict[str, Any], key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RequestError(f"{key} must be a number", key)
    return float(v)


def _int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key} must be an integer", key)
    return v


def sampling_params(
    body: dict[str, Any], *, default_max_tokens: int, max_tokens_cap: int | None = None
) -> SamplingParams:
    n = _int(body, "n")
    if n not in (None, 1):
        raise RequestError("only n=1 is supported", "n")
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens_cap is not None:
        max_tokens = min(max_tokens, max_tokens_cap)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise RequestError("stop must be a string or a list of strings", "stop")
    top_k = _int(body, "top_k") or 0
    temperature, top_p = _number(body, "temperature", 1.0), _number(body, "top_p", 1.0)
    if top_p == 0:  # "only the most likely token"
        temperature, top_p = 0.0, 1.0
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=_int(body, "seed"),
        stop=stops,
    )
    try:
        return params.validate()
    except SamplingError as e:
        raise RequestError(str(e), str(e).split(" ", 1)[0]) from None


def prompt_ids(body: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    try:
        return tokenizer.encode_chat(normalize_messages(body.get("messages")))
    except TokenizerError as e:
        raise RequestError(str(e), "messages") from None
