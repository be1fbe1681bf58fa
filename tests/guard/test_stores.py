"""The in-process and Redis stores behave the same: all-or-none reservations, exact budgets under
concurrency, token buckets, lapsing reservations; Redis failover keeps serving and replays charges."""

from __future__ import annotations

import asyncio

import pytest

from concilium.guard.store import Charge, StoreUnavailable, Window
from concilium.guard.store_failover import FailoverStore
from concilium.guard.store_memory import MemoryStore
from concilium.guard.store_redis import RedisStore

W = Window.at(1_800_000_000.0)  # a fixed moment: 2027-01-15


def at(seconds: float) -> Window:
    return Window.at(W.now + seconds)


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    if request.param == "memory":
        yield MemoryStore()
        return
    srv = request.getfixturevalue("redis_server")
    s = RedisStore(srv.url)
    yield s
    await s.close()


async def test_budget_is_exact_under_concurrency(store):
    cap = 1_000_000  # nano-USD
    charge = Charge("key:k", 30_000, 10, cap_day=cap)
    results = await asyncio.gather(*(store.reserve(f"r{i}", [charge], 60, W) for i in range(50)))
    ok = [i for i, d in enumerate(results) if d is None]
    assert len(ok) == cap // 30_000 == 33
    denied = [d for d in results if d is not None]
    assert all(d.reason == "usd_per_day" and d.retry_after_s == 1.0 for d in denied)  # in flight: retry soon
    await asyncio.gather(*(store.settle(f"r{i}", [Charge("key:k", 30_000, 0)], W) for i in ok))
    u = await store.usage("key:k", None, None, W)
    assert (u.spent_day, u.spent_month, u.reserved) == (990_000, 990_000, 0)
    d = await store.reserve("late", [charge], 60, W)
    assert d is not None and d.retry_after_s == W.seconds_to_day_end()  # spent: wait for the next day


async def test_all_or_none_across_scopes(store):
    key = Charge("key:a", 500, 1, cap_day=10_000)
    team = Charge("team:t", 500, 1, cap_month=700)
    assert await store.reserve("r1", [key, team], 60, W) is None
    d = await store.reserve("r2", [key, team], 60, W)
    assert d is not None and d.scope == "team:t" and d.reason == "usd_per_month"
    assert (await store.usage("key:a", None, None, W)).reserved == 500  # r2 took nothing
    await store.settle("r1", [Charge("key:a", 200, 0), Charge("team:t", 200, 0)], W)
    assert (await store.usage("key:a", None, None, W)).reserved == 0
    assert await store.reserve("r3", [key, team], 60, W) is None  # 200 spent + 500 <= 700


async def test_request_bucket(store):
    c = Charge("key:r", 0, 0, rpm=3)
    assert [await store.reserve(f"q{i}", [c], 60, W) for i in range(3)] == [None, None, None]
    d = await store.reserve("q3", [c], 60, W)
    assert d is not None and d.reason == "requests_per_min" and d.retry_after_s == pytest.approx(20.0)
    assert await store.reserve("q4", [c], 60, at(10.0)) is not None  # half a request refilled
    assert await store.reserve("q5", [c], 60, at(20.0)) is None
    assert (await store.usage("key:r", 3, None, at(20.0))).requests_left == pytest.approx(0.0)


async def test_token_bucket_counts_then_corrects(store):
    c = Charge("key:t", 0, 100, tpm=250)
    assert [await store.reserve(f"q{i}", [c], 60, W) for i in range(3)] == [None, None, None]
    d = await store.reserve("q3", [c], 60, W)  # 300 counted against 250: in debt by 50
    assert d is not None and d.reason == "tokens_per_min" and d.retry_after_s == pytest.approx(51 * 60 / 250)
    # settling refunds what was counted but not used (each used 0 of its 100 tokens)
    await store.settle("q0", [Charge("key:t", 0, -100, tpm=250)], W)
    await store.settle("q1", [Charge("key:t", 0, -100, tpm=250)], W)
    assert (await store.usage("key:t", None, 250, W)).tokens_left == pytest.approx(150.0)
    assert await store.reserve("q4", [c], 60, W) is None


async def test_reservations_lapse(store):
    c = Charge("key:x", 900, 0, cap_day=1000)
    assert await store.reserve("crashed", [c], 5, W) is None
    assert await store.reserve("blocked", [c], 5, at(1)) is not None
    assert await store.reserve("later", [c], 5, at(6)) is None  # the crashed replica's hold expired


async def test_settle_after_lapse_still_charges(store):
    c = Charge("key:y", 100, 0, cap_day=1000)
    assert await store.reserve("slow", [c], 1, W) is None
    await store.settle("slow", [Charge("key:y", 80, 0)], at(5))
    u = await store.usage("key:y", None, None, at(5))
    assert (u.spent_day, u.reserved) == (80, 0)


async def test_month_window_keeps_day_spend_apart(store):
    c = Charge("key:m", 100, 0, cap_day=150, cap_month=250)
    assert await store.reserve("d1", [c], 60, W) is None
    await store.settle("d1", [Charge("key:m", 100, 0)], W)
    tomorrow = at(86400)
    assert await store.reserve("d2", [c], 60, tomorrow) is None
    await store.settle("d2", [Charge("key:m", 100, 0)], tomorrow)
    d = await store.reserve("d3", [c], 60, at(2 * 86400))  # a fresh day, but the month has 200 of 250
    assert d is not None and d.reason == "usd_per_month"


async def test_two_redis_clients_never_overspend(redis_server):
    a, b = RedisStore(redis_server.url, timeout_s=5.0), RedisStore(redis_server.url, timeout_s=5.0)
    c = Charge("key:shared", 1_000, 0, cap_day=25_000)
    try:
        results = await asyncio.gather(*((a if i % 2 else b).reserve(f"x{i}", [c], 60, W) for i in range(60)))
        assert sum(r is None for r in results) == 25
    finally:
        await a.close()
        await b.close()


async def test_failover_serves_locally_and_replays(redis_server):
    primary = RedisStore(redis_server.url, timeout_s=0.3)
    fo = FailoverStore(primary, retry_every_s=0.0)
    c = Charge("key:f", 100, 0, cap_day=1000)
    assert await fo.reserve("before", [c], 60, W) is None
    await fo.settle("before", [Charge("key:f", 300, 0)], W)
    assert await fo.reserve("seen", [c], 60, W) is None  # learns spent_day = 300
    redis_server.kill()
    with pytest.raises(StoreUnavailable):
        await primary.ping()
    await fo.settle("seen", [Charge("key:f", 100, 0)], W)  # settle during the outage: queued
    assert fo.degraded and len(fo.pending) == 1
    # locally: 300 known + 100 settled; 6 more of 100 fit under 1000
    results = [await fo.reserve(f"local{i}", [c], 60, W) for i in range(7)]
    assert [r is None for r in results] == [True] * 6 + [False]
    for i in range(6):
        await fo.settle(f"local{i}", [Charge("key:f", 100, 0)], W)
    redis_server.restart()
    # a new Redis is empty; what this replica settled while it was down is replayed into it
    assert await fo.reserve("after", [Charge("key:f", 0, 0)], 60, W) is None
    for _ in range(100):
        if not fo.pending:
            break
        await asyncio.sleep(0.02)
    assert not fo.degraded and not fo.pending
    u = await primary.usage("key:f", None, None, W)
    assert u.spent_day == 700  # 1 + 6 charges of 100 settled during the outage, none lost
    await fo.close()


async def test_redis_settle_is_applied_once(redis_server):
    s = RedisStore(redis_server.url)
    try:
        c = Charge("key:once", 100, 0, cap_day=1000)
        assert await s.reserve("r", [c], 60, W) is None
        for _ in range(3):  # a settle replayed after a lost reply
            await s.settle("r", [Charge("key:once", 70, 0)], W)
        u = await s.usage("key:once", None, None, W)
        assert (u.spent_day, u.reserved) == (70, 0)
    finally:
        await s.close()
