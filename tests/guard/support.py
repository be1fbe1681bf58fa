"""Helpers for the guard and robustness tests: a private redis-server and keyed policies."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from concilium.guard.keys import hash_key, new_key
from tests.support import free_port, wait_until


@dataclass
class RedisServer:
    """A redis-server of our own on a free port (never the shared one on 6379)."""

    port: int
    proc: subprocess.Popen | None
    dir: Path
    durable: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, dir: Path, port: int | None = None, durable: bool = False) -> RedisServer:
        """`durable`: every write is fsynced to an append-only file, so a killed server restarted on the
        same directory has everything it acknowledged."""
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        port = port or free_port()
        dir.mkdir(parents=True, exist_ok=True)
        aof = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof,
                                 "--dir", str(dir)],
                                stdout=(dir / "redis.log").open("w"), stderr=subprocess.STDOUT)
        srv = cls(port, proc, dir, durable)
        wait_until(srv.ping, 20, "redis-server", proc, dir / "redis.log")
        return srv

    def ping(self) -> bool:
        import redis

        return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        deadline = time.monotonic() + 10
        while True:  # the port may linger for a moment
            try:
                fresh = RedisServer.start(self.dir, self.port, self.durable)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
        self.proc = fresh.proc


def make_key() -> tuple[str, str]:
    """(key, its hash)"""
    k = new_key()
    return k, hash_key(k)


def upstream_policy(upstream_url: str, extra: str = "", routes: str | None = None) -> str:
    """Two fake-upstream models: `cheap` (priced) and `private` (tagged local)."""
    routes = routes or """
routes:
  - name: default
    targets: [cheap]
    fallbacks: [private]
"""
    return f"""
version: 1
models:
  cheap: {{provider: openai, base_url: "{upstream_url}", model: cheap, price: {{input: 0, output: 1000}}}}
  private: {{provider: openai, base_url: "{upstream_url}", model: private, tags: [local]}}
{routes}
retry: {{attempts: 1, backoff_s: 0.01, backoff_max_s: 0.05}}
{extra}
"""
