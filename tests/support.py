"""Helpers to run real processes on loopback for the tests (and benchmarks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode("utf-8", "replace")


def wait_until(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until it returns truthy (a readiness condition, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout}s\n{tail}")


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"})
    for k, v in (extra or {}).items():
        if v == "":
            env.pop(k, None)
        else:
            env[k] = v
    return env


@dataclass
class FakeUpstream:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    def start(cls, chunks: int = 13) -> FakeUpstream:
        port = free_port()
        log = Path(f"/tmp/fake-upstream-{port}.log")
        proc = subprocess.Popen(
            [sys.executable, "-m", "concilium.testing.fake_upstream", "--port", str(port), "--chunks", str(chunks)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(None), cwd=ROOT,
        )
        up = cls(port, proc, log)
        wait_until(lambda: http_json("GET", up.control_url("stats"))[0] == 200, 30, "fake upstream", proc, log)
        return up

    def control_url(self, what: str) -> str:
        return f"http://127.0.0.1:{self.port}/_control/{what}"

    def script(self, model: str, faults: list[dict]) -> None:
        http_json("POST", self.control_url("script"), {"model": model, "faults": faults})

    def default(self, model: str, fault: dict) -> None:
        http_json("POST", self.control_url("default"), {"model": model, "fault": fault})

    def chaos(self, **odds: float) -> None:
        http_json("POST", self.control_url("chaos"), odds)

    def reset(self) -> None:
        http_json("POST", self.control_url("reset"), {})

    def stats(self) -> dict:
        return http_json("GET", self.control_url("stats"))[1]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class GatewayProcess:
    port: int
    proc: subprocess.Popen
    policy_path: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def client(self, **kw: Any):
        from openai import OpenAI

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60)
        return OpenAI(base_url=self.v1, api_key=kw.pop("api_key", "test-key"), **kw)

    def async_client(self, **kw: Any):
        from openai import AsyncOpenAI

        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 60)
        return AsyncOpenAI(base_url=self.v1, api_key=kw.pop("api_key", "test-key"), **kw)

    def get(self, path: str) -> tuple[int, Any]:
        return http_json("GET", self.base_url + path)

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        return http_json("POST", self.base_url + path, body)

    def sighup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_gateway(policy_text: str, policy_path: Path, env: dict[str, str] | None = None,
                  timeout: float = 60.0, extra_args: list[str] | None = None) -> GatewayProcess:
    policy_path.write_text(policy_text)
    port = free_port()
    log = policy_path.with_suffix(".log")
    full_env = _env({"CONCILIUM_POLICY_WATCH_S": "0.2", "CONCILIUM_DATA_DIR": str(policy_path.parent / "var"),
                     **(env or {})})
    proc = subprocess.Popen(
        [sys.executable, "-m", "concilium.cli", "serve", "--policy", str(policy_path), "--port", str(port),
         "--log-level", "warning", *(extra_args or [])],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
    )
    gw = GatewayProcess(port, proc, policy_path, log, full_env)
    wait_until(lambda: gw.get("/readyz")[0] == 200, timeout, "gateway", proc, log)
    return gw
