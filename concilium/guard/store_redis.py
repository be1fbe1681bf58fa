"""The limits store in Redis: every reserve and settle is one Lua script, so it is atomic across any
number of gateway replicas sharing the Redis.

Per scope S (prefix `concilium:guard:`):
  S:rl          hash: rq/rqt (requests bucket level and stamp), tk/tkt (tokens bucket)
  S:d:<day>     spend that UTC day, nano-USD (expires after 3 days)
  S:m:<month>   spend that UTC month, nano-USD (expires after 40 days)
  S:rsv         hash: request id -> reserved nano-USD
  S:rsvx        sorted set: request id by expiry (a crashed replica's reservations lapse)
  S:rsvt        total reserved nano-USD
  settled:<rid> the request was settled (kept 3 days: a replayed settle is not counted twice)
Time comes from the gateway (seconds since the epoch); a bucket never refills backwards.
"""

from __future__ import annotations

from concilium.core.redis import DOWN, connect
from concilium.guard.store import Charge, Denied, ScopeUsage, StoreUnavailable, Window
from concilium.guard.store_memory import IN_FLIGHT_RETRY_S

PREFIX = "concilium:guard:"
_PER_SCOPE_KEYS = 6
_DOWN = (*DOWN, OSError)

_COMMON = """
local now = tonumber(ARGV[2])
local function refill(level, stamp, cap)
  if not level then return cap end
  local l = tonumber(level) + math.max(0, now - tonumber(stamp)) * cap / 60.0
  if l > cap then l = cap end
  return l
end
local function expire_reservations(k)
  local gone = redis.call('ZRANGEBYSCORE', KEYS[k + 5], '-inf', now)
  for _, r in ipairs(gone) do
    local amt = redis.call('HGET', KEYS[k + 4], r)
    if amt then
      redis.call('DECRBY', KEYS[k + 6], amt)
      redis.call('HDEL', KEYS[k + 4], r)
    end
    redis.call('ZREM', KEYS[k + 5], r)
  end
end
"""

# ARGV: rid, now, ttl, n, then per scope: nano, tokens, cap_day, cap_month, rpm, tpm (-1/0 = none)
RESERVE = _COMMON + """
local rid, ttl, n = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local levels = {}
local out = {0}
for i = 1, n do
  local k, a = (i - 1) * 6, 4 + (i - 1) * 6
  local nano, cap_d, cap_m = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local rpm, tpm = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6])
  expire_reservations(k)
  local rq, tk = false, false
  if rpm > 0 then
    local v = redis.call('HMGET', KEYS[k + 1], 'rq', 'rqt')
    rq = refill(v[1], v[2], rpm)
    if rq < 1 then return {1, i, 'requests_per_min', tostring((1 - rq) * 60 / rpm)} end
  end
  if tpm > 0 then
    local v = redis.call('HMGET', KEYS[k + 1], 'tk', 'tkt')
    tk = refill(v[1], v[2], tpm)
    if tk <= 0 then return {1, i, 'tokens_per_min', tostring((1 - tk) * 60 / tpm)} end
  end
  local sd = tonumber(redis.call('GET', KEYS[k + 2]) or '0')
  local sm = tonumber(redis.call('GET', KEYS[k + 3]) or '0')
  local rs = tonumber(redis.call('GET', KEYS[k + 6]) or '0')
  if cap_d >= 0 and sd + rs + nano > cap_d then
    return {1, i, 'usd_per_day', (sd + nano <= cap_d) and 'in_flight' or 'window'}
  end
  if cap_m >= 0 and sm + rs + nano > cap_m then
    return {1, i, 'usd_per_month', (sm + nano <= cap_m) and 'in_flight' or 'window'}
  end
  levels[i] = {rq, tk}
  table.insert(out, tostring(sd))
  table.insert(out, tostring(sm))
end
for i = 1, n do
  local k, a = (i - 1) * 6, 4 + (i - 1) * 6
  local rq, tk = levels[i][1], levels[i][2]
  if rq then redis.call('HSET', KEYS[k + 1], 'rq', tostring(rq - 1), 'rqt', ARGV[2]) end
  if tk then
    redis.call('HSET', KEYS[k + 1], 'tk', tostring(tk - tonumber(ARGV[a + 2])), 'tkt', ARGV[2])
  end
  if rq or tk then redis.call('EXPIRE', KEYS[k + 1], 86400) end
  if tonumber(ARGV[a + 1]) > 0 and redis.call('HSETNX', KEYS[k + 4], rid, ARGV[a + 1]) == 1 then
    redis.call('INCRBY', KEYS[k + 6], ARGV[a + 1])
    redis.call('ZADD', KEYS[k + 5], now + ttl, rid)
    for j = 4, 6 do redis.call('EXPIRE', KEYS[k + j], math.ceil(ttl) * 2 + 60) end
  end
end
return out
"""

# ARGV: rid, now, n, then per scope: nano, tokens, tpm. The last KEY marks the request settled, so a
# settle that is retried (its reply was lost when Redis died) is applied once.
SETTLE = _COMMON + """
local rid, n = ARGV[1], tonumber(ARGV[3])
if redis.call('SET', KEYS[#KEYS], '1', 'NX', 'EX', 3 * 86400) == false then return 0 end
for i = 1, n do
  local k, a = (i - 1) * 6, 3 + (i - 1) * 3
  local amt = redis.call('HGET', KEYS[k + 4], rid)
  if amt then
    redis.call('DECRBY', KEYS[k + 6], amt)
    redis.call('HDEL', KEYS[k + 4], rid)
    redis.call('ZREM', KEYS[k + 5], rid)
  end
  if tonumber(ARGV[a + 1]) > 0 then
    redis.call('INCRBY', KEYS[k + 2], ARGV[a + 1])
    redis.call('EXPIRE', KEYS[k + 2], 3 * 86400)
    redis.call('INCRBY', KEYS[k + 3], ARGV[a + 1])
    redis.call('EXPIRE', KEYS[k + 3], 40 * 86400)
  end
  local tokens, tpm = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if tpm > 0 and tokens ~= 0 then
    local v = redis.call('HMGET', KEYS[k + 1], 'tk', 'tkt')
    local tk = math.min(tpm, refill(v[1], v[2], tpm) - tokens)
    redis.call('HSET', KEYS[k + 1], 'tk', tostring(tk), 'tkt', ARGV[2])
    redis.call('EXPIRE', KEYS[k + 1], 86400)
  end
end
return 0
"""

# ARGV: -, now, rpm, tpm
USAGE = _COMMON + """
expire_reservations(0)
local v = redis.call('HMGET', KEYS[1], 'rq', 'rqt', 'tk', 'tkt')
local rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4])
local rq, tk = '', ''
if rpm > 0 then rq = tostring(refill(v[1], v[2], rpm)) end
if tpm > 0 then tk = tostring(refill(v[3], v[4], tpm)) end
return {redis.call('GET', KEYS[2]) or '0', redis.call('GET', KEYS[3]) or '0',
        redis.call('GET', KEYS[6]) or '0', rq, tk}
"""


def _keys(scope: str, w: Window) -> list[str]:
    s = PREFIX + scope
    return [s + ":rl", f"{s}:d:{w.day}", f"{s}:m:{w.month}", s + ":rsv", s + ":rsvx", s + ":rsvt"]


def _opt(v: int | None, none: int) -> str:
    return str(none if v is None else v)


class RedisStore:
    def __init__(self, url: str, timeout_s: float = 0.5) -> None:
        self.url = url
        # No retries: a slow or absent Redis fails over to the in-process store at once.
        self.redis = connect(url, timeout_s=timeout_s, decode_responses=True)
        self._reserve = self.redis.register_script(RESERVE)
        self._settle = self.redis.register_script(SETTLE)
        self._usage = self.redis.register_script(USAGE)
        self.last_spent: dict[str, tuple[str, int, int]] = {}  # scope -> (day, spent_day, spent_month)

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except _DOWN as e:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {e}") from None

    async def reserve(self, rid: str, charges: list[Charge], ttl_s: float, w: Window) -> Denied | None:
        keys: list[str] = []
        args: list[str] = [rid, repr(w.now), repr(ttl_s), str(len(charges))]
        for c in charges:
            keys += _keys(c.scope, w)
            args += [str(c.nano), str(c.tokens), _opt(c.cap_day, -1), _opt(c.cap_month, -1),
                     _opt(c.rpm, 0), _opt(c.tpm, 0)]
        try:
            out = await self._reserve(keys=keys, args=args)
        except _DOWN as e:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {e}") from None
        if int(out[0]) == 0:
            for i, c in enumerate(charges):
                self.last_spent[c.scope] = (w.day, int(out[1 + 2 * i]), int(out[2 + 2 * i]))
            return None
        c = charges[int(out[1]) - 1]
        reason, extra = str(out[2]), str(out[3])
        if reason == "requests_per_min":
            return Denied(c.scope, reason, c.rpm or 0, float(extra))
        if reason == "tokens_per_min":
            return Denied(c.scope, reason, c.tpm or 0, float(extra))
        cap = c.cap_day if reason == "usd_per_day" else c.cap_month
        end = w.seconds_to_day_end() if reason == "usd_per_day" else w.seconds_to_month_end()
        return Denied(c.scope, reason, (cap or 0) / 1e9, IN_FLIGHT_RETRY_S if extra == "in_flight" else end)

    async def settle(self, rid: str, charges: list[Charge], w: Window) -> None:
        keys: list[str] = []
        args: list[str] = [rid, repr(w.now), str(len(charges))]
        for c in charges:
            keys += _keys(c.scope, w)
            args += [str(c.nano), str(c.tokens), _opt(c.tpm, 0)]
        keys.append(PREFIX + "settled:" + rid)
        try:
            await self._settle(keys=keys, args=args)
        except _DOWN as e:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {e}") from None

    async def usage(self, scope: str, rpm: int | None, tpm: int | None, w: Window) -> ScopeUsage:
        try:
            out = await self._usage(keys=_keys(scope, w), args=["", repr(w.now), _opt(rpm, 0), _opt(tpm, 0)])
        except _DOWN as e:
            raise StoreUnavailable(f"redis at {self.url} is unreachable: {e}") from None
        return ScopeUsage(int(out[0]), int(out[1]), int(out[2]),
                          float(out[3]) if out[3] != "" else None, float(out[4]) if out[4] != "" else None)

    async def close(self) -> None:
        try:
            await self.redis.aclose()
        except _DOWN:
            pass
