"""The one way Concilium opens a Redis client, with one timeout policy.

- Every command has a read timeout (`timeout_s`, 5 s by default): a dead server or a half-open
  connection is noticed instead of hanging a request.
- Opening a connection may take up to `CONNECT_TIMEOUT_S` whatever the read timeout: a refused
  connection fails at once anyway, and a busy machine opening a burst of connections must not read
  as a Redis outage.
- A blocking command (XREAD BLOCK, BLPOP) must therefore never block for longer than the read
  timeout, or the client gives up on a healthy server. Callers wait in slices of at most
  `max_block_s(client)` (see `block_slices`), so a stream can stay open for hours.
- `retry_s` is how long a failed command keeps retrying with backoff (a Redis restart): workers ride
  out a restart, a gateway request fails fast, the budget guard (which has an in-process failover)
  does not retry at all.

Used by the job store, the guard's limits store and the feedback store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

TIMEOUT_S = 5.0  # read timeout of every command
CONNECT_TIMEOUT_S = 2.0
BLOCK_MARGIN_S = 1.0  # a blocking command returns this long before the read timeout would fire

DOWN = (RedisConnectionError, RedisTimeoutError, BusyLoadingError)


def _retries(retry_s: float, backoff: ExponentialBackoff) -> int:
    """How many retries add up to about `retry_s` seconds of backoff."""
    n, waited = 0, 0.0
    while waited < retry_s:
        n += 1
        waited += backoff.compute(n)
    return n


def connect(url: str, *, retry_s: float = 0.0, timeout_s: float = TIMEOUT_S,
            decode_responses: bool = False) -> Redis:
    """An asyncio Redis client under the timeout policy above."""
    if retry_s > 0:
        backoff = ExponentialBackoff(cap=0.5, base=0.05)
        retry = Retry(backoff, _retries(retry_s, backoff))
    else:
        retry = Retry(NoBackoff(), 0)
    return Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=CONNECT_TIMEOUT_S,
                          health_check_interval=10, retry=retry, retry_on_error=list(DOWN),
                          decode_responses=decode_responses)


def max_block_s(client: Redis) -> float:
    """The longest one blocking command on `client` may wait."""
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout") or TIMEOUT_S
    return max(0.05, timeout - min(BLOCK_MARGIN_S, timeout / 2))


def block_slices(total_s: float, limit_s: float) -> Iterator[float]:
    """Wait `total_s` in slices of at most `limit_s` (each > 0); nothing when `total_s` <= 0."""
    deadline = time.monotonic() + total_s
    while (left := deadline - time.monotonic()) > 0:
        yield min(left, limit_s)
