"""The Anthropic <-> chat translation (concilium.gateway.anthropic), as pure functions."""

from __future__ import annotations

import orjson
import pytest

from concilium.gateway import anthropic as a


def sse(*objs) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else orjson.dumps(o)) + b"\n\n" for o in objs)


def chunk(delta=None, finish=None, usage=None, choices=True):
    obj = {"id": "chatcmpl-x1", "object": "chat.completion.chunk", "model": "up-model",
           "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []}
    if usage:
        obj["usage"] = usage
    return obj


def events(data: bytes) -> list[tuple[str, dict]]:
    out = []
    for ev in data.split(b"\n\n"):
        if not ev:
            continue
        kind, payload = ev.split(b"\n", 1)
        assert kind.startswith(b"event: ") and payload.startswith(b"data: ")
        body = orjson.loads(payload[6:])
        assert body["type"] == kind[7:].decode()
        out.append((body["type"], body))
    return out


def test_system_blocks_text_and_sampling_fields():
    chat = a.to_chat({"model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}],
                      "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["x"], "temperature": 0.5,
                      "top_p": 0.9, "top_k": 5, "metadata": {"user_id": "u1", "team": "t"}, "stream": True})
    assert chat == {"model": "m", "max_tokens": 9, "messages": [{"role": "system", "content": "A\nB"},
                                                                {"role": "user", "content": "hi"}],
                    "temperature": 0.5, "top_p": 0.9, "stop": ["x"], "user": "u1", "metadata": {"team": "t"},
                    "stream": True, "stream_options": {"include_usage": True}}


def test_images_become_image_url_parts():
    chat = a.to_chat({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is it?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/x.png"}}]}]})
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]


def test_tool_use_and_results_become_tool_calls_and_tool_messages():
    chat = a.to_chat({"model": "m", "max_tokens": 1, "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                                          {"type": "tool_use", "id": "t2", "name": "g", "input": {}}]},
        {"role": "user", "content": [{"type": "text", "text": "also"},
                                     {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "one"}]},
                                     {"type": "tool_result", "tool_use_id": "t2", "content": "bad", "is_error": True}]}],
        "tools": [{"name": "f", "description": "F", "input_schema": {"type": "object"}}, {"name": "g"}],
        "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True}})
    assert chat["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
        {"id": "t2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}
    assert chat["messages"][2:] == [{"role": "tool", "tool_call_id": "t1", "content": "one"},
                                    {"role": "tool", "tool_call_id": "t2", "content": "Error: bad"},
                                    {"role": "user", "content": "also"}]
    assert chat["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"},
                                                               "description": "F"}},
                             {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["parallel_tool_calls"] is False


@pytest.mark.parametrize("choice,expect", [({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
                                           ({"type": "none"}, "none")])
def test_tool_choice(choice, expect):
    chat = a.to_chat({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                      "tools": [{"name": "f"}], "tool_choice": choice})
    assert chat["tool_choice"] == expect


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file"}}]}]},
     "messages[0].content[0].source"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "w", "type": "web_search_20250305"}]},
     "tools[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "sometimes"}, "tools": [{"name": "f"}]},
     "tool_choice"),
    ({"messages": [{"role": "user", "content": []}]}, "messages"),
])
def test_what_cannot_be_translated_names_the_field(body, param):
    with pytest.raises(a.TranslationError) as e:
        a.to_chat({"model": "m", "max_tokens": 1, **body})
    assert e.value.param == param


def test_a_completion_becomes_a_message():
    result = {"id": "chatcmpl-abc", "model": "up", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}}
    msg = a.from_chat(result, "asked")
    assert msg == {"id": "msg_abc", "type": "message", "role": "assistant", "model": "up", "content": [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "g", "input": {"arguments": "not json"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 6, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4}}


@pytest.mark.parametrize("finish,reason", [("stop", "end_turn"), ("length", "max_tokens"),
                                           ("content_filter", "refusal"), ("tool_calls", "tool_use")])
def test_stop_reasons(finish, reason):
    msg = a.from_chat({"choices": [{"message": {"content": "x"}, "finish_reason": finish}]}, "m")
    assert msg["stop_reason"] == reason and msg["model"] == "m" and msg["usage"]["input_tokens"] == 0


def test_a_text_stream_becomes_message_events_in_order():
    tr = a.StreamTranslator("asked")
    data = tr.feed(sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"})))
    data += tr.feed(b": keepalive\n\n" + sse(chunk({"content": "lo"})) [:20])  # an event cut in two
    data += tr.feed(sse(chunk({"content": "lo"}))[20:] + sse(chunk(finish="length")))
    data += tr.feed(sse(chunk(usage={"prompt_tokens": 7, "completion_tokens": 2}, choices=False), b"[DONE]"))
    assert tr.end() == b""
    evs = events(data)
    assert [k for k, _ in evs] == ["message_start", "ping", "content_block_start", "content_block_delta", "ping",
                                   "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = evs[0][1]["message"]
    assert start["id"] == "msg_x1" and start["model"] == "up-model" and start["content"] == []
    assert [e["delta"]["text"] for k, e in evs if k == "content_block_delta"] == ["Hel", "lo"]
    assert evs[2][1]["content_block"] == {"type": "text", "text": ""}
    delta = evs[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["input_tokens"] == 7 and delta["usage"]["output_tokens"] == 2


def test_a_tool_stream_opens_one_block_per_call():
    tr = a.StreamTranslator("m")
    data = tr.feed(sse(
        chunk({"content": "ok"}),
        chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk(finish="stop"), b"[DONE]"))
    evs = events(data)
    starts = [e["content_block"] for k, e in evs if k == "content_block_start"]
    assert starts == [{"type": "text", "text": ""}, {"type": "tool_use", "id": "c1", "name": "f", "input": {}},
                      {"type": "tool_use", "id": "c2", "name": "g", "input": {}}]
    json_deltas = [(e["index"], e["delta"]["partial_json"]) for k, e in evs
                   if k == "content_block_delta" and e["delta"]["type"] == "input_json_delta"]
    assert json_deltas == [(1, '{"a":'), (1, "1}"), (2, "{}")]
    assert [e["index"] for k, e in evs if k == "content_block_stop"] == [0, 1, 2]
    assert evs[-2][1]["delta"]["stop_reason"] == "tool_use"  # "stop" after a tool call


def test_errors_in_a_stream_and_a_stream_cut_short():
    tr = a.StreamTranslator("m")
    data = tr.feed(sse(chunk({"content": "x"}), {"error": {"message": "boom", "type": "api_error", "code": "c"}}))
    assert tr.feed(sse(chunk({"content": "late"}))) == b"" and tr.end() == b""
    kinds = events(data)
    assert kinds[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "boom", "code": "c"}})
    cut = a.StreamTranslator("m")
    cut.feed(sse(chunk({"content": "x"})))
    assert events(cut.end())[-1][1]["error"]["type"] == "api_error"


@pytest.mark.parametrize("status,kind", [(400, "invalid_request_error"), (401, "authentication_error"),
                                         (403, "permission_error"), (404, "not_found_error"),
                                         (413, "request_too_large"), (415, "invalid_request_error"),
                                         (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"),
                                         (503, "overloaded_error"), (504, "timeout_error")])
def test_openai_errors_become_anthropic_errors(status, kind):
    body = a.from_openai_error(status, {"error": {"message": "m", "type": "x", "code": "c", "param": None}}, "r1")
    assert body == {"type": "error", "error": {"type": kind, "message": "m", "code": "c"}, "request_id": "r1"}


def _run_asgi(app, path="/v1/messages"):
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "path": path, "headers": [(b"x-request-id", b"rid1")]}
    asyncio.run(app(scope, receive, send))
    return sent


def test_the_error_middleware_reshapes_openai_errors_and_crashes():
    from concilium.gateway.messages import AnthropicErrors

    async def openai_error(scope, receive, send):
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"3")]})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "slow down", "type": "x"',
                    "more_body": True})
        await send({"type": "http.response.body", "body": b', "code": "rate", "param": null}}'})

    start, body = _run_asgi(AnthropicErrors(openai_error))
    assert start["status"] == 429 and (b"retry-after", b"3") in start["headers"]
    assert orjson.loads(body["body"]) == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down",
                                                                     "code": "rate"}, "request_id": "rid1"}
    assert (b"content-length", str(len(body["body"])).encode()) in start["headers"]
    assert _run_asgi(AnthropicErrors(openai_error), "/v1/chat/completions")[1]["more_body"]  # other paths untouched

    async def crash(scope, receive, send):
        raise RuntimeError("bug")

    start, body = _run_asgi(AnthropicErrors(crash))
    assert start["status"] == 500 and orjson.loads(body["body"])["error"]["type"] == "api_error"
