"""Reusable pieces for the benchmarks: processes on loopback, CPU accounting, LiteLLM's proxy, load.

- `Service`: a process started on a free loopback port, optionally pinned to CPU cores, whose whole
  process tree can be charged for CPU time (`cpu_seconds()`, read from /proc) and stopped.
- `start_fake_upstream`, `start_concilium`, `start_litellm_proxy`: the three servers the gateway
  benchmarks need; `ensure_litellm_venv` installs LiteLLM's proxy into its own virtualenv once.
- `run_load`: an aiohttp load generator (fixed request count, fixed concurrency) that records the
  latency of every request (to its last byte) and checks each answer.
- `split_cores`, `pin_self`, `machine_info`, `versions`, `git_commit`, `write_json`: fair pinning
  and the metadata every result file carries.

Benchmarks import this module as `from _common import ...` when run as `python benchmarks/NAME.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
LOG_DIR = Path(tempfile.gettempdir()) / "concilium-bench"  # policies, configs and server logs
LITELLM_VENV = BENCH_DIR / ".litellm-venv"
LITELLM_VERSION = "1.106.2"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- ports, env, metadata


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment for child processes: offline, quiet, unbuffered. A None value unsets a key."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"})
    for k, v in (extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def git_commit(root: Path = ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions(packages: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem_gib = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "usable_cores": sorted(os.sched_getaffinity(0)), "memory_gib": mem_gib,
            "load_avg_at_start": list(os.getloadavg())}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------- CPU pinning and accounting


def split_cores() -> tuple[set[int] | None, set[int] | None]:
    """(cores for the server under test, cores for the load generator and upstream).

    One core for the server, the rest for the driver; (None, None) when only one core is usable.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return {cores[0]}, set(cores[1:])


def pin_self(cores: set[int] | None) -> None:
    if cores:
        os.sched_setaffinity(0, cores)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def tree_pids(root: int) -> list[int]:
    """`root` and all its live descendants."""
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _proc_cpu_ticks(pid: int) -> int:
    """utime + stime of the process (all its threads) + cutime + cstime of its reaped children."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0
    fields = stat[stat.rfind(b")") + 2:].split()
    # Fields after "(comm) ": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
    return sum(int(x) for x in fields[11:15])


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by a process tree, dead children that were reaped included."""
    return sum(_proc_cpu_ticks(p) for p in tree_pids(root)) / CLK_TCK


# ---------------------------------------------------------------- processes


def _http_ok(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Service:
    """A server process on loopback: its port, log, and whole process tree."""

    name: str
    port: int
    proc: subprocess.Popen
    log: Path
    cores: set[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if check():
                return
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.name} was not ready after {timeout:g}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the service's own process group, then SIGKILL if it does not exit."""
        if self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start_service(name: str, argv: list[str], *, port: int, cores: set[int] | None = None,
                  env: dict[str, str] | None = None, ready: Callable[[Service], bool] | None = None,
                  ready_path: str = "/", timeout: float = 120.0, cwd: Path = ROOT) -> Service:
    """Start `argv` in its own session (so stop() can reach its whole tree), pinned to `cores`."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{name}-{port}.log"

    def pin() -> None:
        if cores:
            os.sched_setaffinity(0, cores)

    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env or offline_env(), cwd=cwd, start_new_session=True, preexec_fn=pin)
    svc = Service(name, port, proc, log, cores)
    check = (lambda: ready(svc)) if ready else (lambda: _http_ok(svc.base_url + ready_path))
    svc.wait_ready(check, timeout)
    return svc


def start_fake_upstream(cores: set[int] | None = None, chunks: int = 13) -> Service:
    """The project's fake OpenAI-compatible upstream (instant answers, `chunks` content events)."""
    port = free_port()
    argv = [sys.executable, "-m", "concilium.testing.fake_upstream", "--port", str(port), "--chunks", str(chunks)]
    svc = start_service("fake-upstream", argv, port=port, cores=cores, ready_path="/_control/stats", timeout=30)
    svc.meta["v1"] = svc.base_url + "/v1"
    return svc


def start_concilium(policy_text: str, cores: set[int] | None = None, env: dict[str, str] | None = None,
                    timeout: float = 120.0, src: Path | None = None) -> Service:
    """`concilium serve` on a policy written to the log folder, ready when /readyz says so. `src`: run
    the package from another source tree (an older commit's checkout), in this same environment."""
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    policy = LOG_DIR / f"concilium-policy-{port}.yaml"
    policy.write_text(policy_text)
    argv = [sys.executable, "-m", "concilium.cli", "serve", "--policy", str(policy), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]
    full_env = offline_env({"CONCILIUM_DATA_DIR": str(LOG_DIR / f"concilium-var-{port}"), **(env or {})})
    if src is not None:
        full_env["PYTHONPATH"] = str(src)
    svc = start_service("concilium", argv, port=port, cores=cores, env=full_env, ready_path="/readyz",
                        timeout=timeout)
    svc.meta["policy"] = str(policy)
    return svc


# ---------------------------------------------------------------- LiteLLM's proxy


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def litellm_installed(venv: Path = LITELLM_VENV, version: str = LITELLM_VERSION) -> bool:
    py = _venv_python(venv)
    if not py.exists() or not (venv / "bin" / "litellm").exists():
        return False
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and out.stdout.strip() == version


def ensure_litellm_venv(venv: Path = LITELLM_VENV, version: str = LITELLM_VERSION,
                        log: Callable[[str], None] = print) -> Path:
    """LiteLLM's proxy in its own virtualenv (its pins clash with ours); returns the `litellm` script."""
    if litellm_installed(venv, version):
        return venv / "bin" / "litellm"
    if version in ("1.82.7", "1.82.8"):
        raise ValueError(f"litellm {version} is a compromised release; refusing to install it")
    log(f"installing litellm[proxy]=={version} into {venv} (once; a few minutes) ...")
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    subprocess.run([str(_venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    f"litellm[proxy]=={version}"], check=True, timeout=1800)
    if not litellm_installed(venv, version):
        raise RuntimeError(f"litellm {version} did not install into {venv}")
    return venv / "bin" / "litellm"


def litellm_config(model_name: str, upstream_v1: str, upstream_model: str, master_key: str) -> str:
    """A proxy config: one OpenAI-compatible deployment, no database, logging and callbacks off."""
    cfg = {
        "model_list": [{"model_name": model_name,
                        "litellm_params": {"model": f"openai/{upstream_model}", "api_base": upstream_v1,
                                           "api_key": "sk-fake-upstream"}}],
        "litellm_settings": {"set_verbose": False, "json_logs": False, "telemetry": False,
                             "turn_off_message_logging": True, "callbacks": [], "success_callback": [],
                             "failure_callback": [], "num_retries": 0, "request_timeout": 60},
        "router_settings": {"num_retries": 0},
        "general_settings": {"master_key": master_key, "disable_spend_logs": True,
                             "disable_error_logs": True, "store_model_in_db": False,
                             "proxy_batch_write_at": 60},
    }
    return json.dumps(cfg, indent=2)  # JSON is valid YAML


def start_litellm_proxy(model_name: str, upstream_v1: str, upstream_model: str, *, cores: set[int] | None = None,
                        master_key: str = "sk-bench-master", timeout: float = 300.0,
                        venv: Path = LITELLM_VENV) -> Service:
    """`litellm --config ...` (one worker), offline: local cost map, no DB, no schema update."""
    script = ensure_litellm_venv(venv)
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    cfg = LOG_DIR / f"litellm-config-{port}.yaml"
    cfg.write_text(litellm_config(model_name, upstream_v1, upstream_model, master_key))
    env = offline_env({"DISABLE_SCHEMA_UPDATE": "true", "DATABASE_URL": None, "LITELLM_LOG": "ERROR",
                       "LITELLM_TELEMETRY": "False", "LITELLM_MODE": "PRODUCTION", "DISABLE_ADMIN_UI": "True",
                       "NO_DOCS": "True", "NO_REDOC": "True", "USE_PRISMA_MIGRATE": "False"})
    argv = [str(script), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    auth = {"authorization": f"Bearer {master_key}"}
    svc = start_service("litellm-proxy", argv, port=port, cores=cores, env=env, timeout=timeout,
                        ready=lambda s: _http_ok(s.base_url + "/health/liveliness", auth))
    svc.meta.update(master_key=master_key, config=str(cfg))
    return svc


# ---------------------------------------------------------------- load generator


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    stream: bool
    wall_s: float
    latencies_s: list[float]  # successful requests, sorted
    errors: int
    error_samples: list[str]
    events: int  # SSE data events received (streamed runs), [DONE] included

    @property
    def rps(self) -> float:
        return len(self.latencies_s) / self.wall_s if self.wall_s > 0 else 0.0

    def pct(self, q: float) -> float:
        """Latency percentile in seconds (nearest rank)."""
        xs = self.latencies_s
        if not xs:
            return float("nan")
        k = min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))
        return xs[k]

    @property
    def events_per_request(self) -> float:
        return self.events / len(self.latencies_s) if self.latencies_s else 0.0


async def _one(session: Any, url: str, data: bytes, headers: dict[str, str], stream: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with session.post(url, data=data, headers=headers) as resp:
        if stream:
            raw = b""
            async for piece in resp.content.iter_any():
                raw += piece
        else:
            raw = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {raw[:200]!r}")
    dt = time.perf_counter() - t0
    if stream:
        if not raw.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"stream did not end with [DONE]: {raw[-200:]!r}")
        return dt, raw.count(b"data:")
    if b'"choices"' not in raw:
        raise RuntimeError(f"no choices in the answer: {raw[:200]!r}")
    return dt, 0


async def run_load(url: str, body: dict[str, Any], *, requests: int, concurrency: int,
                   headers: dict[str, str] | None = None, warmup: int = 0, timeout: float = 60.0) -> LoadResult:
    """Send `requests` POSTs with `concurrency` in flight (after `warmup` unrecorded ones)."""
    import aiohttp

    stream = bool(body.get("stream"))
    data = json.dumps(body).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    lat: list[float] = []
    samples: list[str] = []
    errors = events = 0

    async def drive(session: Any, n: int, record: bool) -> None:
        left = n

        async def worker() -> None:
            nonlocal left, errors, events
            while left > 0:
                left -= 1
                try:
                    dt, k = await _one(session, url, data, hdrs, stream)
                except Exception as e:  # counted and sampled: errors are part of the result
                    if record:
                        errors += 1
                        if len(samples) < 5:
                            samples.append(f"{type(e).__name__}: {e}"[:300])
                    continue
                if record:
                    lat.append(dt)
                    events += k

        await asyncio.gather(*(worker() for _ in range(min(concurrency, max(1, n)))))

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        if warmup:
            await drive(s, warmup, record=False)
        t0 = time.perf_counter()
        await drive(s, requests, record=True)
        wall = time.perf_counter() - t0
    lat.sort()
    return LoadResult(requests, concurrency, stream, wall, lat, errors, samples, events)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available (a lighter load generator leaves more of its core to the upstream)."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()
