"""The job store in Redis: every state change is one Lua script, so it is atomic across any number
of gateway replicas and workers.

Keys (prefix P, `concilium:jobs:` by default):
  P job:<id>          hash: status, spec (JSON), owner, seq (last sequence number), attempts, token
                      (the current owner's), worker, started_at, cancel, model, result (JSON)
  P job:<id>:ev       stream: one entry per event, entry id 0-<seq+1>, fields t (type) and d (JSON)
  P job:<id>:lease    the current owner's token, with the lease as its TTL
  P job:<id>:cancel   list: a cancel request wakes the running job (BLPOP) at once
  P idem:<owner>:<h>  "<job id> <request fingerprint>" for an Idempotency-Key
  P active:<owner>    sorted set: the owner's queued and running jobs, scored by when they lapse
  P bills             stream: the billing ledger, one entry per ended job that used tokens
A store operation that finds Redis unreachable retries (with backoff) for CONCILIUM_JOBS_REDIS_RETRY_S.
Blocking reads wait in slices shorter than the client's read timeout (`concilium.core.redis`), so a
stream may stay open for as long as its job runs.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any

import orjson

from concilium.core.redis import DOWN, block_slices, connect, max_block_s
from concilium.workers.store import (
    TERMINAL,
    CapExceeded,
    Claim,
    Event,
    IdempotencyConflict,
    JobStore,
    NewEvent,
    StoreUnavailable,
)

# Appends events from ARGV[first], ARGV[first+1], ... (type, JSON) to stream KEYS[2]; returns last seq.
_APPEND_FN = """
local function add_events(first)
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
  for i = first, #ARGV, 2 do
    seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
    redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 't', ARGV[i],
               'd', '{"sequence_number":' .. seq .. ',' .. string.sub(ARGV[i + 1], 2))
  end
  return seq
end
local function terminal(st)
  return st == 'completed' or st == 'incomplete' or st == 'failed' or st == 'cancelled'
end
"""

# KEYS job, ev, idem, active | ARGV id, spec, owner, cap, use_idem, fingerprint, ttl, now, until, events...
_CREATE = _APPEND_FN + """
if ARGV[5] == '1' then
  local hit = redis.call('GET', KEYS[3])
  if hit then return {'exists', hit} end
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[8])
local n = redis.call('ZCARD', KEYS[4])
if n >= tonumber(ARGV[4]) then return {'cap', tostring(n)} end
redis.call('ZADD', KEYS[4], ARGV[9], ARGV[1])
redis.call('EXPIRE', KEYS[4], ARGV[7])
redis.call('HSET', KEYS[1], 'status', 'queued', 'spec', ARGV[2], 'owner', ARGV[3], 'seq', -1,
           'attempts', 0, 'cancel', 0)
add_events(10)
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[7])
if ARGV[5] == '1' then redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. ARGV[6], 'EX', ARGV[7]) end
return {'created', ARGV[1]}
"""

# KEYS job, lease | ARGV token, lease_ms, worker, max_attempts, now
_CLAIM = _APPEND_FN + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if terminal(st) then return {'terminal', st} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'busy', tostring(redis.call('PTTL', KEYS[2]))} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local started = redis.call('HGET', KEYS[1], 'started_at')
if attempts > tonumber(ARGV[4]) then return {'exhausted', tostring(attempts), started or '0'} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if not started then
  started = ARGV[5]
  redis.call('HSET', KEYS[1], 'started_at', started)
end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'token', ARGV[1], 'worker', ARGV[3])
return {'claimed', tostring(attempts), started}
"""

# KEYS job, lease | ARGV token, lease_ms
_RENEW = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS job, ev | ARGV token, model ('' = unchanged), events...
_APPEND = _APPEND_FN + """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -10 end
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return -20 end
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'model', ARGV[2]) end
return add_events(3)
"""

# KEYS job, ev, lease, active, bills, cancel list | ARGV token ('' = force), status, result, ttl, id, bill, only_if, events...
_FINISH = _APPEND_FN + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return -1 end
if terminal(st) then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return -2 end
if ARGV[7] ~= '' and st ~= ARGV[7] then return -3 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'result', ARGV[3])
add_events(8)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('DEL', KEYS[3], KEYS[6])
redis.call('ZREM', KEYS[4], ARGV[5])
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'job', ARGV[5], 'bill', ARGV[6])
end
return 1
"""

# KEYS job, cancel list: the flag stays in the hash; the list wakes the running job's watcher.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cancel', 1)
redis.call('RPUSH', KEYS[2], 1)
redis.call('EXPIRE', KEYS[2], 86400)
return 1
"""

def _guarded(method):
    """Redis unreachable (after the client's retries) -> StoreUnavailable, with what went wrong."""
    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except (*DOWN, OSError) as e:
            raise StoreUnavailable(f"Redis is unreachable ({type(e).__name__}: {e})") from None

    return wrapper


def _pairs(events: list[NewEvent]) -> list[Any]:
    out: list[Any] = []
    for etype, data in events:
        out += [etype, data]
    return out


class RedisJobStore(JobStore):
    def __init__(self, url: str, prefix: str = "concilium:jobs:", retry_s: float = 30.0) -> None:
        self.redis = connect(url, retry_s=retry_s)  # rides out a Redis restart
        self.p = prefix
        self._max_block_s = max_block_s(self.redis)
        r = self.redis
        self._create, self._claim = r.register_script(_CREATE), r.register_script(_CLAIM)
        self._renew, self._append = r.register_script(_RENEW), r.register_script(_APPEND)
        self._finish, self._cancel = r.register_script(_FINISH), r.register_script(_CANCEL)

    def _k(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}"

    async def close(self) -> None:
        await self.redis.aclose()

    @_guarded
    async def create(self, job_id, spec, events, *, owner, cap, idem, fingerprint, ttl_s, active_until):
        idem_key = f"{self.p}idem:{owner}:{hashlib.sha256(idem.encode()).hexdigest()[:32]}" if idem else f"{self.p}idem:-"
        k = self._k(job_id)
        res = await self._create(
            keys=[k, k + ":ev", idem_key, f"{self.p}active:{owner}"],
            args=[job_id, orjson.dumps(spec), owner, cap, "1" if idem else "0", fingerprint, ttl_s,
                  time.time(), active_until, *_pairs(events)])
        kind = res[0].decode()
        if kind == "exists":
            other, _, fp = res[1].decode().partition(" ")
            if fp != fingerprint:
                raise IdempotencyConflict(other)
            return other, False
        if kind == "cap":
            raise CapExceeded(int(res[1]), cap)
        return job_id, True

    @_guarded
    async def get(self, job_id):
        h = await self.redis.hgetall(self._k(job_id))
        if not h:
            return None
        g = {k.decode(): v for k, v in h.items()}
        return {"status": g["status"].decode(), "spec": orjson.loads(g["spec"]),
                "result": orjson.loads(g["result"]) if g.get("result") else None,
                "attempts": int(g.get("attempts", 0)), "worker": g.get("worker", b"").decode(),
                "started_at": float(g.get("started_at", 0) or 0), "cancel": g.get("cancel") == b"1",
                "seq": int(g.get("seq", -1)), "owner": g.get("owner", b"").decode(),
                "model": g.get("model", b"").decode()}

    @_guarded
    async def claim(self, job_id, token, worker, lease_s, max_attempts):
        k = self._k(job_id)
        res = await self._claim(keys=[k, k + ":lease"],
                                args=[token, int(lease_s * 1000), worker, max_attempts, time.time()])
        state = res[0].decode()
        if state == "terminal":
            return Claim("terminal", status=res[1].decode())
        if state == "busy":
            return Claim("busy", retry_in=max(0.0, int(res[1]) / 1000))
        if state in ("claimed", "exhausted"):
            return Claim(state, attempts=int(res[1]), started_at=float(res[2]))
        return Claim(state)

    @_guarded
    async def renew(self, job_id, token, lease_s):
        k = self._k(job_id)
        return bool(await self._renew(keys=[k, k + ":lease"], args=[token, int(lease_s * 1000)]))

    @_guarded
    async def append(self, job_id, token, events, model=None):
        k = self._k(job_id)
        seq = int(await self._append(keys=[k, k + ":ev"], args=[token, model or "", *_pairs(events)]))
        return seq if seq > -10 else None

    @_guarded
    async def finish(self, job_id, *, token, status, result, events, bill, ttl_s, only_if=None):
        assert status in TERMINAL, status
        k = self._k(job_id)
        owner = await self.redis.hget(k, "owner")
        if owner is None:
            return False
        res = await self._finish(
            keys=[k, k + ":ev", k + ":lease", f"{self.p}active:{owner.decode()}", f"{self.p}bills", k + ":cancel"],
            args=[token or "", status, orjson.dumps(result), ttl_s, job_id,
                  orjson.dumps(bill) if bill is not None else "", only_if or "", *_pairs(events)])
        return int(res) == 1

    @_guarded
    async def read(self, job_id, after=-1, block_s=0.0, count=1000):
        streams = {self._k(job_id) + ":ev": f"0-{after + 1}"}
        if block_s <= 0:
            res = await self.redis.xread(streams, count=count)
        else:  # XREAD BLOCK answers at once when there are events already
            res = None
            for block in block_slices(block_s, self._max_block_s):
                res = await self.redis.xread(streams, count=count, block=max(1, int(block * 1000)))
                if res:
                    break
        if not res:
            return []
        out = []
        for entry_id, fields in res[0][1]:
            seq = int(entry_id.split(b"-")[1]) - 1
            out.append(Event(seq, fields[b"t"].decode(), fields[b"d"]))
        return out

    @_guarded
    async def request_cancel(self, job_id):
        k = self._k(job_id)
        return bool(await self._cancel(keys=[k, k + ":cancel"], args=[]))

    @_guarded
    async def cancel_requested(self, job_id):
        return await self.redis.hget(self._k(job_id), "cancel") == b"1"

    @_guarded
    async def wait_cancel(self, job_id, timeout):
        for block in block_slices(timeout, self._max_block_s):
            if await self.redis.blpop([self._k(job_id) + ":cancel"], timeout=max(0.01, round(block, 3))) is not None:
                return True
        return await self.cancel_requested(job_id) if timeout <= 0 else False

    @_guarded
    async def bills(self, job_id=None):
        out = []
        for _, fields in await self.redis.xrange(f"{self.p}bills"):
            if job_id is None or fields[b"job"].decode() == job_id:
                out.append(dict(orjson.loads(fields[b"bill"]), job_id=fields[b"job"].decode()))
        return out
