from __future__ import annotations

import pytest

from tests.guard.support import RedisServer


@pytest.fixture
def redis_server(tmp_path):
    srv = RedisServer.start(tmp_path / "redis")
    yield srv
    srv.kill()
