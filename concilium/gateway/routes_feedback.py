"""POST /v1/feedback: a score (0..1) for an answer, by request id; stored by `router.feedback`."""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from concilium.gateway.errors import APIError
from concilium.router.feedback import FeedbackError, FeedbackStore, parse_feedback

log = logging.getLogger("concilium.gateway")
router = APIRouter()
MAX_BODY = 256 * 1024


def _store(request: Request) -> FeedbackStore:
    return request.app.state.services.feedback


async def _check_owner(request: Request, rid: str) -> None:
    """Feedback is for an answer this gateway gave, to the same key: an id that was never answered,
    has been forgotten, or belongs to another key gets the same 404."""
    try:
        owner = await request.app.state.services.recent.owner(rid)
    except Exception as e:
        log.warning("recent request ids unavailable: %s", type(e).__name__)
        raise APIError(503, "cannot check the request id right now; the record was not stored, retry later",
                       code="feedback_unavailable") from None
    key = getattr(request.state, "key", None)
    if owner is None or owner != (key.name if key is not None else ""):
        raise APIError(404, f"no recent request {rid!r} was answered for this key; feedback takes the "
                       "x-request-id of one of its own answers", code="request_not_found", param="request_id")


@router.post("/v1/feedback", summary="Score an answer (0..1) by its request id, with an optional comment")
async def feedback(request: Request) -> Response:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise APIError(413, f"feedback bodies are limited to {MAX_BODY} bytes", code="body_too_large")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError(400, "the body is not valid JSON", code="invalid_json") from None
    try:
        fb = parse_feedback(body)
    except FeedbackError as e:
        raise APIError(400, str(e), param=e.param, code="invalid_request") from None
    await _check_owner(request, fb.request_id)
    store = _store(request)
    try:
        await store.append(fb)
    except Exception as e:  # the record is not stored: say so, never acknowledge it
        log.warning("feedback store (%s) failed: %s", store.kind, type(e).__name__)
        raise APIError(503, "the feedback store is unavailable; the record was not stored, retry later",
                       code="feedback_unavailable") from None
    out = {"object": "feedback", "id": fb.id, "request_id": fb.request_id, "score": fb.score, "stored": store.kind}
    learning = request.app.state.services.learning
    if learning.enabled:  # router.learning: the online router learns from it at once
        try:
            decision = await request.app.state.services.recent.decision(fb.request_id)
            if decision is not None:
                await learning.feedback(decision, fb.score)
                out["learned"] = True
        except Exception as e:  # stored all the same: a later replay can still learn from it
            log.warning("online router did not learn from feedback %s: %s", fb.id, type(e).__name__)
    return Response(orjson.dumps(out), media_type="application/json")
