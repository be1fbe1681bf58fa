"""The feedback store (file and Redis), its HTTP route, and folding feedback into training records."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from starlette.testclient import TestClient

from concilium.router.feedback import (
    Feedback,
    FeedbackError,
    FileFeedbackStore,
    RedisFeedbackStore,
    feedback_outcomes,
    parse_feedback,
    read_feedback_file,
)
from tests.guard.support import RedisServer


def fb(i: int, **kw) -> Feedback:
    return parse_feedback({"request_id": f"req-{i}", "score": (i % 11) / 10, "comment": f"c{i}", **kw})


@pytest.mark.parametrize(
    "body, param",
    [
        ({"score": 1}, "request_id"),
        ({"request_id": "", "score": 1}, "request_id"),
        ({"request_id": "r"}, "score"),
        ({"request_id": "r", "score": 1.5}, "score"),
        ({"request_id": "r", "score": True}, "score"),
        ({"request_id": "r", "score": "0.5"}, "score"),
        ({"request_id": "r", "score": 1, "comment": 3}, "comment"),
        ({"request_id": "r", "score": 1, "colour": "red"}, "colour"),
        ({"request_id": "r", "score": 1, "messages": "hi"}, "messages"),
    ],
)
def test_validation_names_the_field(body, param):
    with pytest.raises(FeedbackError) as e:
        parse_feedback(body)
    assert e.value.param == param


def test_messages_become_the_prompt():
    f = parse_feedback({"request_id": "r", "score": 0, "model": "m", "messages": [{"role": "user", "content": "q?"}]})
    assert f.prompt == "q?" and f.model == "m" and f.id.startswith("fb-")


def test_file_store_keeps_every_concurrent_append(tmp_path):
    store = FileFeedbackStore(tmp_path / "var" / "feedback.jsonl")
    records = [fb(i, prompt="x" * (i * 37 % 5000)) for i in range(400)]
    with ThreadPoolExecutor(16) as ex:  # threads, as the gateway's to_thread calls are
        list(ex.map(store.append_sync, records[:200]))

    async def more():
        await asyncio.gather(*(store.append(r) for r in records[200:]))

    asyncio.run(more())
    lines = (tmp_path / "var" / "feedback.jsonl").read_text().splitlines()
    assert len(lines) == 400
    assert all(json.loads(line) for line in lines)  # no torn or interleaved lines
    back = read_feedback_file(tmp_path / "var" / "feedback.jsonl")
    assert sorted(b.id for b in back) == sorted(r.id for r in records)
    assert {b.request_id: b for b in back}["req-7"] == {r.request_id: r for r in records}["req-7"]


def test_redis_store_round_trip(tmp_path):
    srv = RedisServer.start(tmp_path / "redis")
    try:
        async def go():
            store = RedisFeedbackStore(srv.url)
            recs = [fb(i) for i in range(50)]
            await asyncio.gather(*(store.append(r) for r in recs))
            back = await store.read_all()
            await store.close()
            return recs, back

        recs, back = asyncio.run(go())
        assert sorted(b.id for b in back) == sorted(r.id for r in recs)
    finally:
        srv.kill()


def test_feedback_becomes_outcome_records():
    items = [
        fb(1, model="m", prompt="p1"),
        parse_feedback({"request_id": "req-1", "score": 0.0, "model": "m", "prompt": "p1"}),  # same request: averaged
        parse_feedback({"request_id": "req-2", "score": 1.0}),  # joined via the decision log
        parse_feedback({"request_id": "req-3", "score": 1.0}),  # no model, no prompt: unusable
    ]
    recs, unusable = feedback_outcomes(items, {"req-2": ("m2", "p2")}, weight=2.0)
    assert unusable == 1
    by_id = {r.id: r for r in recs}
    assert by_id["feedback-req-1"].scores == {"m": pytest.approx(0.05)} and by_id["feedback-req-1"].prompt == "p1"
    assert by_id["feedback-req-2"].scores == {"m2": 1.0} and by_id["feedback-req-2"].weight == 2.0


def _app(tmp_path, redis_url=None):
    from concilium.gateway.app import create_app
    from concilium.settings import Settings

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "models:\n  m:\n    provider: openai\n    base_url: http://127.0.0.1:9/v1\n    model: m\n"
        "routes:\n  - name: all\n    targets: [m]\nrouter:\n  learned: false\n"
    )
    settings = Settings(policy=str(policy), data_dir=str(tmp_path / "data"), redis_url=redis_url, policy_watch_s=0)
    return create_app(settings)


def _ask(client, rid: str) -> None:
    """A chat request with this id (its model is unreachable: a 502, still an answer to score)."""
    r = client.post("/v1/chat/completions", headers={"x-request-id": rid},
                    json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code >= 500 and r.headers["x-request-id"] == rid


def test_http_route_stores_and_rejects(tmp_path):
    with TestClient(_app(tmp_path)) as client:
        unknown = client.post("/v1/feedback", json={"request_id": "abc", "score": 0.8})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "request_not_found"
        _ask(client, "abc")
        r = client.post("/v1/feedback", json={"request_id": "abc", "score": 0.8, "comment": "good"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "feedback" and body["stored"] == "file" and body["request_id"] == "abc"
        bad = client.post("/v1/feedback", json={"request_id": "abc", "score": 2})
        assert bad.status_code == 400
        err = bad.json()["error"]
        assert err["param"] == "score" and err["type"] == "invalid_request_error" and "between 0 and 1" in err["message"]
        assert client.post("/v1/feedback", content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
    saved = read_feedback_file(tmp_path / "data" / "feedback.jsonl")
    assert [(s.request_id, s.score, s.comment) for s in saved] == [("abc", 0.8, "good")]


def test_http_route_says_503_when_redis_is_down(tmp_path):
    with TestClient(_app(tmp_path, "redis://127.0.0.1:9/0")) as client:
        r = client.post("/v1/feedback", json={"request_id": "abc", "score": 0.5})
        assert r.status_code == 503 and r.json()["error"]["code"] == "feedback_unavailable"
