"""Anthropic's Messages API, translated to and from the gateway's own (OpenAI chat) shapes.

Pure functions and one small stream translator, no I/O: `POST /v1/messages` (gateway/messages.py)
turns the request into a chat request once (`to_chat`), hands it to the chat pipeline (routing,
strategies, keys, budgets, jobs, metrics: all as for `/v1/chat/completions`), and turns what comes
back into Anthropic's shapes (`from_chat` for a whole answer, `StreamTranslator` for SSE, `error_body`
for errors).

What maps to what:
  system (string or text blocks)            -> a first `system` message
  content blocks: text, image (base64/url)  -> text / `image_url` parts (text-only content -> a string)
  assistant tool_use blocks                 -> `tool_calls` (ids kept as they are)
  user tool_result blocks                   -> `tool` messages (before the user's other blocks)
  tools [{name, description, input_schema}] -> function tools; tool_choice auto/any/tool/none ->
                                               "auto"/"required"/{function}/"none";
                                               disable_parallel_tool_use -> parallel_tool_calls false
  max_tokens, stop_sequences, temperature, top_p, stream -> max_tokens, stop, temperature, top_p, stream
  metadata.user_id                          -> user (other metadata keys stay, for the policy's routes)
  top_k, thinking, service_tier ...          ignored (chat upstreams have no such fields)
  finish_reason stop/length/tool_calls/content_filter -> stop_reason end_turn/max_tokens/tool_use/refusal
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Number = Annotated[float, Field(strict=True)]


class TranslationError(ValueError):
    """The request cannot be expressed as a chat request; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --------------------------------------------------------------------------------- request schema


class Block(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: StrictStr


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["user", "assistant"]
    content: StrictStr | list[Block]


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr = Field(min_length=1, max_length=128)
    description: StrictStr | None = None
    input_schema: dict[str, Any] | None = None
    type: StrictStr | None = None


class CountTokensRequest(BaseModel):
    """`POST /v1/messages/count_tokens`: the messages request without `max_tokens`."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr = Field(min_length=1, max_length=256)
    messages: list[InputMessage] = Field(min_length=1, max_length=10_000)
    system: StrictStr | list[Block] | None = None
    tools: list[Tool] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    """`POST /v1/messages` (Anthropic's Messages API). Unknown fields are accepted and ignored."""

    max_tokens: StrictInt = Field(ge=1)
    stop_sequences: list[StrictStr] | None = None
    stream: StrictBool | None = None
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None
    # Gateway-level, as on the chat route: models to fall back to after a pinned `model`.
    fallbacks: list[StrictStr] | None = Field(None, max_length=32)
    models: list[StrictStr] | None = Field(None, max_length=32)


# ------------------------------------------------------------------------------- request -> chat


def _text_of(blocks: Any, where: str) -> str:
    """The text of a string or a list of text blocks (a system prompt, a tool result)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise TranslationError(f"{where}: expected a string or a list of text blocks", where)
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise TranslationError(f"{where}[{i}]: only text blocks are supported here, got {kind!r}",
                                   f"{where}[{i}]")
        out.append(b["text"])
    return "\n".join(out)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    src = block.get("source")
    if isinstance(src, dict) and src.get("type") == "base64" and isinstance(src.get("data"), str):
        url = f"data:{src.get('media_type') or 'image/png'};base64,{src['data']}"
    elif isinstance(src, dict) and src.get("type") == "url" and isinstance(src.get("url"), str):
        url = src["url"]
    else:
        raise TranslationError(f"{where}.source: expected a base64 or url image source", f"{where}.source")
    return {"type": "image_url", "image_url": {"url": url}}


def _user_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content as one string (what every chat upstream reads), else content parts."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _arguments(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def _message(i: int, m: dict[str, Any]) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages (a user turn with tool results becomes several)."""
    role, content = m["role"], m["content"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    tool_msgs: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = b.get("type")
        if kind == "text":
            if not isinstance(b.get("text"), str):
                raise TranslationError(f"{where}.text: expected a string", f"{where}.text")
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image" and role == "user":
            parts.append(_image_part(b, where))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(b.get("id"), str) or not isinstance(b.get("name"), str):
                raise TranslationError(f"{where}: a tool_use block needs `id` and `name`", where)
            calls.append({"id": b["id"], "type": "function",
                          "function": {"name": b["name"], "arguments": _arguments(b.get("input"))}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(b.get("tool_use_id"), str):
                raise TranslationError(f"{where}.tool_use_id: expected a string", f"{where}.tool_use_id")
            text = _text_of(b.get("content", ""), f"{where}.content")
            if b.get("is_error") is True:
                text = f"Error: {text}"
            tool_msgs.append({"role": "tool", "tool_call_id": b["tool_use_id"], "content": text})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning: chat upstreams take none back
        else:
            raise TranslationError(f"{where}: content blocks of type {kind!r} are not supported in "
                                   f"{role} messages", where)
    if role == "assistant":
        msg: dict[str, Any] = {"role": "assistant", "content": "".join(p["text"] for p in parts) or None}
        if calls:
            msg["tool_calls"] = calls
        return [msg]
    return tool_msgs + ([{"role": "user", "content": _user_content(parts)}] if parts else [])


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, t in enumerate(tools):
        if t.get("type") not in (None, "custom"):
            raise TranslationError(f"tools[{i}]: server tools ({t.get('type')!r}) are not supported; "
                                   "define the tool with name, description and input_schema", f"tools[{i}]")
        fn: dict[str, Any] = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
        if t.get("description"):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: dict[str, Any], chat: dict[str, Any]) -> None:
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise TranslationError("tool_choice: expected {type: auto|any|tool|none} (tool with a name)",
                               "tool_choice")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        chat["parallel_tool_calls"] = False


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A validated Messages request (`MessagesRequest` or `CountTokensRequest`) as a chat request."""
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        system = _text_of(body["system"], "system")
        if system:
            messages.append({"role": "system", "content": system})
    for i, m in enumerate(body["messages"]):
        messages += _message(i, m)
    if not any(m["role"] != "system" for m in messages):
        raise TranslationError("messages: at least one message with content is required", "messages")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages}
    if body.get("max_tokens") is not None:
        chat["max_tokens"] = body["max_tokens"]
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("stop_sequences", "stop"),
                     ("fallbacks", "fallbacks"), ("models", "models")):
        if body.get(src) is not None:
            chat[dst] = body[src]
    if body.get("tools"):
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        if body["tool_choice"].get("type") == "none" and not body.get("tools"):
            pass  # "no tools" without tools: nothing to say
        else:
            _tool_choice(body["tool_choice"], chat)
    metadata = dict(body.get("metadata") or {})
    user = metadata.pop("user_id", None)
    if isinstance(user, str) and user:
        chat["user"] = user
    if metadata:
        chat["metadata"] = metadata
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # message_delta reports the usage
    return chat


# ------------------------------------------------------------------------------ chat -> response

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}


def stop_reason(finish: str | None) -> str | None:
    return None if finish is None else STOP_REASONS.get(finish, "end_turn")


def usage(u: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI usage as Anthropic's: input_tokens exclude the prompt tokens read from a cache."""
    u = u if isinstance(u, dict) else {}
    prompt = int(u.get("prompt_tokens") or 0)
    details = u.get("prompt_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return {"input_tokens": max(prompt - cached, 0), "output_tokens": int(u.get("completion_tokens") or 0),
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _tool_input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"arguments": arguments}  # the model wrote no valid JSON: keep what it wrote
    return value if isinstance(value, dict) else {"value": value}


def message_id(chat_id: Any) -> str:
    if isinstance(chat_id, str) and chat_id:
        return "msg_" + chat_id.removeprefix("chatcmpl-")
    return "msg_" + uuid.uuid4().hex[:24]


def from_chat(result: dict[str, Any], model: str) -> dict[str, Any]:
    """A `chat.completion` as an Anthropic `message`; `model` names it when the result does not."""
    choices = result.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    msg = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = msg.get("content")
    if isinstance(text, list):  # content parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if text:
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or []:
        fn = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_" + uuid.uuid4().hex[:24],
                        "name": fn.get("name") or "", "input": _tool_input(fn.get("arguments"))})
    reason = stop_reason(choice.get("finish_reason")) or "end_turn"
    if reason == "end_turn" and any(b["type"] == "tool_use" for b in content):
        reason = "tool_use"  # some upstreams say "stop" after calling a tool
    out = {"id": message_id(result.get("id")), "type": "message", "role": "assistant",
           "model": result.get("model") or model, "content": content, "stop_reason": reason,
           "stop_sequence": None, "usage": usage(result.get("usage"))}
    if "concilium" in result:  # x-concilium-explain: the cascade's record
        out["concilium"] = result["concilium"]
    return out


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


PING = event("ping", {"type": "ping"})


class StreamTranslator:
    """Chat-completion SSE in, Anthropic's message events out: message_start, ping, then for each
    content block content_block_start / content_block_delta... / content_block_stop, then
    message_delta (stop_reason, usage) and message_stop; an in-stream chat error becomes an `error`
    event. Feed it bytes as they come (`feed`), then call `end()` once."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.buf = b""
        self.started = False
        self.finished = False
        self.index = -1  # the open content block, -1 when none is open
        self.open_kind: str | None = None
        self.tools: dict[int, int] = {}  # the chat tool-call index -> its block index
        self.reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.any_tool = False

    def feed(self, data: bytes) -> bytes:
        if self.finished:
            return b""
        buf = self.buf + data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        while not self.finished and (i := buf.find(b"\n\n")) >= 0:
            ev, buf = buf[:i], buf[i + 2:]
            out.append(self._event(ev))
        self.buf = buf
        return b"".join(out)

    def end(self) -> bytes:
        """The stream is over: a stream cut short (no [DONE] and no error) ends with an error event."""
        if self.finished:
            return b""
        self.finished = True
        return error_event(502, "the answer stream ended before it was complete")

    # -- one incoming event
    def _event(self, ev: bytes) -> bytes:
        if ev.startswith(b":"):
            return PING if self.started else b""  # a keep-alive comment
        data = b"".join(line[5:].strip() for line in ev.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return b""
        if data == b"[DONE]":
            return self._finish()
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(obj, dict):
            return b""
        if "error" in obj:
            self.finished = True
            err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            return error_event(502, str(err.get("message") or "the stream failed"), err.get("code"))
        out: list[bytes] = [] if self.started else [self._start(obj)]
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self.open_kind != "text":
                    out.append(self._open({"type": "text", "text": ""}))
                out.append(event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                         "delta": {"type": "text_delta", "text": text}}))
            for call in delta.get("tool_calls") or []:
                out.append(self._tool_delta(call))
            if choice.get("finish_reason"):
                self.reason = stop_reason(choice["finish_reason"])
        return b"".join(out)

    def _start(self, obj: dict[str, Any]) -> bytes:
        self.started = True
        self.model = obj.get("model") or self.model
        msg = {"id": message_id(obj.get("id")), "type": "message", "role": "assistant", "model": self.model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 0, "output_tokens": 0}}
        return event("message_start", {"type": "message_start", "message": msg}) + PING

    def _close(self) -> bytes:
        if self.open_kind is None:
            return b""
        self.open_kind = None
        return event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def _open(self, block: dict[str, Any]) -> bytes:
        out = self._close()
        self.index += 1
        self.open_kind = block["type"]
        return out + event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                   "content_block": block})

    def _tool_delta(self, call: Any) -> bytes:
        if not isinstance(call, dict):
            return b""
        n = call.get("index", 0)
        fn = call.get("function") or {}
        out = b""
        if n not in self.tools:
            self.any_tool = True
            out = self._open({"type": "tool_use", "id": call.get("id") or "toolu_" + uuid.uuid4().hex[:24],
                              "name": fn.get("name") or "", "input": {}})
            self.tools[n] = self.index
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            # Chat upstreams send one tool call after another; a late piece of an earlier one is kept
            # on its own block's index.
            out += event("content_block_delta", {"type": "content_block_delta", "index": self.tools[n],
                                                 "delta": {"type": "input_json_delta", "partial_json": args}})
        return out

    def _finish(self) -> bytes:
        self.finished = True
        out = [self._start({}) if not self.started else b"", self._close()]
        reason = self.reason or "end_turn"
        if reason == "end_turn" and self.any_tool:
            reason = "tool_use"
        out.append(event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": reason, "stop_sequence": None},
                                           "usage": usage(self.usage)}))
        out.append(event("message_stop", {"type": "message_stop"}))
        return b"".join(out)


# ----------------------------------------------------------------------------------------- errors

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, request_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    if request_id:
        out["request_id"] = request_id
    return out


def error_event(status: int, message: str, code: str | None = None) -> bytes:
    body = error_body(status, message)
    if code:
        body["error"]["code"] = code
    return event("error", body)


def from_openai_error(status: int, payload: Any, request_id: str | None = None) -> dict[str, Any]:
    """An OpenAI error body (`{"error": {"message", ...}}`) as Anthropic's, keeping its code and param."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return error_body(status, str(payload)[:500] if payload else f"HTTP {status}", request_id)
    out = error_body(status, str(err.get("message") or f"HTTP {status}"), request_id)
    for k in ("code", "param"):
        if err.get(k) is not None:
            out["error"][k] = err[k]
    return out
