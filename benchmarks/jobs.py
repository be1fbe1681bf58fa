"""Background jobs: how fast a job starts, how many jobs per second two workers finish, how fast a
cancel takes effect -- on Redis (gateway + 2 `concilium worker` processes) and embedded (no services:
2 worker threads in the gateway), side by side with the same request served interactively.

All against the fake OpenAI-compatible upstream (13 content chunks; instant, or 0.2 s between chunks
for the cancel runs), on loopback, sharing the machine's cores (not pinned: a job crosses several
processes).

  first event      POST /v1/responses {background, stream} -> `response.in_progress` (a worker took it)
  first delta      ... -> the first `response.output_text.delta`
  interactive TTFT POST /v1/chat/completions {stream} -> first content chunk (the baseline)
  jobs/s           N jobs submitted with 16 in flight, each followed to its end over SSE; N / wall time
  interactive r/s  the same number of streamed chat requests, 16 in flight (the baseline)
  cancel           POST /v1/responses/{id}/cancel after the first delta -> its answer (the job has ended)

Run:  .venv/bin/python benchmarks/jobs.py            (a few minutes on 2 cores)
      .venv/bin/python benchmarks/jobs.py --quick    (fewer jobs, a smoke run)
Writes benchmarks/results/jobs.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import (
    LOG_DIR,
    RESULTS_DIR,
    ROOT,
    Service,
    free_port,
    git_commit,
    machine_info,
    new_event_loop,
    offline_env,
    start_concilium,
    start_fake_upstream,
    start_service,
    versions,
    write_json,
)

PROMPT = "summarise the quarterly numbers for the board in plain words please"
HEADERS = {"authorization": "Bearer bench-key", "content-type": "application/json"}


def policy(upstream_v1: str) -> str:
    return f"""\
# Written by benchmarks/jobs.py: the fake upstream; `slow` is slowed down by the benchmark.
version: 1
models:
  fast: {{provider: openai, base_url: "{upstream_v1}", model: fast-up}}
  slow: {{provider: openai, base_url: "{upstream_v1}", model: slow-up}}
router: {{virtual_models: [concilium/auto], learned: false}}
routes:
  - name: slow
    match: {{metadata: {{lane: slow}}}}
    targets: [slow]
    rank: false
  - name: default
    targets: [fast]
    rank: false
jobs:
  max_active_per_key: 10000
"""


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


async def sse(resp: Any):
    """(event type, data) pairs from an SSE response."""
    buf = b""
    async for piece in resp.content.iter_any():
        buf += piece
        while (i := buf.find(b"\n\n")) >= 0:
            block, buf = buf[:i], buf[i + 2:]
            etype, data = None, b""
            for line in block.split(b"\n"):
                if line.startswith(b"event: "):
                    etype = line[7:].decode()
                elif line.startswith(b"data: "):
                    data = line[6:]
            if data:
                yield etype, data


async def first_events(session: Any, base: str, n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"first_event": [], "first_delta": [], "done": []}
    body = json.dumps({"model": "concilium/auto", "input": PROMPT, "background": True, "stream": True})
    for _ in range(n):
        t0, delta_seen = time.perf_counter(), False
        async with session.post(base + "/v1/responses", data=body, headers=HEADERS) as resp:
            assert resp.status == 200, await resp.text()
            async for etype, _ in sse(resp):
                dt = time.perf_counter() - t0
                if etype == "response.in_progress":
                    out["first_event"].append(dt)
                elif etype == "response.output_text.delta" and not delta_seen:
                    delta_seen = True
                    out["first_delta"].append(dt)
                elif etype == "response.completed":
                    out["done"].append(dt)
                    break
    return out


async def interactive_ttft(session: Any, base: str, n: int) -> list[float]:
    body = json.dumps({"model": "concilium/auto", "messages": [{"role": "user", "content": PROMPT}], "stream": True})
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        async with session.post(base + "/v1/chat/completions", data=body, headers=HEADERS) as resp:
            assert resp.status == 200, await resp.text()
            first = None
            async for _, data in sse(resp):
                if first is None and b'"content":"' in data and b'"content":""' not in data:
                    first = time.perf_counter() - t0
            out.append(first)
    return out


async def per_second(n: int, in_flight: int, one: Callable[[], Awaitable[None]]) -> float:
    """Run `one()` n times with `in_flight` at a time; completions per second."""
    left = n

    async def lane() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(in_flight)))
    return n / (time.perf_counter() - t0)


async def job_throughput(session: Any, base: str, n: int, in_flight: int = 16) -> float:
    body = json.dumps({"model": "concilium/auto", "input": PROMPT, "background": True})

    async def one() -> None:
        async with session.post(base + "/v1/responses", data=body, headers=HEADERS) as resp:
            assert resp.status == 200, await resp.text()
            job_id = (await resp.json())["id"]
        async with session.get(f"{base}/v1/responses/{job_id}?stream=true&starting_after=1",
                               headers=HEADERS) as resp:
            async for etype, _ in sse(resp):
                if etype == "response.completed":
                    return
        raise RuntimeError(f"job {job_id} did not complete")

    return await per_second(n, in_flight, one)


async def interactive_throughput(session: Any, base: str, n: int, in_flight: int = 16) -> float:
    body = json.dumps({"model": "concilium/auto", "messages": [{"role": "user", "content": PROMPT}], "stream": True})

    async def one() -> None:
        async with session.post(base + "/v1/chat/completions", data=body, headers=HEADERS) as resp:
            raw = await resp.read()
            assert raw.rstrip().endswith(b"[DONE]"), raw[-200:]

    return await per_second(n, in_flight, one)


async def cancels(session: Any, base: str, n: int) -> dict[str, list[float]]:
    body = json.dumps({"model": "concilium/auto", "input": PROMPT, "background": True, "stream": True,
                       "metadata": {"lane": "slow"}})
    out: dict[str, list[float]] = {"cancel_call": [], "stream_end": []}
    for _ in range(n):
        async with session.post(base + "/v1/responses", data=body, headers=HEADERS) as resp:
            job_id, t0 = None, None
            async for etype, data in sse(resp):
                if etype == "response.created":
                    job_id = json.loads(data)["response"]["id"]
                elif etype == "response.output_text.delta" and t0 is None:
                    await asyncio.sleep(random.uniform(0, 0.2))  # cancel at any point between chunks
                    t0 = time.perf_counter()
                    async with session.post(f"{base}/v1/responses/{job_id}/cancel", headers=HEADERS) as c:
                        answer = await c.json()
                    out["cancel_call"].append(time.perf_counter() - t0)
                    assert answer["status"] == "cancelled", answer
                elif etype == "response.cancelled":
                    out["stream_end"].append(time.perf_counter() - t0)
                    break
    return out


def start_redis() -> Service:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    import redis

    return start_service("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], port=port,
                         ready=lambda s: bool(redis.Redis(port=port, socket_timeout=0.5).ping()), timeout=30)


def start_worker(name: str, policy_path: str, env: dict[str, str]) -> Service:
    argv = [sys.executable, "-m", "concilium.cli", "worker", "--policy", policy_path, "-c", "1",
            "-n", f"{name}@%h", "--loglevel", "warning"]
    svc = start_service(name, argv, port=0, env=env, ready=lambda s: "concilium worker" in s.log_tail(100000), timeout=120)
    return svc


def control(upstream: Service, what: str, payload: dict[str, Any]) -> None:
    import urllib.request

    req = urllib.request.Request(f"{upstream.base_url}/_control/{what}", data=json.dumps(payload).encode(),
                                 method="POST", headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()


def cpu_by_role(services: list[Service]) -> dict[str, float]:
    out: dict[str, float] = {}
    for svc in services:
        role = "worker" if svc.name.startswith("bench") else svc.name
        out[role] = out.get(role, 0.0) + svc.cpu_seconds()
    return out


async def measure(base: str, upstream: Service, sizes: dict[str, int], services: list[Service]) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as s:
        await first_events(s, base, 5)  # warm-up: connections, providers, worker processes
        await interactive_ttft(s, base, 5)
        fe = await first_events(s, base, sizes["latency"])
        ttft = await interactive_ttft(s, base, sizes["latency"])
        cpu0 = cpu_by_role(services)
        jps = await job_throughput(s, base, sizes["throughput"])
        cpu1 = cpu_by_role(services)
        cpu_ms_per_job = {k: (cpu1[k] - cpu0[k]) / sizes["throughput"] * 1e3 for k in cpu1}
        rps = await interactive_throughput(s, base, sizes["throughput"])
        control(upstream, "default", {"model": "slow-up", "fault": {"chunk_delay_s": 0.2}})
        try:
            cancel = await cancels(s, base, sizes["cancel"])
        finally:
            control(upstream, "reset", {})
    return {
        "first_event_ms": {"p50": pct(fe["first_event"], 50) * 1e3, "p99": pct(fe["first_event"], 99) * 1e3},
        "first_delta_ms": {"p50": pct(fe["first_delta"], 50) * 1e3, "p99": pct(fe["first_delta"], 99) * 1e3},
        "job_total_ms": {"p50": pct(fe["done"], 50) * 1e3, "p99": pct(fe["done"], 99) * 1e3},
        "interactive_ttft_ms": {"p50": pct(ttft, 50) * 1e3, "p99": pct(ttft, 99) * 1e3},
        "jobs_per_s": jps,
        "cpu_ms_per_job": cpu_ms_per_job,
        "interactive_per_s": rps,
        "cancel_ms": {"p50": pct(cancel["cancel_call"], 50) * 1e3, "p99": pct(cancel["cancel_call"], 99) * 1e3,
                      "max": max(cancel["cancel_call"]) * 1e3},
        "cancel_stream_end_ms": {"p50": pct(cancel["stream_end"], 50) * 1e3,
                                 "p99": pct(cancel["stream_end"], 99) * 1e3},
        "samples": {"latency": sizes["latency"], "throughput": sizes["throughput"], "cancel": sizes["cancel"]},
    }


def run_mode(mode: str, upstream: Service, sizes: dict[str, int]) -> dict[str, Any]:
    services: list[Service] = []
    try:
        env: dict[str, str | None] = {"CONCILIUM_POLICY_WATCH_S": "0"}
        if mode == "redis":
            redis_srv = start_redis()
            services.append(redis_srv)
            env.update(CONCILIUM_REDIS_URL=f"redis://127.0.0.1:{redis_srv.port}/0")
        else:
            env.update(CONCILIUM_REDIS_URL=None, CONCILIUM_JOBS_EMBEDDED_CONCURRENCY="2")
        gw = start_concilium(policy(upstream.meta["v1"]), env=env)  # type: ignore[arg-type]
        services.append(gw)
        if mode == "redis":
            worker_env = offline_env({**env, "CONCILIUM_POLICY": gw.meta["policy"]})
            services += [start_worker(f"bench{i}", gw.meta["policy"], worker_env) for i in (1, 2)]
        loop = new_event_loop()
        try:
            return loop.run_until_complete(measure(gw.base_url, upstream, sizes, services))
        finally:
            loop.close()
    finally:
        for svc in reversed(services):
            svc.stop()


def redis_version() -> str | None:
    exe = shutil.which("redis-server")
    if not exe:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), out.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer jobs (a smoke run)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "jobs.json")
    args = ap.parse_args()
    sizes = {"latency": 30, "throughput": 60, "cancel": 8} if args.quick else \
        {"latency": 200, "throughput": 400, "cancel": 30}
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine_info(), "git_commit": git_commit(),
            "versions": {**versions(["celery", "kombu", "redis", "fastapi", "uvicorn", "aiohttp"]),
                         "redis-server": redis_version()}}
    upstream = start_fake_upstream()
    results: dict[str, Any] = {}
    try:
        for mode in ("redis", "embedded"):
            print(f"measuring {mode} ...", flush=True)
            results[mode] = run_mode(mode, upstream, sizes)
    finally:
        upstream.stop()

    rows = [("first event (worker took it)", "first_event_ms"), ("first delta", "first_delta_ms"),
            ("interactive TTFT (baseline)", "interactive_ttft_ms"), ("whole job (13 chunks)", "job_total_ms"),
            ("cancel call (job ended)", "cancel_ms"), ("cancel -> stream's last event", "cancel_stream_end_ms")]
    print(f"\n{'ms, p50 / p99':34} {'redis (2 workers)':>22} {'embedded (2 threads)':>22}")
    for label, key in rows:
        cells = [f"{results[m][key]['p50']:8.1f} / {results[m][key]['p99']:8.1f}" for m in ("redis", "embedded")]
        print(f"{label:34} {cells[0]:>22} {cells[1]:>22}")
    print(f"{'jobs/s':34} {results['redis']['jobs_per_s']:22.1f} {results['embedded']['jobs_per_s']:22.1f}")
    for m in ("redis", "embedded"):
        parts = ", ".join(f"{k} {v:.1f}" for k, v in results[m]["cpu_ms_per_job"].items())
        print(f"CPU ms per job, {m}: {parts}")
    print(f"{'interactive streamed r/s (baseline)':34} {results['redis']['interactive_per_s']:22.1f} "
          f"{results['embedded']['interactive_per_s']:22.1f}")
    ratios = {m: {"first_delta_vs_interactive_ttft_p50": results[m]["first_delta_ms"]["p50"]
                  / results[m]["interactive_ttft_ms"]["p50"],
                  "jobs_per_s_vs_interactive_per_s": results[m]["jobs_per_s"] / results[m]["interactive_per_s"]}
              for m in results}
    ratios["redis_vs_embedded"] = {
        "first_event_p50": results["redis"]["first_event_ms"]["p50"] / results["embedded"]["first_event_ms"]["p50"],
        "jobs_per_s": results["redis"]["jobs_per_s"] / results["embedded"]["jobs_per_s"],
        "cancel_p50": results["redis"]["cancel_ms"]["p50"] / results["embedded"]["cancel_ms"]["p50"]}
    for m in ("redis", "embedded"):
        r = ratios[m]
        print(f"{m}: first delta is {r['first_delta_vs_interactive_ttft_p50']:.1f}x the interactive TTFT (p50); "
              f"jobs/s is {r['jobs_per_s_vs_interactive_per_s']:.2f}x interactive r/s")
    rv = ratios["redis_vs_embedded"]
    print(f"redis / embedded: first event {rv['first_event_p50']:.2f}x, jobs/s {rv['jobs_per_s']:.2f}x, "
          f"cancel {rv['cancel_p50']:.2f}x")
    write_json(args.out, {"benchmark": "jobs", "quick": args.quick, **meta, "results": results, "ratios": ratios,
                          "notes": "processes share the cores (not pinned); fake upstream on loopback"})
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
