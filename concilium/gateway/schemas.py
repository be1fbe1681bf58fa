"""Request validation for the OpenAI routes.

Validated with pydantic for clear errors and the OpenAPI schema, but the handler passes the client's
original JSON on (unknown fields such as provider-specific options survive untouched). Scalars are
strict, as OpenAI's API is: `"stream": "yes"` or `"max_tokens": "5"` is a 400 naming the field, not
a value quietly converted here and sent on unconverted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

# A number: an integer or a float, never a string or a boolean.
Number = Annotated[float, Field(strict=True)]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=10_000)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    parallel_tool_calls: StrictBool | None = None
    n: StrictInt | None = Field(None, ge=1, le=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    reasoning_effort: StrictStr | None = None
    background: StrictBool | None = None
    # Gateway-level: models to fall back to, in order, after `model` (OpenRouter's `models` too).
    fallbacks: list[str] | None = Field(None, max_length=32)
    models: list[str] | None = Field(None, max_length=32)


class RouteRequest(ChatCompletionRequest):
    """`POST /v1/route` takes the same body as chat completions and calls no model."""


class ResponseInputMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class ResponseCreateRequest(BaseModel):
    """`POST /v1/responses` (OpenAI's Responses API, the subset served here). Documents the body in
    the OpenAPI schema; the route checks it itself (`workers.responses.to_chat_body`)."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    input: str | list[ResponseInputMessage] = Field(description="a prompt, or a non-empty list of messages")
    instructions: StrictStr | None = None
    background: StrictBool | None = Field(None, description="run as a job: answer 202-style at once, poll later")
    stream: StrictBool | None = None
    store: StrictBool | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user: StrictStr | None = None


class FeedbackRequest(BaseModel):
    """`POST /v1/feedback`: a score for an answer, by the request id the gateway answered with."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=200, description="the answer's x-request-id")
    score: Number = Field(ge=0, le=1)
    comment: str | None = Field(None, max_length=4000)
    model: str | None = Field(None, min_length=1, max_length=200)
    prompt: str | None = Field(None, max_length=100_000)
    messages: list[Message] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None
    param: str | None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""

    error: ErrorDetail
