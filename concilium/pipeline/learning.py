"""The online router at run time (`router.learning.enabled`): its shared state, the decision log,
learning from feedback, and promotion / rollback. The learning itself is `router/online.py`.

Where things live:

| what | with CONCILIUM_REDIS_URL | without |
|---|---|---|
| sufficient statistics (per model) | hash `concilium:learn:stats:<model>`, HINCRBYFLOAT | in process, saved to `<data>/learning/stats.json` |
| which router is live, and its history | `concilium:learn:state`, list `concilium:learn:history` | `<data>/learning/state.json`, `history.jsonl` |
| decision log | stream `concilium:decisions` (MAXLEN ~ log_retention) | `<data>/decisions.jsonl` (rotated at log_retention lines) |

Replicas add to the same sums and read them back every `REFRESH_S`, so N gateways learn as one; a
promotion or rollback (by command or automatic) reaches every replica within `REFRESH_S`, with no
restart and no request dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from concilium.core.batches import Batches
from concilium.core.plan import Decision
from concilium.core.redis import connect
from concilium.policy.learning import Learning
from concilium.router.online import DIM, Learner, Logged, ModelStats, dr, interval

log = logging.getLogger("concilium.learning")
PREFIX = "concilium:learn:"
STREAM = "concilium:decisions"
REFRESH_S = 1.0
WINDOW = 5000  # rewarded decisions kept for the promotion / rollback checks
CHECK_EVERY = 25  # rewarded decisions between two checks
ROLLBACK_WINDOW = 500


def _decode(h: dict[Any, Any]) -> ModelStats:
    get = {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in h.items()}
    a = np.array([get.get(f"a{i}", 0.0) for i in range(DIM * DIM)]).reshape(DIM, DIM)
    b = np.array([get.get(f"b{i}", 0.0) for i in range(DIM)])
    return ModelStats(a, b, get.get("n", 0.0))


class _Store:
    """Statistics, state and log without Redis: in process, saved under the data directory."""

    def __init__(self, data_dir: str, retention: int) -> None:
        self.dir = Path(data_dir) / "learning"
        self.log_path = Path(data_dir) / "decisions.jsonl"
        self.retention = retention
        self.sums: dict[str, dict[str, float]] = {}  # model -> encoded sums (without the ridge prior)
        self._log_lines: int | None = None
        path = self.dir / "stats.json"
        if path.exists():
            try:
                self.sums = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                log.warning("learning statistics in %s unreadable (%s): starting afresh", path, e)

    async def add(self, model: str, x: list[float], y: float) -> None:
        s = self.sums.setdefault(model, {})
        v = np.asarray(x)
        for i, val in enumerate(np.outer(v, v).ravel()):
            s[f"a{i}"] = s.get(f"a{i}", 0.0) + float(val)
        for i, val in enumerate(v * y):
            s[f"b{i}"] = s.get(f"b{i}", 0.0) + float(val)
        s["n"] = s.get("n", 0.0) + 1
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "stats.json.tmp"
        tmp.write_text(json.dumps(self.sums))
        os.replace(tmp, self.dir / "stats.json")

    async def read(self) -> dict[str, ModelStats]:
        return {m: _decode(h) for m, h in self.sums.items()}

    async def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return {"live": "static"}

    async def set_state(self, live: str, reason: str) -> dict[str, Any]:
        st = {"live": live, "changed": time.time(), "reason": reason}
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "state.json").write_text(json.dumps(st))
        with open(self.dir / "history.jsonl", "a") as f:
            f.write(json.dumps(st) + "\n")
        return st

    async def history(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in (self.dir / "history.jsonl").read_text().splitlines() if line]
        except OSError:
            return []

    async def append_log(self, records: list[bytes]) -> None:
        if self._log_lines is None:
            self._log_lines = sum(1 for _ in open(self.log_path, "rb")) if self.log_path.exists() else 0
        if self._log_lines + len(records) > self.retention:  # rotate: keep one older file
            if self.log_path.exists():
                os.replace(self.log_path, self.log_path.with_suffix(".jsonl.1"))
            self._log_lines = 0
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as f:
            f.write(b"".join(r + b"\n" for r in records))
        self._log_lines += len(records)

    async def read_log(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for p in (self.log_path.with_suffix(".jsonl.1"), self.log_path):
            if p.exists():
                out += [orjson.loads(line) for line in p.read_bytes().splitlines() if line]
        return out

    async def close(self) -> None:
        return None


class _RedisStore(_Store):
    def __init__(self, url: str, retention: int) -> None:
        self.redis = connect(url)
        self.retention = retention

    async def add(self, model: str, x: list[float], y: float) -> None:
        v = np.asarray(x)
        pipe = self.redis.pipeline(transaction=True)  # one event's sums, atomically
        key = PREFIX + "stats:" + model
        for i, val in enumerate(np.outer(v, v).ravel()):
            if val:
                pipe.hincrbyfloat(key, f"a{i}", float(val))
        for i, val in enumerate(v * y):
            if val:
                pipe.hincrbyfloat(key, f"b{i}", float(val))
        pipe.hincrbyfloat(key, "n", 1)
        await pipe.execute()

    async def read(self) -> dict[str, ModelStats]:
        keys = [k async for k in self.redis.scan_iter(match=PREFIX + "stats:*", count=1000)]
        pipe = self.redis.pipeline(transaction=False)
        for k in keys:
            pipe.hgetall(k)
        rows = await pipe.execute() if keys else []
        return {k.decode().removeprefix(PREFIX + "stats:"): _decode(h) for k, h in zip(keys, rows, strict=True)}

    async def state(self) -> dict[str, Any]:
        raw = await self.redis.get(PREFIX + "state")
        return json.loads(raw) if raw else {"live": "static"}

    async def set_state(self, live: str, reason: str) -> dict[str, Any]:
        st = {"live": live, "changed": time.time(), "reason": reason}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(PREFIX + "state", json.dumps(st))
        pipe.rpush(PREFIX + "history", json.dumps(st))
        await pipe.execute()
        return st

    async def history(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in await self.redis.lrange(PREFIX + "history", 0, -1)]

    async def append_log(self, records: list[bytes]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for r in records:
            pipe.xadd(STREAM, {"d": r}, maxlen=self.retention, approximate=True)
        await pipe.execute()

    async def read_log(self) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"d"]) for _, f in await self.redis.xrange(STREAM)]

    async def close(self) -> None:
        await self.redis.aclose()


def open_store(redis_url: str | None, data_dir: str, retention: int = 100_000) -> _Store:
    return _RedisStore(redis_url, retention) if redis_url else _Store(data_dir, retention)


def _log_failed(e: Exception, lost: int) -> None:
    log.warning("decision log write failed (%s): %d decisions dropped", type(e).__name__, lost)


class OnlineRouter:
    """One per gateway process: what `decide` reads (`learner`, `live`, `explore`), and what the
    request path and `/v1/feedback` feed (`record`, `feedback`)."""

    def __init__(self, state: Any, store: _Store, metrics: Any = None) -> None:
        self.state = state  # the PolicyState: `router.learning` is read from the policy in force
        self.store = store
        self.metrics = metrics
        cfg = self.cfg
        self.learner = Learner(cfg.ridge, cfg.bonus, cfg.ridge_unknown)
        self.live = "static"
        self.window: deque[Logged] = deque(maxlen=WINDOW)
        self._since_check = 0
        self._log: Batches[bytes] = Batches(self.store.append_log, _log_failed)
        self._task: asyncio.Task | None = None
        self.events = 0.0

    @property
    def cfg(self) -> Learning:
        return self.state.current.policy.router.learning

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @property
    def explore(self) -> float:
        return self.cfg.explore

    @property
    def version(self) -> str:
        return f"learner ({int(self.events)} events)" if self.live == "learner" else "static"

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.ensure_future(self._watch())

    async def refresh(self) -> None:
        if not self.enabled:
            return
        try:
            cfg = self.cfg
            self.learner.ridge, self.learner.bonus, self.learner.ridge_unknown = cfg.ridge, cfg.bonus, cfg.ridge_unknown
            stats = await self.store.read()
            self.learner.load(stats)
            self.events = sum(s.n for s in stats.values())
            self.live = (await self.store.state()).get("live", "static")
            if self.metrics is not None:
                self.metrics.learning_live.set(1.0 if self.live == "learner" else 0.0)
        except Exception as e:  # keep routing with what was last read
            log.warning("online router state unavailable (%s); routing with the last one read", type(e).__name__)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    # -- the decision log ----------------------------------------------------------------------
    def record(self, rid: str, route: str, decision: Decision, status: int, answered: str | None,
               cost: float | None, seconds: float) -> None:
        """Log one routed request (off the request path, in batches)."""
        rec: dict[str, Any] = {"request_id": rid, "ts": round(time.time(), 3), "route": route,
                               **decision.model_dump(exclude={"x"} if not self.cfg.log_features else set()),
                               "status": status, "answered_by": answered, "cost_usd": cost,
                               "latency_s": round(seconds, 4)}
        if answered and answered != decision.chosen:
            rec["fallback"] = True  # an implicit signal: the chosen model did not answer
        self._log.add(orjson.dumps(rec))

    async def flushed(self) -> None:
        await self._log.flushed()

    # -- learning -----------------------------------------------------------------------------
    async def feedback(self, decision: Decision, score: float) -> None:
        """A score for a decision: update the shared sums, then check promotion / rollback."""
        q = decision.q.get(decision.chosen, 0.5)
        await self.store.add(decision.chosen, decision.x, score - q)
        self.learner.add(decision.chosen, decision.x, score, q)
        self.events += 1
        if self.metrics is not None:
            self.metrics.learning_updates.labels(decision.chosen).inc()
        self.window.append(Logged(decision.chosen, decision.propensity, score, decision.q, decision.choices))
        self._since_check += 1
        if self._since_check >= max(1, min(CHECK_EVERY, self.cfg.min_events // 2)):
            self._since_check = 0
            await self.check()

    def estimates(self) -> dict[str, Any]:
        """What the log says so far: the live router's mean reward and each router's DR estimate."""
        events = list(self.window)
        rewards = np.array([e.reward for e in events])
        out: dict[str, Any] = {"events": len(events), "live": self.live,
                               "live_reward": float(rewards.mean()) if len(rewards) else None}
        for name in ("static", "learner"):
            mean, lo, hi = interval(dr(events, name)) if events else (None, None, None)
            out[name] = {"dr": mean, "low": lo, "high": hi}
        return out

    async def check(self) -> None:
        """Promote the learner when its DR lower bound beats the live router's reward (promote: auto,
        with min_events); roll back when the live learner falls below the static router by the margin."""
        events = list(self.window)
        if self.live == "static" and self.cfg.promote == "auto" and len(events) >= self.cfg.min_events:
            _, lo, _ = interval(dr(events, "learner"))
            live = float(np.mean([e.reward for e in events]))
            if lo > live:
                await self.set_live("learner", f"auto: learner DR lower bound {lo:.3f} > static reward {live:.3f} "
                                    f"over {len(events)} decisions")
        elif self.live == "learner":
            recent = [e for e in events if e.choices.get("learner") == e.chosen][-ROLLBACK_WINDOW:]
            if len(recent) >= min(ROLLBACK_WINDOW, self.cfg.min_events):
                static, _, _ = interval(dr(events, "static"))
                mine = float(np.mean([e.reward for e in recent]))
                if mine < static - self.cfg.rollback_margin:
                    await self.set_live("static", f"auto rollback: learner reward {mine:.3f} < static {static:.3f} "
                                        f"- margin {self.cfg.rollback_margin:g}")

    async def set_live(self, live: str, reason: str) -> None:
        await self.store.set_state(live, reason)
        log.warning("online router: %s is live (%s)", live, reason)
        self.live = live
        self.window.clear()
        if self.metrics is not None:
            self.metrics.learning_live.set(1.0 if live == "learner" else 0.0)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            await asyncio.wait_for(self.flushed(), 2.0)
        except Exception:
            pass
        await self.store.close()


def joined(decisions: list[dict[str, Any]], scores: dict[str, float]) -> list[Logged]:
    """Logged decisions that have a feedback score (the last one given for the request id)."""
    out = []
    for d in decisions:
        score = scores.get(d.get("request_id", ""))
        if score is None or not d.get("propensity"):
            continue
        out.append(Logged(d["chosen"], float(d["propensity"]), float(score), d.get("q") or {}, d.get("choices") or {}))
    return out


def evaluate(events: list[Logged], routers: tuple[str, ...] = ("static", "learner")) -> dict[str, Any]:
    """Off-policy estimates of each router's mean reward from logged, rewarded decisions: inverse
    propensity (unbiased, noisy) and doubly robust (the trained router's predictions as the reward
    model), each with a 95% bootstrap interval; and what the routers that were live earned."""
    from concilium.router.online import ips

    out: dict[str, Any] = {"events": len(events),
                           "logged_reward": float(np.mean([e.reward for e in events])) if events else None}
    for r in routers:
        m1, lo1, hi1 = interval(ips(events, r))
        m2, lo2, hi2 = interval(dr(events, r))
        agree = float(np.mean([e.choices.get(r) == e.chosen for e in events])) if events else None
        out[r] = {"ips": [m1, lo1, hi1], "dr": [m2, lo2, hi2], "agrees_with_logged": agree}
    return out
