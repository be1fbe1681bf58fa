"""The record of recent request ids and who made them (for /v1/feedback): bounded, shared in Redis."""

from __future__ import annotations

from concilium.gateway.recent import RecentRequests


async def test_the_last_ids_are_kept_in_process():
    recent = RecentRequests(size=3)
    for i in range(5):
        recent.add(f"r{i}", "alice" if i % 2 else "bob")
    assert [await recent.owner(f"r{i}") for i in range(5)] == [None, None, "bob", "alice", "bob"]
    await recent.close()


async def test_replicas_share_the_record_through_redis(tmp_path):
    from tests.guard.support import RedisServer

    server = RedisServer.start(tmp_path / "redis")  # .ci/run installs redis-server
    try:
        one, two = RecentRequests(server.url), RecentRequests(server.url)
        one.add("req-1", "alice")
        await one.flushed()
        assert await two.owner("req-1") == "alice"  # answered by the other replica
        assert await two.owner("req-2") is None
        await one.close()
        await two.close()
    finally:
        server.kill()
