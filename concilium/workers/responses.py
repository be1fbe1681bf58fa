"""OpenAI Responses API shapes: request -> chat body, the response object, and the stream events.

A job's answer is one assistant message (`output[0]`, type "message", one `output_text` part). Its
events follow OpenAI's order: response.created, response.queued, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta ...,
response.output_text.done, response.content_part.done, response.output_item.done, and one terminal
event: response.completed | response.incomplete | response.failed | response.cancelled.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

TERMINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.cancelled",
}
TERMINAL_EVENT_TYPES = frozenset(TERMINAL_EVENTS.values())

# Fields of a Responses request that are echoed on the response object.
_ECHO = ("instructions", "max_output_tokens", "metadata", "temperature", "top_p", "reasoning",
         "service_tier", "user", "text", "truncation", "store")
# Fields this gateway cannot honour; refusing them beats silently answering something else.
_UNSUPPORTED = ("tools", "previous_response_id", "conversation", "prompt", "input_file")


class InputError(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def new_job_id() -> str:
    return "resp_" + uuid.uuid4().hex


def message_id(job_id: str) -> str:
    return "msg_" + job_id.removeprefix("resp_")


def _content(parts: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        raise InputError(f"{where}.content must be a string or a list of content parts", where)
    out: list[dict[str, Any]] = []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(p.get("text"), str):
            out.append({"type": "text", "text": p["text"]})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            out.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        else:
            raise InputError(f"{where}.content[{j}]: unsupported content part type {kind!r} "
                             "(supported: input_text, output_text, input_image with image_url)",
                             f"{where}.content[{j}]")
    if all(p["type"] == "text" for p in out):
        return "".join(p["text"] for p in out)
    return out


def to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses API request -> the chat-completions body the providers speak."""
    for name in _UNSUPPORTED:
        if body.get(name):
            raise InputError(f"'{name}' is not supported by this gateway's /v1/responses", name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InputError("'model' is required: a model name or a virtual model such as concilium/auto", "model")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InputError("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    inp = body.get("input")
    if isinstance(inp, str):
        messages.append({"role": "user", "content": inp})
    elif isinstance(inp, list) and inp:
        for i, item in enumerate(inp):
            where = f"input[{i}]"
            if not isinstance(item, dict) or item.get("type", "message") != "message":
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise InputError(f"{where}: unsupported input item {kind!r} (only messages)", where)
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InputError(f"{where}.role must be user, assistant, system or developer", f"{where}.role")
            messages.append({"role": role, "content": _content(item.get("content"), where)})
    else:
        raise InputError("'input' is required: a string or a non-empty list of messages", "input")
    chat: dict[str, Any] = {"model": model, "messages": messages}
    if body.get("max_output_tokens") is not None:
        mot = body["max_output_tokens"]
        if not isinstance(mot, int) or isinstance(mot, bool) or mot < 1:
            raise InputError("'max_output_tokens' must be a positive integer", "max_output_tokens")
        chat["max_tokens"] = mot
    for name in ("temperature", "top_p", "metadata", "user", "service_tier", "background"):
        if body.get(name) is not None:
            chat[name] = body[name]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    return chat


def template(body: dict[str, Any], model: str, created_at: float) -> dict[str, Any]:
    """The response object's fixed fields for a job (stored with it)."""
    t: dict[str, Any] = {"object": "response", "created_at": int(created_at), "model": model,
                         "background": bool(body.get("background")), "parallel_tool_calls": False,
                         "tool_choice": "auto", "tools": []}
    for name in _ECHO:
        t[name] = body.get(name)
    return t


def response_usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    i, o = int(chat_usage.get("prompt_tokens") or 0), int(chat_usage.get("completion_tokens") or 0)
    out: dict[str, Any] = {"input_tokens": i, "input_tokens_details": {"cached_tokens": 0},
                           "output_tokens": o, "output_tokens_details": {"reasoning_tokens": 0},
                           "total_tokens": i + o}
    if chat_usage.get("estimated"):
        out["estimated"] = True
    return out


def message_item(job_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": message_id(job_id), "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def response_object(job_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """The response object for a stored job: {status, spec, result} -> OpenAI's shape."""
    spec, result, status = record["spec"], record.get("result") or {}, record["status"]
    obj = dict(spec["response"])
    obj.update(id=job_id, status=status, output=[], error=None, incomplete_details=None, usage=None)
    if result:
        if result.get("text") is not None and (result["text"] or status == "completed"):
            item_status = "completed" if status == "completed" else "incomplete"
            obj["output"] = [message_item(job_id, result["text"], item_status)]
        obj["usage"] = response_usage(result.get("usage"))
        obj["error"] = result.get("error")
        obj["incomplete_details"] = result.get("incomplete_details")
        obj["completed_at"] = result.get("finished_at")
        if result.get("model"):
            obj["model"] = result["model"]
    return obj


def ev(etype: str, **fields: Any) -> tuple[str, bytes]:
    """One event (type, JSON without sequence_number) for the store."""
    return etype, orjson.dumps({"type": etype, **fields})


class OutputEvents:
    """Turns a job's progress into its Responses events, remembering what has been sent."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.item_id = message_id(job_id)
        self.started = False  # response.in_progress sent
        self.opened = False  # output_item.added + content_part.added sent

    @classmethod
    def resume(cls, job_id: str, seen_types: set[str]) -> OutputEvents:
        """After a worker died: continue a job whose events already include `seen_types`."""
        out = cls(job_id)
        out.started = "response.in_progress" in seen_types
        out.opened = "response.content_part.added" in seen_types
        return out

    def in_progress(self, response: dict[str, Any]) -> list[tuple[str, bytes]]:
        if self.started:
            return []
        self.started = True
        return [ev("response.in_progress", response=response)]

    def _open(self) -> list[tuple[str, bytes]]:
        if self.opened:
            return []
        self.opened = True
        item = {"id": self.item_id, "type": "message", "status": "in_progress", "role": "assistant",
                "content": []}
        return [ev("response.output_item.added", output_index=0, item=item),
                ev("response.content_part.added", item_id=self.item_id, output_index=0, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": []})]

    def delta(self, text: str) -> list[tuple[str, bytes]]:
        return self._open() + [ev("response.output_text.delta", item_id=self.item_id, output_index=0,
                                  content_index=0, delta=text, logprobs=[])]

    def end(self, status: str, text: str, response: dict[str, Any]) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        if self.opened:
            part = {"type": "output_text", "text": text, "annotations": []}
            out += [ev("response.output_text.done", item_id=self.item_id, output_index=0, content_index=0,
                       text=text, logprobs=[]),
                    ev("response.content_part.done", item_id=self.item_id, output_index=0, content_index=0,
                       part=part),
                    ev("response.output_item.done", output_index=0,
                       item=message_item(self.job_id, text, "completed" if status == "completed" else "incomplete"))]
        out.append(ev(TERMINAL_EVENTS[status], response=response))
        return out

