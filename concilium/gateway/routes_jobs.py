"""Background jobs over HTTP, in OpenAI's Responses API shapes.

  POST /v1/responses                       create (background, stream); Idempotency-Key honoured
  GET  /v1/responses/{id}                  the response object; ?stream=true&starting_after=N resumes
  POST /v1/responses/{id}/cancel           cancel; the partial answer is kept
and the chat-completions diversion (`divert_chat`): when the router puts a chat
request in background mode, a streaming client is fed from the job's events as ordinary chunks, and
a non-streaming one waits up to `jobs.chat_wait_s`, then gets 202 with the job's location.
See docs/jobs.md.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from concilium.core.plan import RoutePlan
from concilium.gateway.errors import APIError, sse_error
from concilium.gateway.headers import header_value, plan_headers
from concilium.gateway.requests import no_candidates, plan_request, read_json, request_id
from concilium.pipeline.state import Snapshot
from concilium.specialists.base import chunk, completion, sse_event
from concilium.workers.responses import (
    TERMINAL_EVENT_TYPES,
    InputError,
    response_object,
    template,
    to_chat_body,
)
from concilium.workers.service import JobService, PublishError
from concilium.workers.store import TERMINAL, CapExceeded, IdempotencyConflict, StoreUnavailable

router = APIRouter()
log = logging.getLogger("concilium.gateway")
_DONE = b"data: [DONE]\n\n"
_KEEPALIVE = b": keepalive\n\n"


def _service(request: Request) -> JobService:
    return request.app.state.services.jobs


def owner_of(request: Request) -> str:
    """Who owns a job: the API key's name when the gateway checks keys, else a hash of the bearer (or x-api-key)
    token (never the token itself), else `anonymous`."""
    key = getattr(request.state, "key", None)
    name = getattr(getattr(key, "entry", None), "name", None)
    if isinstance(name, str) and name:
        return name
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    token = token or (request.headers.get("x-api-key") or "").strip()  # Anthropic's SDKs send the key here
    if token:
        return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return "anonymous"


def _fingerprint(kind: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(kind.encode() + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def _not_found(job_id: str) -> APIError:
    return APIError(404, f"No response found with id '{job_id}'.", code="response_not_found", param="response_id")


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


async def _submit(request: Request, kind: str, chat_body: dict[str, Any], tmpl: dict[str, Any], plan: RoutePlan,
                  snap: Snapshot, fingerprint_body: dict[str, Any]) -> tuple[str, bool]:
    service = _service(request)
    idem = request.headers.get("idempotency-key")
    if idem is not None and not (0 < len(idem) <= 255):
        raise APIError(400, "Idempotency-Key must be 1 to 255 characters", code="invalid_request")
    try:
        job_id, created = await service.submit(
            kind=kind, chat_body=chat_body, template=tmpl, plan=plan, snap=snap, owner=owner_of(request),
            idem=idem, fingerprint=_fingerprint(kind, fingerprint_body))
    except CapExceeded as e:
        raise APIError(429, f"{e}; wait for one to finish or cancel one", code="too_many_jobs",
                       type="rate_limit_error", headers={"retry-after": "5"}) from None
    except IdempotencyConflict as e:
        raise APIError(409, str(e), code="idempotency_key_reused") from None
    except PublishError as e:
        raise APIError(503, f"the job queue is unavailable: {e}", code="queue_unavailable") from None
    if created:
        request.app.state.services.metrics.jobs_submitted.labels(kind, plan.route).inc()
    return job_id, created


# --------------------------------------------------------------------------- Responses API


def jobs_unavailable(e: StoreUnavailable) -> APIError:
    return APIError(503, f"the job queue is unavailable: {e}", code="queue_unavailable",
                    headers={"retry-after": "2"})


def _sse_responses(service: JobService, job_id: str, after: int,
                   on_abort: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        finished = False
        try:
            async for e in service.events(job_id, after):
                if e is None:
                    yield _KEEPALIVE
                    continue
                yield b"event: " + e.type.encode() + b"\ndata: " + e.data + b"\n\n"
            finished = True
        except StoreUnavailable as e:  # resume later with starting_after = the last sequence number seen
            err = {"type": "error", "code": "queue_unavailable", "message": f"the job queue is unavailable: {e}",
                   "param": None}
            yield b"event: error\ndata: " + orjson.dumps(err) + b"\n\n"
        finally:
            if not finished and on_abort is not None:
                on_abort()

    return gen()


def _flag(value: Any, name: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise APIError(400, f"'{name}' must be a boolean", param=name, code="invalid_request")


@router.post("/v1/responses", summary="Create a response (OpenAI Responses API); background jobs")
async def create_response(request: Request) -> Response:
    body = await read_json(request)
    stream, background = _flag(body.get("stream"), "stream"), _flag(body.get("background"), "background")
    if background and body.get("store") is False:
        raise APIError(400, "background responses must be stored: do not set 'store': false", param="store",
                       code="invalid_request")
    try:
        chat_body = to_chat_body(body)
    except InputError as e:
        raise APIError(400, e.message, param=e.param, code="invalid_request") from None
    svc = request.app.state.services
    snap: Snapshot = svc.policy.current
    plan = plan_request(snap, chat_body, request_id(request))
    if not plan.candidates:
        raise no_candidates(plan)
    guard, ticket = svc.guard, None
    if guard.active:  # keys: access, rate limits, reserve the maximum cost
        ticket, plan = await guard.admit(request, chat_body, plan, snap, plan_headers(plan))
    try:
        job_id, created = await _submit(request, "response", chat_body,
                                        template(body, chat_body["model"], time.time()), plan, snap, body)
    except BaseException:
        if ticket is not None:
            ticket.done(None, None, "failed")  # nothing was queued: release the reservation
        raise
    if ticket is not None:
        # A job is charged its reservation (the most it may cost); a repeated idempotent create pays nothing.
        ticket.done(None, None, "background" if created else "failed")
    service = _service(request)
    headers = {**plan_headers(plan), "x-concilium-job-id": job_id}
    if stream:
        abort = None if background else (lambda: _cancel_soon(service, job_id, snap))
        return StreamingResponse(_sse_responses(service, job_id, -1, abort), media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})
    if not background:  # a foreground response: wait for it; a client that goes away cancels it
        rec = await _wait_or_disconnect(request, service, job_id, None)
        if rec is None or rec["status"] not in TERMINAL:
            await service.cancel(job_id, snap)
            return Response(status_code=499)
        return _json(response_object(job_id, rec), headers=headers)
    rec = await service.store.get(job_id)
    if created:  # as it was created (a worker may have taken it already); a repeat shows it as it is
        rec = {"status": "queued", "spec": rec["spec"]}
    return _json(response_object(job_id, rec), headers=headers)


_background_cancels: set[asyncio.Task] = set()


def _cancel_soon(service: JobService, job_id: str, snap: Snapshot) -> None:
    """Cancel a foreground job whose client went away (from a stream that is being torn down)."""
    async def cancel() -> None:
        try:
            await service.cancel(job_id, snap)
        except Exception as e:
            log.warning("job %s: cancel after the client left failed: %s", job_id, e)

    task = asyncio.ensure_future(cancel())
    _background_cancels.add(task)
    task.add_done_callback(_background_cancels.discard)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _wait_or_disconnect(request: Request, service: JobService, job_id: str,
                              timeout: float | None) -> dict[str, Any] | None:
    """The job's record once it ended or after `timeout`; None if the client went away first."""
    waiter = asyncio.ensure_future(service.wait(job_id, timeout if timeout is not None else 10 * 86400))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiter, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not waiter.done():
        waiter.cancel()
        return None
    return waiter.result()


async def _owned(request: Request, job_id: str) -> tuple[JobService, dict[str, Any]]:
    """The caller's job (another key's job is as unknown as a missing one)."""
    service = _service(request)
    rec = await service.get(job_id, owner_of(request))
    if rec is None:
        raise _not_found(job_id)
    return service, rec


@router.get("/v1/responses/{response_id}", summary="Retrieve a response; stream its events with ?stream=true")
async def retrieve_response(request: Request, response_id: str) -> Response:
    service, rec = await _owned(request, response_id)
    q = request.query_params
    stream = q.get("stream", "false").lower()
    if stream not in ("true", "false", "1", "0"):
        raise APIError(400, "'stream' must be true or false", param="stream", code="invalid_request")
    if stream in ("true", "1"):
        raw = q.get("starting_after")
        after = -1
        if raw is not None:
            try:
                after = int(raw)
            except ValueError:
                after = -2
            if after < 0:
                raise APIError(400, "'starting_after' must be a sequence number (an integer >= 0)",
                               param="starting_after", code="invalid_request")
        return StreamingResponse(_sse_responses(service, response_id, after), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-concilium-job-id": response_id})
    return _json(response_object(response_id, rec), headers={"x-concilium-job-id": response_id})


@router.post("/v1/responses/{response_id}/cancel", summary="Cancel a queued or running response")
async def cancel_response(request: Request, response_id: str) -> Response:
    service, rec = await _owned(request, response_id)
    if rec["status"] in TERMINAL and rec["status"] != "cancelled":
        raise APIError(409, f"Cannot cancel a response with status '{rec['status']}'", code="not_cancellable")
    rec = await service.cancel(response_id, request.app.state.services.policy.current)
    if rec is None:
        raise _not_found(response_id)
    return _json(response_object(response_id, rec), headers={"x-concilium-job-id": response_id})


# --------------------------------------------------------------------------- chat diversion


def _chat_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    return {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)}


def _finish_reason(status: str) -> str:
    return "length" if status == "incomplete" else "stop"


# What chat completions call when the router chose background mode.


def chat_takes(body: dict[str, Any]) -> bool:
    """Whether this chat request can run as a job: jobs carry text answers only, so a request
    with tools is answered at once (by the caller, who settles its ticket)."""
    return not (body.get("tools") or body.get("functions"))


def _reported(snap: Snapshot, model: str) -> str:
    """The `model` field of a chat that `model` answered at once: an upstream's own model id (what
    the gateway sent it, and what it echoes), a local model's policy name. Job-diverted chats say
    the same."""
    spec = snap.policy.models.get(model)
    return spec.model if spec is not None and spec.provider != "local" and spec.model else model


async def divert_chat(request: Request, body: dict[str, Any], plan: RoutePlan, snap: Snapshot) -> Response:
    service = _service(request)
    tmpl = template({**body, "background": True}, body["model"], time.time())
    job_id, _ = await _submit(request, "chat", body, tmpl, plan, snap, body)
    model = plan.candidates[0].model
    headers = {**plan_headers(plan), "x-concilium-job-id": job_id}
    if body.get("stream"):
        want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_chunks(service, job_id, functools.partial(_reported, snap), want_usage),
                                 media_type="text/event-stream",
                                 headers={**headers, "cache-control": "no-cache"})
    wait_s = snap.policy.jobs.chat_wait_s
    rec = await _wait_or_disconnect(request, service, job_id, wait_s)
    if rec is None:  # the client left before it learnt the job's id: nobody can collect the answer
        await service.cancel(job_id, snap)
        return Response(status_code=499)
    if rec["status"] not in TERMINAL:
        request.app.state.services.metrics.jobs_diverted.labels("redirected").inc()
        location = f"/v1/responses/{job_id}"
        return _json(response_object(job_id, rec), status=202,
                     headers={**headers, "location": location, "retry-after": "2",
                              "x-concilium-job-status": rec["status"]})
    request.app.state.services.metrics.jobs_diverted.labels("answered").inc()
    result = rec["result"] or {}
    if rec["status"] in ("failed", "cancelled"):
        err = result.get("error") or {"code": "cancelled", "message": "the job was cancelled"}
        raise APIError(502 if rec["status"] == "failed" else 409, f"background job {job_id} {rec['status']}: "
                       f"{err.get('message')}", code=err.get("code"), headers=headers)
    out = completion("chatcmpl-" + job_id.removeprefix("resp_"), _reported(snap, result.get("model") or model),
                     result.get("text") or "", _finish_reason(rec["status"]), _chat_usage(result.get("usage")),
                     created=rec["spec"]["response"]["created_at"])
    return _json(out, headers={**headers, "x-concilium-model": header_value(str(result.get("model") or model))})

async def _chunks(service: JobService, job_id: str, answered: Callable[[str], str],
                  want_usage: bool) -> AsyncIterator[bytes]:
    try:
        async for piece in _chunks_of(service, job_id, answered, want_usage):
            yield piece
    except StoreUnavailable as e:
        yield sse_error(f"the job queue is unavailable: {e}; the job goes on: GET /v1/responses/{job_id}",
                        code="queue_unavailable")

async def _chunks_of(service: JobService, job_id: str, answered: Callable[[str], str],
                     want_usage: bool) -> AsyncIterator[bytes]:
    """The job's events as chat chunks. They name the model that answers (the job knows it once the
    first text arrives, a fallback included), so the first chunk waits for it."""
    cid, created = "chatcmpl-" + job_id.removeprefix("resp_"), int(time.time())
    model: str | None = None
    async for e in service.events(job_id):
        if e is None:
            yield _KEEPALIVE
        elif e.type == "response.output_text.delta":
            if model is None:
                rec = await service.store.get(job_id)
                model = answered(str((rec or {}).get("model") or ""))
                yield sse_event(chunk(cid, model, created, {"role": "assistant", "content": ""}))
            yield sse_event(chunk(cid, model, created, {"content": e.json()["delta"]}))
        elif e.type in TERMINAL_EVENT_TYPES:
            resp = e.json()["response"]
            status = resp["status"]
            if model is None and status not in ("failed", "cancelled"):
                model = answered(str(resp.get("model") or ""))
                yield sse_event(chunk(cid, model, created, {"role": "assistant", "content": ""}))
            if status in ("failed", "cancelled"):
                err = resp.get("error") or {"code": "cancelled", "message": "the job was cancelled"}
                yield sse_error(f"background job {job_id} {status}: {err.get('message')}", code=err.get("code"))
                return
            yield sse_event(chunk(cid, model, created, {}, _finish_reason(status)))
            usage = resp.get("usage")
            if want_usage and usage:
                yield sse_event(chunk(cid, model, created, None, usage=_chat_usage(
                    {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"]})))
            yield _DONE
            return
