"""Real processes for the jobs tests: `concilium worker` processes, a private redis-server, a policy."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis

from tests.support import ROOT, GatewayProcess, _env, free_port, start_gateway, wait_until

SHARED_REDIS = "redis://127.0.0.1:6379/9"  # a DB of its own; every key under a per-run prefix


def jobs_policy(upstream_url: str, jobs: str = "", extra_routes: str = "") -> str:
    """Fake-upstream models `fast` and `slow` (the tests set the slow one's chunk delay), and routes
    picked by `metadata.kind`."""
    return f"""
version: 1
models:
  fast:
    provider: openai
    base_url: {upstream_url}
    model: fast-up
    price: {{input: 1.0, output: 2.0}}
  slow:
    provider: openai
    base_url: {upstream_url}
    model: slow-up
    price: {{input: 1.0, output: 2.0}}
router:
  virtual_models: [concilium/auto]
  learned: false
routes:
  - name: soft
    match: {{metadata: {{kind: soft}}}}
    targets: [slow]
    rank: false
    soft_timeout_s: 1.5
    hard_timeout_s: 20
  - name: hard
    match: {{metadata: {{kind: hard}}}}
    targets: [slow]
    rank: false
    hard_timeout_s: 1.5
  - name: long
    match: {{metadata: {{kind: long}}}}
    targets: [slow]
    rank: false
  - name: parked
    match: {{metadata: {{kind: parked}}}}
    targets: [fast]
    rank: false
    queue: low
  - name: bulk
    match: {{metadata: {{kind: bulk}}}}
    targets: [fast]
    rank: false
    queue: bulk
{extra_routes}
  - name: default
    targets: [fast]
    rank: false
jobs:
  queues: [high, default, low, bulk]
  chat_wait_s: 1.5
  max_active_per_key: 3
{jobs}
"""


@dataclass
class WorkerProcess:
    """`concilium worker` in its own process group (so kill -9 takes the whole worker)."""

    name: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, name: str, policy: Path, env: dict[str, str], queues: str | None = None,
              concurrency: int = 1, pool: str = "prefork") -> WorkerProcess:
        log = policy.parent / f"worker-{name}.log"
        cmd = [sys.executable, "-m", "concilium.cli", "worker", "--policy", str(policy), "-c", str(concurrency),
               "-n", f"{name}@%h", "--pool", pool, "--loglevel", "info"]
        if queues:
            cmd += ["-Q", queues]
        proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(env), cwd=ROOT,
                                start_new_session=True)
        w = cls(name, proc, log)
        wait_until(lambda: "concilium worker" in log.read_text(), 60, f"worker {name}", proc, log)
        return w

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill_group(self) -> None:
        """kill -9 the worker and its pool processes at once (a crashed machine or container)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill_group()
        else:
            self.kill_group()  # pool processes left behind


@dataclass
class RedisServer:
    """A redis-server of our own on a free port, persisting every write (AOF, fsync always), so that
    a kill -9 and a restart lose nothing. The shared Redis on 6379 is never touched."""

    port: int
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, dir: Path) -> RedisServer:
        srv = cls(free_port(), dir)
        srv.launch()
        return srv

    def launch(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "redis.log"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir)], stdout=log.open("a"), stderr=subprocess.STDOUT)
        wait_until(lambda: redis.Redis(port=self.port, socket_timeout=0.5).ping(), 20, "redis-server",
                   self.proc, log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Stack:
    """A gateway and workers sharing one Redis, with a key prefix of their own."""

    redis_url: str
    prefix: str
    policy: Path
    env: dict[str, str]
    gateway: GatewayProcess
    workers: list[WorkerProcess] = field(default_factory=list)
    worker_queues: str | None = None

    @classmethod
    def start(cls, dir: Path, policy_text: str, redis_url: str = SHARED_REDIS, workers: int = 2,
              worker_queues: str | None = None, env: dict[str, str] | None = None) -> Stack:
        prefix = f"test-{uuid.uuid4().hex[:8]}:"
        full_env = {"CONCILIUM_REDIS_URL": redis_url, "CONCILIUM_JOBS_KEY_PREFIX": prefix,
                    "CONCILIUM_JOBS_VISIBILITY_TIMEOUT_S": "3", "CONCILIUM_JOBS_LEASE_S": "1.5", **(env or {})}
        policy = dir / "policy.yaml"
        gw = start_gateway(policy_text, policy, env=full_env)
        stack = cls(redis_url, prefix, policy, full_env, gw, worker_queues=worker_queues)
        for i in range(workers):
            stack.workers.append(WorkerProcess.start(f"w{i + 1}", policy, full_env, worker_queues))
        return stack

    def ensure_workers(self) -> None:
        """Replace workers an earlier test killed."""
        for i, w in enumerate(self.workers):
            if not w.alive:
                w.stop()
                self.workers[i] = WorkerProcess.start(f"{w.name}r{int(time.time()) % 1000}", self.policy, self.env,
                                                      self.worker_queues)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def record(self, job_id: str) -> dict[str, Any]:
        h = self.redis().hgetall(f"{self.prefix}job:{job_id}")
        return {k.decode(): (v.decode() if k != b"spec" else orjson.loads(v)) for k, v in h.items()}

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"d"]) for _, f in self.redis().xrange(f"{self.prefix}job:{job_id}:ev")]

    def bills(self, job_id: str) -> list[dict[str, Any]]:
        return [orjson.loads(f[b"bill"]) for _, f in self.redis().xrange(f"{self.prefix}bills")
                if f[b"job"].decode() == job_id]

    def worker_running(self, job_id: str) -> WorkerProcess | None:
        name = self.record(job_id).get("worker", "").split("@")[0]
        return next((w for w in self.workers if w.name == name), None)

    def stop(self) -> None:
        for w in self.workers:  # all at once: each finishes its warm shutdown in parallel
            if w.alive:
                w.proc.terminate()
        for w in self.workers:
            w.stop()
        self.gateway.stop()
        r = self.redis()
        keys = list(r.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            r.delete(*keys)


def wait_for(check, timeout: float, what: str) -> Any:
    """Poll `check()` until truthy and return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{what}: not after {timeout}s")
