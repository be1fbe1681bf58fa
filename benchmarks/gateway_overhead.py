"""Gateway overhead: what Concilium adds on top of an instant upstream, side by side with LiteLLM's proxy.

Three servers on loopback, all pointed at the same fake OpenAI-compatible upstream (instant answers,
13 content chunks when streamed):

  direct          the upstream itself (the baseline every "added" number is measured against)
  concilium       `concilium serve`, the client names the policy's model
  concilium-auto  the same gateway, the client asks for `concilium/auto` (the routing decision runs)
  concilium-keys  a gateway whose policy defines an API key with a budget and rate limits: every
                  request is authenticated, reserved and settled (`concilium/auto`); the like-for-like
                  row against LiteLLM's proxy, which checks its master key
  baseline-keys   with --baseline DIR: the same as concilium-keys, run from another checkout (an older
                  commit), so a change's cost on the hot path is a same-run ratio
  litellm         LiteLLM's proxy (`litellm --config`, installed into benchmarks/.litellm-venv)

The server under test runs pinned to one core; the load generator (this process) and the upstream
share the other. For each server, in each mode, at each concurrency, an aiohttp load generator sends
a fixed number of requests and records the latency of each to its last byte; the server's CPU time
(user + system of its whole process tree, from /proc) is read before and after.

Modes:  stream    streamed answer, the upstream writes its 15 events back to back (the issue's case)
        complete  non-streamed answer
        paced     streamed, the upstream waits 2 ms between events, as a model generating tokens
                  would: every event then arrives, and must be relayed, on its own

  added latency   = server's p50 / p99 - the direct upstream's p50 / p99, same mode and concurrency
  CPU per request = server CPU seconds during the run / requests
  idle CPU        = server CPU per second at rest (background work), measured before the runs

Run:  .venv/bin/python benchmarks/gateway_overhead.py            (about 8 minutes on 2 cores)
      .venv/bin/python benchmarks/gateway_overhead.py --quick    (fewer requests, a smoke run)
Writes benchmarks/results/gateway_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import (
    RESULTS_DIR,
    LoadResult,
    Service,
    git_commit,
    litellm_installed,
    machine_info,
    new_event_loop,
    pin_self,
    run_load,
    split_cores,
    start_concilium,
    start_fake_upstream,
    start_litellm_proxy,
    versions,
    write_json,
)

MODEL = "bench"  # the policy's (and LiteLLM's) model name
UPSTREAM_MODEL = "bench-upstream"  # the model id the upstream sees
PROMPT = "Please answer with a short friendly greeting for the gateway overhead benchmark run today"
CPU_TARGET_MS = 1.0  # Concilium CPU per streamed request, routing decision included
RATIO_TARGET = 5.0  # x less CPU and added latency than LiteLLM's proxy
PACE_S = 0.002  # gap between streamed events in the paced mode
MODES = ("stream", "complete", "paced")

POLICY = """\
# Written by benchmarks/gateway_overhead.py: one OpenAI-compatible model on the fake upstream.
version: 1
models:
  {model}:
    provider: openai
    base_url: {upstream}
    model: {upstream_model}
    price: {{input: 0.15, output: 0.60}}
routes:
  - name: default
    targets: [{model}]
"""
KEY = "sk-cc-overhead-benchmark-key"
KEYS = """
keys:
  - name: bench
    hash: {hash}
    budget: {{usd_per_day: 100000}}
    rate: {{requests_per_min: 10000000, tokens_per_min: 1000000000}}
"""


def keyed_policy(v1: str) -> str:
    from concilium.guard.keys import hash_key

    return POLICY.format(model=MODEL, upstream=v1, upstream_model=UPSTREAM_MODEL) + KEYS.format(hash=hash_key(KEY))


def body(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": stream}


def set_pacing(upstream: Service, gap_s: float) -> None:
    """Make the fake upstream wait `gap_s` between streamed events, for every model (0: instant)."""
    fault = {"chunk_delay_s": gap_s} if gap_s else {}
    post_json(upstream.base_url + "/_control/default", {"model": "*", "fault": fault})


def idle_cpu_ms_per_s(svc: Service, seconds: float = 3.0) -> float:
    c0 = svc.cpu_seconds()
    time.sleep(seconds)
    return round((svc.cpu_seconds() - c0) / seconds * 1e3, 2)


def post_json(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read()), dict(r.headers)


def measure(target: str, svc: Service, url: str, model: str, mode: str, concurrency: int, requests: int,
            headers: dict[str, str] | None, warmup: int) -> dict[str, Any]:
    stream = mode != "complete"
    loop = new_event_loop()
    try:
        # Warm up first (connections, caches, lazy imports), then read the CPU counters.
        loop.run_until_complete(run_load(url, body(model, stream), requests=warmup, concurrency=concurrency,
                                         headers=headers))
        cpu0 = svc.cpu_seconds()
        res: LoadResult = loop.run_until_complete(
            run_load(url, body(model, stream), requests=requests, concurrency=concurrency, headers=headers))
        cpu1 = svc.cpu_seconds()
    finally:
        loop.close()
    ok = len(res.latencies_s)
    cpu = cpu1 - cpu0
    return {
        "target": target, "mode": mode, "stream": stream, "concurrency": concurrency, "requests": requests, "ok": ok,
        "errors": res.errors, "error_samples": res.error_samples, "wall_s": round(res.wall_s, 4),
        "rps": round(res.rps, 1), "p50_ms": round(res.pct(50) * 1e3, 3), "p99_ms": round(res.pct(99) * 1e3, 3),
        "mean_ms": round(sum(res.latencies_s) / ok * 1e3, 3) if ok else None,
        "events_per_request": round(res.events_per_request, 2),
        "cpu_s": round(cpu, 3), "cpu_ms_per_request": round(cpu / requests * 1e3, 3),
        "core_utilisation": round(cpu / res.wall_s, 3) if res.wall_s else None,
    }


def add_overhead(rows: list[dict[str, Any]]) -> None:
    direct = {(r["mode"], r["concurrency"]): r for r in rows if r["target"] == "direct"}
    for r in rows:
        d = direct.get((r["mode"], r["concurrency"]))
        if d is None or r["target"] == "direct":
            r["added_p50_ms"] = r["added_p99_ms"] = None
            continue
        r["added_p50_ms"] = round(r["p50_ms"] - d["p50_ms"], 3)
        r["added_p99_ms"] = round(r["p99_ms"] - d["p99_ms"], 3)


NOISE_MS = 0.05  # an added latency at or below this (or negative) is within the timer's and scheduler's noise


def _ratio(lite: float | None, ours: float | None, floor: float) -> float | str | None:
    """LiteLLM / Concilium; "noise" when Concilium's value is at or below `floor` (no ratio to speak of)."""
    if lite is None or ours is None:
        return None
    if ours <= floor:
        return "noise"
    return round(lite / ours, 1)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LiteLLM / Concilium for CPU per request and added latency, per scenario and Concilium target."""
    by = {(r["target"], r["mode"], r["concurrency"]): r for r in rows}
    out = []
    for (target, mode, conc), r in by.items():
        lite = by.get(("litellm", mode, conc))
        if not target.startswith("concilium") or lite is None:
            continue
        out.append({"target": target, "mode": mode, "concurrency": conc,
                    "cpu_ratio": _ratio(lite["cpu_ms_per_request"], r["cpu_ms_per_request"], 0.0),
                    "added_p50_ratio": _ratio(lite["added_p50_ms"], r["added_p50_ms"], NOISE_MS),
                    "added_p99_ratio": _ratio(lite["added_p99_ms"], r["added_p99_ms"], NOISE_MS),
                    "litellm_added_p50_ms": lite["added_p50_ms"], "litellm_added_p99_ms": lite["added_p99_ms"]})
    return out


def before_after(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """concilium-keys / baseline-keys (this checkout against --baseline's), per scenario: < 1 is faster."""
    by = {(r["target"], r["mode"], r["concurrency"]): r for r in rows}
    out = []
    for (target, mode, conc), r in by.items():
        old = by.get(("baseline-keys", mode, conc))
        if target != "concilium-keys" or old is None:
            continue
        out.append({"mode": mode, "concurrency": conc,
                    "cpu_ratio_new_over_old": round(r["cpu_ms_per_request"] / old["cpu_ms_per_request"], 3)
                    if old["cpu_ms_per_request"] else None,
                    "p50_ratio_new_over_old": round(r["p50_ms"] / old["p50_ms"], 3) if old["p50_ms"] else None})
    return out


def _f(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def print_tables(rows: list[dict[str, Any]], rats: list[dict[str, Any]]) -> None:
    head = (f"{'mode':<9}{'conc':>5}  {'target':<15}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'+p50 ms':>9}"
            f"{'+p99 ms':>9}{'CPU ms/req':>12}{'core use':>10}{'events':>8}{'errors':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        mode = r["mode"]
        print(f"{mode:<9}{r['concurrency']:>5}  {r['target']:<15}{_f(r['rps'], 1):>8}{_f(r['p50_ms']):>9}"
              f"{_f(r['p99_ms']):>9}{_f(r['added_p50_ms']):>9}{_f(r['added_p99_ms']):>9}"
              f"{_f(r['cpu_ms_per_request'], 3):>12}{_f(r['core_utilisation']):>10}"
              f"{_f(r['events_per_request'], 1):>8}{r['errors']:>7}")
    if rats:
        head = f"{'mode':<9}{'conc':>5}  {'LiteLLM / ...':<15}{'CPU':>8}{'+p50':>8}{'+p99':>8}"
        print("\nRatios (how many times more LiteLLM's proxy costs; noise: Concilium's added latency is "
              f"<= {NOISE_MS} ms)\n" + head + "\n" + "-" * len(head))
        for q in rats:
            mode = q["mode"]
            print(f"{mode:<9}{q['concurrency']:>5}  {q['target']:<15}{_f(q['cpu_ratio'], 1):>8}"
                  f"{_f(q['added_p50_ratio'], 1):>8}{_f(q['added_p99_ratio'], 1):>8}")


def verdict(rows: list[dict[str, Any]], rats: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, judged on its scenarios (instant upstream: the stream and complete modes)."""
    auto_stream = [r for r in rows if r["target"] == "concilium-auto" and r["mode"] == "stream"]
    worst_cpu = max((r["cpu_ms_per_request"] for r in auto_stream), default=None)
    paced = [r["cpu_ms_per_request"] for r in rows if r["target"] == "concilium-auto" and r["mode"] == "paced"]
    # A "noise" cell (Concilium adds nothing measurable) counts as a pass when LiteLLM adds clearly more.
    lows = [v for q in rats if q["mode"] != "paced"
            for v in (q["cpu_ratio"], q["added_p50_ratio"], q["added_p99_ratio"]) if isinstance(v, float)]
    noise_ok = all(q[f"litellm_added_{k}_ms"] > RATIO_TARGET * NOISE_MS for q in rats if q["mode"] != "paced"
                   for k in ("p50", "p99") if q[f"added_{k}_ratio"] == "noise")
    return {
        "cpu_target_ms": CPU_TARGET_MS, "worst_streamed_cpu_ms_auto": worst_cpu,
        "worst_paced_cpu_ms_auto": max(paced, default=None),
        "cpu_target_met": worst_cpu is not None and worst_cpu <= CPU_TARGET_MS,
        "ratio_target": RATIO_TARGET, "lowest_ratio": min(lows) if lows else None,
        "ratio_target_met": bool(lows) and min(lows) >= RATIO_TARGET and noise_ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests-c1", type=int, default=400, help="requests per run at concurrency 1")
    ap.add_argument("--requests-many", type=int, default=2000, help="requests per run at the higher concurrency")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    ap.add_argument("--concurrency", type=int, default=50, help="the higher concurrency (default 50)")
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 60 / 300 requests")
    ap.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy (no ratios)")
    ap.add_argument("--baseline", default=None, help="a checkout of another commit: adds its keyed gateway "
                                                          "(baseline-keys) for a same-run before/after ratio")
    ap.add_argument("--out", default=str(RESULTS_DIR / "gateway_overhead.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests_c1, args.requests_many, args.warmup = 60, 300, 20
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}")
    for name in ("requests_c1", "requests_many", "concurrency"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")

    server_cores, driver_cores = split_cores()
    if server_cores is None:
        print("warning: only one usable core; servers and load generator share it", file=sys.stderr)
    pin_self(driver_cores)
    started = time.time()
    services: list[Service] = []
    try:
        upstream = start_fake_upstream(driver_cores)
        services.append(upstream)
        v1 = upstream.meta["v1"]
        gw = start_concilium(POLICY.format(model=MODEL, upstream=v1, upstream_model=UPSTREAM_MODEL), server_cores)
        services.append(gw)
        targets: list[tuple[str, Service, str, str, dict[str, str] | None]] = [
            ("direct", upstream, v1 + "/chat/completions", UPSTREAM_MODEL, None),
            ("concilium", gw, gw.base_url + "/v1/chat/completions", MODEL, None),
            ("concilium-auto", gw, gw.base_url + "/v1/chat/completions", "concilium/auto", None),
        ]
        keyed = start_concilium(keyed_policy(v1), server_cores)
        services.append(keyed)
        auth_keyed = {"authorization": f"Bearer {KEY}"}
        targets.append(("concilium-keys", keyed, keyed.base_url + "/v1/chat/completions", "concilium/auto", auth_keyed))
        baseline_commit = None
        if args.baseline:
            base = start_concilium(keyed_policy(v1), server_cores, src=Path(args.baseline).resolve())
            services.append(base)
            targets.append(("baseline-keys", base, base.base_url + "/v1/chat/completions", "concilium/auto",
                            auth_keyed))
            baseline_commit = git_commit(Path(args.baseline))
        plan, _ = post_json(gw.base_url + "/v1/route", body("concilium/auto", False))
        _, gw_headers = post_json(gw.base_url + "/v1/chat/completions", body("concilium/auto", False))
        lite_version = None
        if not args.no_litellm:
            lite = start_litellm_proxy(MODEL, v1, UPSTREAM_MODEL, cores=server_cores)
            services.append(lite)
            auth = {"authorization": f"Bearer {lite.meta['master_key']}"}
            targets.append(("litellm", lite, lite.base_url + "/v1/chat/completions", MODEL, auth))
            lite_version = "1.106.2" if litellm_installed() else None

        idle = {name: idle_cpu_ms_per_s(svc) for name, svc, *_ in targets if name != "concilium-auto"}
        rows: list[dict[str, Any]] = []
        for conc, n in ((1, args.requests_c1), (args.concurrency, args.requests_many)):
            for mode in modes:
                set_pacing(upstream, PACE_S if mode == "paced" else 0.0)
                for name, svc, url, model, headers in targets:
                    print(f"  {mode} c={conc} {name} ...", file=sys.stderr, flush=True)
                    rows.append(measure(name, svc, url, model, mode, conc, n, headers,
                                        warmup=max(args.warmup, conc)))
    finally:
        for svc in reversed(services):
            svc.stop()

    add_overhead(rows)
    rats = ratios(rows)
    print_tables(rows, rats)
    ba = before_after(rows)
    if ba:
        print(f"\nThis checkout / baseline {baseline_commit} (keys on, concilium/auto; < 1 is faster)")
        for q in ba:
            print(f"  {q['mode']:<9} c={q['concurrency']:<4} CPU {_f(q['cpu_ratio_new_over_old'], 3)}  "
                  f"p50 {_f(q['p50_ratio_new_over_old'], 3)}")
    print("\nIdle CPU (ms per second at rest): " + ", ".join(f"{k} {v:g}" for k, v in idle.items()))
    v = verdict(rows, rats)
    print(f"\nConcilium CPU per streamed request via concilium/auto (worst concurrency): "
          f"{_f(v['worst_streamed_cpu_ms_auto'], 3)} ms (target <= {CPU_TARGET_MS} ms: "
          f"{'met' if v['cpu_target_met'] else 'NOT met'})"
          + (f"; paced (2 ms between events): {_f(v['worst_paced_cpu_ms_auto'], 3)} ms"
             if v["worst_paced_cpu_ms_auto"] is not None else ""))
    if rats:
        print(f"Lowest LiteLLM/Concilium ratio: {_f(v['lowest_ratio'], 1)}x (target >= {RATIO_TARGET:g}x: "
              f"{'met' if v['ratio_target_met'] else 'NOT met'})")

    out = {
        "benchmark": "gateway_overhead",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "load_avg_at_end": list(os.getloadavg()),  # other work on the machine inflates c=1 CPU and p99
        "git_commit": git_commit(),
        "baseline_commit": baseline_commit,
        "before_after": ba,
        "machine": machine_info(),
        "versions": {**versions(["fastapi", "starlette", "uvicorn", "uvloop", "httptools", "aiohttp",
                                 "pydantic", "orjson"]), "litellm_proxy": lite_version},
        "pinning": {"server_cores": sorted(server_cores or []), "driver_cores": sorted(driver_cores or [])},
        "settings": {"requests_c1": args.requests_c1, "requests_many": args.requests_many,
                     "concurrency": [1, args.concurrency], "warmup": args.warmup, "prompt": PROMPT,
                     "upstream_chunks": 13, "modes": modes, "paced_gap_s": PACE_S},
        "idle_cpu_ms_per_s": idle,
        "routing": {"auto_plan": plan, "auto_headers": {k: v for k, v in gw_headers.items()
                                                        if k.lower().startswith("x-")}},
        "results": rows,
        "ratios": rats,
        "verdict": v,
    }
    write_json(Path(args.out), out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
