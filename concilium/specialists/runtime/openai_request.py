"""OpenAI chat-completions request bodies -> the engine's prompt ids and sampling parameters.

Shared by the model server and the gateway's in-process `local` provider so both read a request the
same way. Problems raise `RequestError` naming the offending parameter (a 400 for clients).

The runtime honours `logprobs` / `top_logprobs`, `logit_bias`, the presence/frequency penalties and
`response_format` `json_object` (constrained decoding, `json_mode`). It does not call tools, follow
a JSON schema or read images: `unsupported_feature()` names the field of a request that asks for
one of those (tools it would have to call, `json_schema`, image/audio/file parts), so it can be
refused with a 400 and a router can send such requests to a model that serves them.
Tools with `tool_choice` auto or none are served: answering in text is a valid answer then.
"""

from __future__ import annotations

from typing import Any

from concilium.specialists.runtime.sampling import MAX_TOP_LOGPROBS, SamplingError, SamplingParams
from concilium.specialists.runtime.tokenizer import Tokenizer, TokenizerError, normalize_messages


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


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


def _logprobs(body: dict[str, Any]) -> tuple[bool, int]:
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise RequestError("logprobs must be a boolean", "logprobs")
    top = _int(body, "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}", "top_logprobs")
    if top and not want:
        raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
    return bool(want), top or 0


def _logit_bias(body: dict[str, Any], vocab_size: int | None) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise RequestError("logit_bias must map token ids to numbers from -100 to 100", "logit_bias")
    out: dict[int, float] = {}
    for k, v in bias.items():
        token = int(k) if isinstance(k, str) and k.isascii() and k.isdigit() else None
        if token is None or (vocab_size is not None and token >= vocab_size):
            limit = f" below {vocab_size}" if vocab_size is not None else ""
            raise RequestError(f"logit_bias: {k!r} is not a token id{limit}", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
            raise RequestError(f"logit_bias[{k!r}] must be a number from -100 to 100", "logit_bias")
        out[token] = float(v)
    return out


def sampling_params(
    body: dict[str, Any],
    *,
    default_max_tokens: int,
    max_tokens_cap: int | None = None,
    vocab_size: int | None = None,
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
    logprobs, top_logprobs = _logprobs(body)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=_int(body, "seed"),
        stop=stops,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        logit_bias=_logit_bias(body, vocab_size),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        json_object=_format(body) == "json_object",
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


def _format(body: dict[str, Any]) -> object:
    fmt = body.get("response_format")
    return fmt.get("type") if isinstance(fmt, dict) else fmt


def _unsupported(param: str, message: str) -> RequestError:
    return RequestError(message, param, "unsupported_parameter")


def unsupported_feature(body: dict[str, Any]) -> RequestError | None:
    """The first feature this request asks for that the runtime cannot honour, or None."""
    if body.get("tools"):
        choice = body.get("tool_choice")
        if choice == "required" or isinstance(choice, dict):
            return _unsupported(
                "tool_choice", f"tool_choice {choice!r} needs a tool call; this local model does not call tools"
            )
    if body.get("functions") and isinstance(body.get("function_call"), dict):
        return _unsupported("function_call", "function_call names a function; this local model does not call tools")
    kind = _format(body)
    if kind not in (None, "text", "json_object"):
        return _unsupported(
            "response_format",
            f"response_format {kind!r} is not supported by this local model (text or json_object only)",
        )
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        return _unsupported("modalities", "this local model answers in text only")
    if body.get("audio") is not None:
        return _unsupported("audio", "this local model answers in text only")
    messages = body.get("messages")
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind not in ("text", "refusal"):
                return _unsupported(
                    f"messages[{i}].content[{j}]", f"content parts of type {kind!r} are not supported by this "
                    "local model (text only)"
                )
    return None
