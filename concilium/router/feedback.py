"""Feedback on answers: `POST /v1/feedback` stores {request_id, score 0..1, comment?, model?, prompt?}.

With `CONCILIUM_REDIS_URL` set, records go to the Redis stream `concilium:feedback` (XADD, no
trimming); otherwise they are appended to `<CONCILIUM_DATA_DIR>/feedback.jsonl`, one JSON object a
line, flushed and fsync'ed before the request is acknowledged. A record is acknowledged only after
the store has it, so an accepted record is never lost; a store that fails answers 503.

`concilium router train --feedback FILE` folds feedback into training (see `feedback_outcomes`).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from concilium.router.outcomes import Outcome, iter_jsonl
from concilium.router.text import request_text

STREAM = "concilium:feedback"
FILE_NAME = "feedback.jsonl"
MAX_COMMENT = 4000
MAX_PROMPT = 100_000
MAX_ID = 200


class FeedbackError(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Feedback:
    id: str
    request_id: str
    score: float
    created: float
    comment: str | None = None
    model: str | None = None  # the model that answered, when the client knows it
    prompt: str | None = None  # the prompt, when the client sends it (lets training use the record alone)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_feedback(obj: Any) -> Feedback:
    """Validate a POST /v1/feedback body. Raises FeedbackError naming the bad field."""
    if not isinstance(obj, dict):
        raise FeedbackError("the body must be a JSON object")
    known = {"request_id", "score", "comment", "model", "prompt", "messages"}
    extra = sorted(set(obj) - known)
    if extra:
        raise FeedbackError(f"unknown field(s): {', '.join(extra)}; known: {', '.join(sorted(known))}", extra[0])
    rid = obj.get("request_id")
    if not isinstance(rid, str) or not rid.strip() or len(rid) > MAX_ID:
        raise FeedbackError(f"`request_id` must be a non-empty string of at most {MAX_ID} characters", "request_id")
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0.0 <= float(score) <= 1.0:
        raise FeedbackError("`score` must be a number between 0 and 1", "score")
    comment = obj.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT):
        raise FeedbackError(f"`comment` must be a string of at most {MAX_COMMENT} characters", "comment")
    model = obj.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip() or len(model) > MAX_ID):
        raise FeedbackError("`model` must be a non-empty string", "model")
    prompt = obj.get("prompt")
    if prompt is None and obj.get("messages") is not None:
        if not isinstance(obj["messages"], list):
            raise FeedbackError("`messages` must be a list of chat messages", "messages")
        prompt, _ = request_text({"messages": obj["messages"]}, max_chars=MAX_PROMPT)
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT):
        raise FeedbackError(f"`prompt` must be a string of at most {MAX_PROMPT} characters", "prompt")
    return Feedback(
        id="fb-" + uuid.uuid4().hex,
        request_id=rid.strip(),
        score=float(score),
        created=time.time(),
        comment=comment,
        model=model.strip() if model else None,
        prompt=prompt or None,
    )


class FeedbackStore(Protocol):
    kind: str

    async def append(self, fb: Feedback) -> None: ...

    async def read_all(self) -> list[Feedback]: ...

    async def close(self) -> None: ...


class FileFeedbackStore:
    """Append-only JSONL file; each record is one write() on an O_APPEND descriptor, then fsync."""

    kind = "file"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append_sync(self, fb: Feedback) -> None:
        line = (json.dumps(fb.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                view = memoryview(line)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                os.fsync(fd)
            finally:
                os.close(fd)

    async def append(self, fb: Feedback) -> None:
        await asyncio.to_thread(self.append_sync, fb)

    async def read_all(self) -> list[Feedback]:
        return read_feedback_file(self.path) if self.path.exists() else []

    async def close(self) -> None:
        return None


class RedisFeedbackStore:
    kind = "redis"

    def __init__(self, url: str, stream: str = STREAM) -> None:
        from concilium.core.redis import connect

        self.client = connect(url)
        self.stream = stream

    async def append(self, fb: Feedback) -> None:
        await self.client.xadd(self.stream, {"data": json.dumps(fb.to_json(), ensure_ascii=False)})

    async def read_all(self) -> list[Feedback]:
        out = []
        for _, fields in await self.client.xrange(self.stream):
            raw = fields.get(b"data") or fields.get("data")
            out.append(Feedback(**json.loads(raw)))
        return out

    async def close(self) -> None:
        await self.client.aclose()


def open_store(redis_url: str | None, data_dir: str | Path) -> FeedbackStore:
    if redis_url:
        return RedisFeedbackStore(redis_url)
    return FileFeedbackStore(Path(data_dir) / FILE_NAME)


def read_feedback_file(path: str | Path) -> list[Feedback]:
    fields = set(Feedback.__dataclass_fields__)
    return [Feedback(**{k: v for k, v in row.items() if k in fields}) for row in iter_jsonl(path)]


def read_decisions(path: str | Path) -> dict[str, tuple[str, str]]:
    """A routing-decision log: JSONL with `request_id`, the `model` that answered (or a RoutePlan's
    `candidates[0].model`) and the `prompt` (or `messages`). -> {request_id: (model, prompt)}."""
    out = {}
    for row in iter_jsonl(path):
        rid = row.get("request_id")
        model = row.get("model")
        if model is None and row.get("candidates"):
            model = row["candidates"][0].get("model")
        prompt = row.get("prompt")
        if prompt is None and isinstance(row.get("messages"), list):
            prompt, _ = request_text({"messages": row["messages"]})
        if isinstance(rid, str) and isinstance(model, str) and isinstance(prompt, str) and prompt:
            out[rid] = (model, prompt)
    return out


def feedback_outcomes(
    feedback: list[Feedback], decisions: dict[str, tuple[str, str]] | None = None, weight: float = 1.0
) -> tuple[list[Outcome], int]:
    """Feedback -> outcome records. A record carrying `model` and `prompt` stands alone; otherwise it
    is joined by request id to the decision log. Returns (records, number that could not be used).
    Several scores for the same request and model are averaged."""
    decisions = decisions or {}
    merged: dict[tuple[str, str], list[float]] = {}
    prompts: dict[tuple[str, str], str] = {}
    unusable = 0
    for fb in feedback:
        model, prompt = fb.model, fb.prompt
        if (model is None or prompt is None) and fb.request_id in decisions:
            d_model, d_prompt = decisions[fb.request_id]
            model, prompt = model or d_model, prompt or d_prompt
        if model is None or prompt is None:
            unusable += 1
            continue
        key = (fb.request_id, model)
        merged.setdefault(key, []).append(fb.score)
        prompts[key] = prompt
    records = [
        Outcome(prompt=prompts[k], scores={k[1]: sum(v) / len(v)}, id=f"feedback-{k[0]}", source="feedback", weight=weight)
        for k, v in merged.items()
    ]
    return records, unusable
