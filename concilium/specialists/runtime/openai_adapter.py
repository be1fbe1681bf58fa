"""The local runtime's OpenAI adapter: the one place that turns a chat-completions request into the
engine's inputs (prompt ids and sampling parameters) and the engine's events into OpenAI completions
and stream chunks. The gateway's in-process `local` provider and the model server behind
`concilium serve-model` both go through it, so they read and answer a request the same way.
Problems raise `RequestError` naming the offending parameter (a 400 for clients).

The runtime honours `logprobs` / `top_logprobs`, `logit_bias`, the presence/frequency penalties and
`response_format` `json_object` (constrained decoding, `json_mode`). It does not call tools, follow
a JSON schema or read images: `unsupported_feature()` names the field of a request that asks for
one of those (tools it would have to call, `json_schema`, image/audio/file parts), so it can be
refused with a 400 and a router can send such requests to a model that serves them.
Tools with `tool_choice` auto or none are served: answering in text is a valid answer then.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from concilium.specialists.runtime.logprobs import choice_logprobs
from concilium.specialists.runtime.sampling import MAX_TOP_LOGPROBS, SamplingError, SamplingParams
from concilium.specialists.runtime.tokenizer import Tokenizer, TokenizerError, normalize_messages

if TYPE_CHECKING:
    from concilium.specialists.runtime.engine import Engine, StreamEvent


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


# ------------------------------------------------------------------------------------ engine inputs


@dataclass
class EngineRequest:
    ids: list[int]
    params: SamplingParams


def engine_request(body: dict[str, Any], engine: Engine, *, default_max_tokens: int,
                   max_tokens_cap: int | None = None) -> EngineRequest:
    """What the engine needs to answer `body`: the prompt's ids and the sampling parameters, the
    answer bounded by the room left in the model's context. RequestError otherwise (a prompt that
    does not fit is `context_length_exceeded`)."""
    if (err := unsupported_feature(body)) is not None:
        raise err
    params = sampling_params(body, default_max_tokens=default_max_tokens, max_tokens_cap=max_tokens_cap,
                             vocab_size=engine.model.cfg.vocab_size)
    ids = prompt_ids(body, engine.tokenizer)
    room = engine.max_seq_len - len(ids)
    if room < 1:
        raise RequestError(f"the prompt has {len(ids)} tokens; this model's context is {engine.max_seq_len}",
                           "messages", "context_length_exceeded")
    params.max_tokens = min(params.max_tokens, room)
    return EngineRequest(ids, params)


# --------------------------------------------------------------------------------- engine outputs


def usage(ev: StreamEvent) -> dict[str, int]:
    """The usage block of the event that ended a request."""
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class Answer:
    """One request's answer as OpenAI shapes it: `completion()` from all its events, or `chunks()`
    event by event for a stream."""

    model: str
    tokenizer: Tokenizer
    include_usage: bool = True  # a stream ends with a usage chunk (choices: [])
    cid: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    _pending: list[Any] = field(default_factory=list)  # log-probs of tokens whose text is still held back

    def completion(self, events: list[StreamEvent]) -> dict[str, Any]:
        last = events[-1]
        lps = None
        if any(ev.logprobs is not None for ev in events):
            lps = [lp for ev in events for lp in ev.logprobs or []]
        return {
            "id": self.cid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(ev.text for ev in events)},
                         "logprobs": choice_logprobs(self.tokenizer, lps), "finish_reason": last.finish_reason}],
            "usage": usage(last),
        }

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None, lps: Any = None) -> dict[str, Any]:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}]
        return {"id": self.cid, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}

    def opening(self) -> bytes:
        """The stream's first event: the assistant's role."""
        return sse(self.chunk({"role": "assistant", "content": ""}))

    def chunks(self, ev: StreamEvent) -> list[bytes]:
        """The SSE events for one engine event: its text (with the log-probs of the tokens it came
        from), and at the end the finish reason and the usage."""
        out = []
        self._pending.extend(ev.logprobs or [])
        if ev.text or (self._pending and ev.finish_reason is not None):
            lps = None
            if ev.logprobs is not None:
                lps, self._pending = choice_logprobs(self.tokenizer, self._pending), []
            out.append(sse(self.chunk({"content": ev.text} if ev.text else {}, lps=lps)))
        if ev.finish_reason is not None:
            out.append(sse(self.chunk({}, ev.finish_reason)))
            if self.include_usage:
                out.append(sse({**self.chunk(None), "usage": usage(ev)}))
        return out
