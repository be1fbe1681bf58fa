"""The job store contract, checked on both implementations (in memory, and Redis)."""

from __future__ import annotations

import asyncio
import time
import uuid

import orjson
import pytest
import redis

from concilium.workers.responses import ev
from concilium.workers.store import CapExceeded, IdempotencyConflict, MemoryJobStore
from concilium.workers.store_redis import RedisJobStore
from tests.workers.support import SHARED_REDIS

SPEC = {"body": {"messages": [{"role": "user", "content": "hello"}]}, "plan": {"route": "r"}, "ttl_s": 60,
        "response": {}}


async def _redis_store(retry_s: float):
    """A Redis job store under a prefix of its own, removed afterwards."""
    prefix = f"test-store-{uuid.uuid4().hex[:8]}:"
    s = RedisJobStore(SHARED_REDIS, prefix, retry_s=retry_s)
    yield s
    await s.close()
    r = redis.Redis.from_url(SHARED_REDIS)
    keys = list(r.scan_iter(match=f"{prefix}*"))
    if keys:
        r.delete(*keys)


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        yield MemoryJobStore()
        return
    async for s in _redis_store(retry_s=0):
        yield s


async def _create(store, job_id=None, owner="o", cap=10, idem=None, fp="f", ttl_s=60):
    job_id = job_id or "resp_" + uuid.uuid4().hex
    return await store.create(job_id, SPEC, [ev("response.created", n=1), ev("response.queued", n=2)],
                              owner=owner, cap=cap, idem=idem, fingerprint=fp, ttl_s=ttl_s,
                              active_until=time.time() + 60)


async def test_events_are_numbered_and_read_after_a_sequence_number(store):
    job_id, created = await _create(store)
    assert created
    rec = await store.get(job_id)
    assert rec["status"] == "queued" and rec["seq"] == 1 and rec["owner"] == "o"
    events = await store.read(job_id)
    assert [(e.seq, e.type) for e in events] == [(0, "response.created"), (1, "response.queued")]
    assert events[1].json() == {"sequence_number": 1, "type": "response.queued", "n": 2}
    assert [e.seq for e in await store.read(job_id, after=0)] == [1]
    assert await store.read(job_id, after=1) == []
    assert await store.read("resp_missing") == []


async def test_idempotency_key_returns_the_same_job_or_refuses_a_different_request(store):
    a, created_a = await _create(store, idem="key-1", fp="same")
    b, created_b = await _create(store, idem="key-1", fp="same")
    assert created_a and (b, created_b) == (a, False)
    with pytest.raises(IdempotencyConflict) as e:
        await _create(store, idem="key-1", fp="other")
    assert e.value.job_id == a
    c, created_c = await _create(store, idem="key-1", fp="same", owner="someone-else")
    assert created_c and c != a


async def test_cap_counts_queued_and_running_jobs_per_owner(store):
    ids = [(await _create(store, cap=2))[0] for _ in range(2)]
    with pytest.raises(CapExceeded) as e:
        await _create(store, cap=2)
    assert (e.value.active, e.value.cap) == (2, 2)
    assert (await _create(store, cap=2, owner="other"))[1]
    assert await store.finish(ids[0], token=None, status="cancelled", result={}, events=[], bill=None, ttl_s=60)
    assert (await _create(store, cap=2))[1]


async def test_claim_lease_and_fencing(store):
    job_id, _ = await _create(store)
    first = await store.claim(job_id, "t1", "w1", 0.3, 3)
    assert first.state == "claimed" and first.attempts == 1 and first.started_at > 0
    assert (await store.get(job_id))["status"] == "in_progress"
    busy = await store.claim(job_id, "t2", "w2", 0.3, 3)
    assert busy.state == "busy" and 0 < busy.retry_in <= 0.3
    assert await store.append(job_id, "t1", [ev("response.output_text.delta", delta="a")]) == 2
    deadline = time.monotonic() + 5
    while (second := await store.claim(job_id, "t2", "w2", 5, 3)).state == "busy":  # until t1's lease lapses
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert second.state == "claimed" and second.attempts == 2 and second.started_at == first.started_at
    assert await store.append(job_id, "t1", [ev("response.output_text.delta", delta="late")]) is None
    assert not await store.renew(job_id, "t1", 5)
    assert await store.renew(job_id, "t2", 5)
    assert await store.append(job_id, "t2", [ev("response.output_text.delta", delta="b")], model="m") == 3
    rec = await store.get(job_id)
    assert rec["attempts"] == 2 and rec["worker"] == "w2" and rec["model"] == "m"


async def test_attempts_are_capped(store):
    job_id, _ = await _create(store)
    for i in range(2):
        assert (await store.claim(job_id, f"t{i}", "w", 0.001, 2)).state == "claimed"
        await asyncio.sleep(0.01)
    assert (await store.claim(job_id, "t9", "w", 0.001, 2)).state == "exhausted"


async def test_finish_happens_once_with_its_events_and_bill(store):
    job_id, _ = await _create(store)
    await store.claim(job_id, "t1", "w1", 5, 3)
    assert not await store.finish(job_id, token="wrong", status="completed", result={}, events=[], bill=None,
                                  ttl_s=60)
    assert not await store.finish(job_id, token=None, status="cancelled", result={}, events=[], bill=None,
                                  ttl_s=60, only_if="queued")
    bill = {"owner": "o", "model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}, "cost_usd": 0.5}
    assert await store.finish(job_id, token="t1", status="completed", result={"text": "hi"},
                              events=[ev("response.completed", response={})], bill=bill, ttl_s=60)
    assert not await store.finish(job_id, token="t1", status="failed", result={}, events=[], bill=bill, ttl_s=60)
    assert not await store.finish(job_id, token=None, status="cancelled", result={}, events=[], bill=bill, ttl_s=60)
    rec = await store.get(job_id)
    assert rec["status"] == "completed" and rec["result"] == {"text": "hi"}
    assert [e.type for e in await store.read(job_id, after=1)] == ["response.completed"]
    assert await store.bills(job_id) == [dict(bill, job_id=job_id)]
    assert await store.append(job_id, "t1", [ev("response.output_text.delta", delta="x")]) is None
    assert (await store.claim(job_id, "t2", "w2", 5, 3)).state == "terminal"


async def test_a_blocked_reader_wakes_up_on_append(store):
    job_id, _ = await _create(store)
    await store.claim(job_id, "t1", "w1", 5, 3)
    reader = asyncio.ensure_future(store.read(job_id, after=1, block_s=10))
    await asyncio.sleep(0.1)
    assert not reader.done()
    t0 = time.monotonic()
    await store.append(job_id, "t1", [ev("response.output_text.delta", delta="x")])
    events = await asyncio.wait_for(reader, 5)
    assert [e.seq for e in events] == [2] and time.monotonic() - t0 < 5
    assert await store.read(job_id, after=2, block_s=0.2) == []


async def test_cancel_request_wakes_a_waiter(store):
    job_id, _ = await _create(store)
    other, _ = await _create(store)
    assert not await store.cancel_requested(job_id)
    waiter = asyncio.ensure_future(store.wait_cancel(job_id, 10))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    assert await store.request_cancel(job_id)
    assert await asyncio.wait_for(waiter, 5)
    assert await store.cancel_requested(job_id) and await store.wait_cancel(job_id, 0)
    assert not await store.wait_cancel(other, 0.2)
    assert not await store.request_cancel("resp_missing")


async def test_ended_jobs_expire_after_their_ttl(store):
    job_id, _ = await _create(store)
    assert await store.finish(job_id, token=None, status="cancelled", result={}, events=[], bill=None, ttl_s=1)
    deadline = time.monotonic() + 10
    while await store.get(job_id) is not None:
        assert time.monotonic() < deadline, "the job did not expire"
        await asyncio.sleep(0.1)
    assert await store.read(job_id) == []


def test_event_json_keeps_its_bytes():
    from concilium.workers.store import with_seq

    assert orjson.loads(with_seq(b'{"type":"x","a":[]}', 7)) == {"sequence_number": 7, "type": "x", "a": []}


@pytest.fixture
async def redis_store():
    async for s in _redis_store(retry_s=1):
        yield s


async def test_a_read_may_block_longer_than_the_clients_read_timeout(redis_store):
    """The client's read timeout is 5 s; a job's stream waits 15 s between keep-alives."""
    job_id, _ = await _create(redis_store)
    await redis_store.claim(job_id, "t1", "w1", 30, 3)
    t0 = time.monotonic()
    assert await redis_store.read(job_id, 1, block_s=6.5) == []  # nothing new: empty, not "unreachable"
    assert time.monotonic() - t0 >= 6.4

    async def later():
        await asyncio.sleep(5.5)
        await redis_store.append(job_id, "t1", [ev("response.output_text.delta", delta="late")])

    task = asyncio.ensure_future(later())
    got = await redis_store.read(job_id, 1, block_s=8)  # the event comes after the first 5 s slice
    await task
    assert [(e.seq, e.json()["delta"]) for e in got] == [(2, "late")]


async def test_waiting_for_a_cancel_longer_than_the_read_timeout(redis_store):
    job_id, _ = await _create(redis_store)

    async def later():
        await asyncio.sleep(5.5)
        await redis_store.request_cancel(job_id)

    task = asyncio.ensure_future(later())
    assert await redis_store.wait_cancel(job_id, 8) is True
    await task
