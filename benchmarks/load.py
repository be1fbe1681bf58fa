"""Sustained load and memory soak: Concilium's mixed workload, side by side with LiteLLM's proxy.

Open-loop load (requests are sent on a fixed schedule, whatever the server's speed, and each latency
is counted from its scheduled send time, so a server that falls behind is not flattered). Servers on
loopback, pointed at the project's fake OpenAI-compatible upstream (instant answers, 13 chunks):

  concilium-mixed   API keys on (each request authenticated, rate-limited, its maximum cost reserved
                    and settled), a mix of 70% streamed chat through `concilium/auto` (routing decision
                    + streamed pass-through), 20% `POST /v1/route` (the decision alone) and 10%
                    background jobs (`POST /v1/responses`, `background: true`, run by the embedded
                    worker inside the gateway process)
  concilium-stream  the same gateway, streamed chat only (what LiteLLM can be compared on)
  litellm-stream    LiteLLM's proxy (benchmarks/.litellm-venv), streamed chat only, master key

  added latency = a request's latency - the direct upstream's median for a streamed chat (for the
                  routing dry run and the job submission, which call no model, the whole latency)
  a step passes when every request succeeded, the server kept up (>= 95% of the offered rate) and
                  the p99 added latency <= 50 ms; each step lasts max(--step-s, the time --min-requests
                  requests take at its rate), so every p99 rests on at least that many samples (1000 by
                  default: the p99 is then the 10th-worst latency, not the worst); the JSON records each
                  step's duration, request count and the number of latencies its percentiles are drawn from
  first failing rate = the lowest step of the ladder that did not pass (null: every step passed)
  sustained rate     = the highest rate below which every step passes: all steps up to and including
                       it passed (0 when the lowest step failed)

The ladder goes on past the first failing step (what a server does there is reported too, e.g. the
highest rate it kept up with) and stops once a step is well past saturation (errors, not kept up, or
p99 above 4x the target). The server under test is pinned to one core; the load generator and the
upstream share the other. The soak then runs each server at its sustained rate (if no step passed:
at the lowest step, and the soak says so) for --soak-s seconds (default 600), sampling the resident
memory of its whole process tree every 5 s.

Run:  .venv/bin/python benchmarks/load.py                 (ladder + 10-minute soak per server)
      .venv/bin/python benchmarks/load.py --soak-s 60     (a shorter soak)
      .venv/bin/python benchmarks/load.py --quick         (3 s steps of >= 100 requests, 30 s soak: a
                                                           smoke run, its p99s too thin to publish)
Writes benchmarks/results/load.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    RESULTS_DIR,
    Service,
    git_commit,
    litellm_installed,
    machine_info,
    new_event_loop,
    pin_self,
    split_cores,
    start_concilium,
    start_fake_upstream,
    start_litellm_proxy,
    tree_pids,
    versions,
    write_json,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from concilium.guard.keys import hash_key, new_key  # noqa: E402

P99_TARGET_S = 0.050
MODEL = "bench"
UPSTREAM_MODEL = "bench-upstream"
PROMPT = "Please answer with a short friendly greeting for the sustained load benchmark run today"
KEY = new_key()

POLICY = f"""\
# Written by benchmarks/load.py
version: 1
models:
  {MODEL}:
    provider: openai
    base_url: {{upstream}}
    model: {UPSTREAM_MODEL}
    price: {{{{input: 0.15, output: 0.60}}}}
routes:
  - name: default
    targets: [{MODEL}]
jobs:
  result_ttl_s: 60   # finished jobs are kept this long (the default, a day, grows memory by design)
keys:
  - name: load
    hash: {hash_key(KEY)}
    budget: {{{{usd_per_day: 100000}}}}
    rate: {{{{requests_per_min: 10000000, tokens_per_min: 1000000000}}}}
"""


def chat_body(stream: bool = True) -> dict[str, Any]:
    return {"model": "concilium/auto", "messages": [{"role": "user", "content": PROMPT}], "stream": stream,
            "max_tokens": 64}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def rss_mib(svc: Service) -> float:
    total = 0
    for pid in tree_pids(svc.proc.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# ---------------------------------------------------------------- one open-loop step


async def _send(session: Any, kind: str, base: str, headers: dict[str, str], model: str) -> None:
    if kind == "stream":
        body = {**chat_body(True), "model": model}
        async with session.post(base + "/v1/chat/completions", json=body, headers=headers) as r:
            raw = await r.read()
            if r.status != 200 or not raw.rstrip().endswith(b"data: [DONE]"):
                raise RuntimeError(f"stream: HTTP {r.status} {raw[-120:]!r}")
    elif kind == "route":
        async with session.post(base + "/v1/route", json=chat_body(False), headers=headers) as r:
            raw = await r.read()
            if r.status != 200 or b'"candidates"' not in raw:
                raise RuntimeError(f"route: HTTP {r.status} {raw[:120]!r}")
    else:  # a background job: the submission is what the client waits for
        body = {"model": "concilium/auto", "input": PROMPT, "background": True, "max_output_tokens": 64}
        async with session.post(base + "/v1/responses", json=body, headers=headers) as r:
            raw = await r.read()
            if r.status not in (200, 202) or b'"id"' not in raw:
                raise RuntimeError(f"job: HTTP {r.status} {raw[:120]!r}")


async def open_loop(base: str, rate: float, seconds: float, mix: dict[str, float], headers: dict[str, str],
                    model: str, seed: int = 0) -> dict[str, Any]:
    """Send round(rate*seconds) requests on schedule; latency from each scheduled send time."""
    import aiohttp

    rng = random.Random(seed)
    kinds, weights = list(mix), list(mix.values())
    n = max(1, round(rate * seconds))
    lat: dict[str, list[float]] = {k: [] for k in kinds}
    errors: list[str] = []
    lag: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter() + 0.05

        async def one(i: int, kind: str) -> None:
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag.append(max(0.0, time.perf_counter() - due))
            try:
                await _send(session, kind, base, headers, model)
            except Exception as e:  # counted: errors fail the step
                errors.append(f"{type(e).__name__}: {e}"[:200])
                return
            lat[kind].append(time.perf_counter() - due)

        plan = [(i, rng.choices(kinds, weights)[0]) for i in range(n)]
        await asyncio.gather(*(one(i, k) for i, k in plan))
        wall = time.perf_counter() - t0
    done = sum(len(v) for v in lat.values())
    return {"offered_rps": rate, "duration_s": round(n / rate, 3), "requests": n, "ok": done, "errors": len(errors), "error_samples": errors[:3],
            "achieved_rps": done / wall if wall > 0 else 0.0, "latencies": lat,
            "generator_lag_p99_ms": pct(lag, 99) * 1000}


def summarise(step: dict[str, Any], baseline_s: float) -> dict[str, Any]:
    added: list[float] = []
    per_kind = {}
    for kind, xs in step.pop("latencies").items():
        base = baseline_s if kind == "stream" else 0.0
        adds = [x - base for x in xs]
        added += adds
        if xs:
            per_kind[kind] = {"n": len(xs), "p50_ms": pct(xs, 50) * 1000, "p99_ms": pct(xs, 99) * 1000,
                              "added_p99_ms": pct(adds, 99) * 1000}
    step["per_kind"] = per_kind
    step["samples"] = len(added)  # the latencies the step's percentiles are drawn from
    step["added_p50_ms"] = pct(added, 50) * 1000
    step["added_p99_ms"] = pct(added, 99) * 1000
    step["kept_up"] = step["achieved_rps"] >= 0.95 * step["offered_rps"]
    step["meets_target"] = (step["errors"] == 0 and step["kept_up"]
                            and step["added_p99_ms"] <= P99_TARGET_S * 1000)
    return step


def step_seconds(rate: float, step_s: float, min_requests: int) -> float:
    """Long enough for the step's duration and for `min_requests` requests at `rate`."""
    return max(step_s, min_requests / rate)


def ladder(loop: asyncio.AbstractEventLoop, svc: Service, name: str, base: str, rates: list[float],
           step_s: float, min_requests: int, mix: dict[str, float], headers: dict[str, str], model: str,
           baseline_s: float) -> dict[str, Any]:
    steps = []
    first_failing: float | None = None
    sustained = 0.0
    for rate in rates:
        cpu0 = svc.cpu_seconds()
        seconds = step_seconds(rate, step_s, min_requests)
        step = summarise(loop.run_until_complete(open_loop(base, rate, seconds, mix, headers, model)), baseline_s)
        step["cpu_ms_per_request"] = (svc.cpu_seconds() - cpu0) * 1000 / max(1, step["ok"])
        step["server_core_busy"] = step["cpu_ms_per_request"] * step["achieved_rps"] / 1000  # of its one core
        steps.append(step)
        step["failed_because"] = [why for why, bad in (("errors", step["errors"] > 0),
                                                       ("not kept up", not step["kept_up"]),
                                                       ("p99 over target",
                                                        not step["added_p99_ms"] <= P99_TARGET_S * 1000))
                                  if bad]
        if step["meets_target"]:
            if first_failing is None:
                sustained = rate
        elif first_failing is None:
            first_failing = rate
        mark = "ok" if step["meets_target"] else "-- " + ", ".join(step["failed_because"])
        print(f"  {name:17s} {rate:6.0f} req/s offered {step['duration_s']:5.0f} s {step['samples']:5d} samples  "
              f"{step['achieved_rps']:6.1f} achieved  added p50 {step['added_p50_ms']:6.1f} ms  "
              f"p99 {step['added_p99_ms']:7.1f} ms  cpu {step['cpu_ms_per_request']:5.2f} ms/req  "
              f"errors {step['errors']}  {mark}", flush=True)
        if not step["meets_target"] and (step["errors"] or not step["kept_up"]
                                         or not step["added_p99_ms"] <= 4 * P99_TARGET_S * 1000):
            break  # well past saturation: higher steps only queue more
    kept = [s["offered_rps"] for s in steps if s["kept_up"] and s["errors"] == 0]
    passing = [s["offered_rps"] for s in steps if s["meets_target"]]
    return {"server": name, "mix": mix,
            "first_failing_rps": first_failing,      # null: every step of the ladder passed
            "sustained_rps": sustained,              # every step up to and including it passed
            "highest_passing_rps": max(passing, default=0.0),  # any step, passing steps above a failure too
            "max_kept_up_rps": max(kept, default=0.0),
            "min_samples_per_step": min((s["samples"] for s in steps), default=0),
            "steps": steps}


def soak(loop: asyncio.AbstractEventLoop, svc: Service, name: str, base: str, rate: float, rate_basis: str,
         seconds: float, mix: dict[str, float], headers: dict[str, str], model: str,
         every_s: float = 5.0) -> dict[str, Any]:
    samples: list[tuple[float, float]] = []
    errors = 0
    t_start = time.perf_counter()
    chunk = max(every_s, 1.0)
    while time.perf_counter() - t_start < seconds:
        step = loop.run_until_complete(open_loop(base, rate, chunk, mix, headers, model,
                                                 seed=len(samples)))
        errors += step["errors"]
        samples.append((round(time.perf_counter() - t_start, 1), round(rss_mib(svc), 2)))
    half = [s for s in samples if s[0] >= seconds / 2] or samples
    slope = 0.0
    if len(half) >= 2:  # least squares over the second half, MiB per minute
        xs, ys = [s[0] for s in half], [s[1] for s in half]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        slope = (sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den * 60) if den else 0.0
    out = {"server": name, "rate_rps": rate, "rate_basis": rate_basis, "seconds": seconds, "errors": errors,
           "rss_first_mib": samples[0][1], "rss_last_mib": samples[-1][1],
           "rss_max_mib": max(s[1] for s in samples), "slope_second_half_mib_per_min": round(slope, 3),
           "samples": samples}
    print(f"  {name:17s} soak {seconds:.0f}s at {rate:.0f} req/s ({rate_basis}): RSS {out['rss_first_mib']:.1f} -> "
          f"{out['rss_last_mib']:.1f} MiB (max {out['rss_max_mib']:.1f}), second-half slope "
          f"{slope:+.2f} MiB/min, errors {errors}", flush=True)
    return out


def direct_baseline(loop: asyncio.AbstractEventLoop, upstream: Service) -> float:
    step = loop.run_until_complete(open_loop(upstream.base_url, 20, 3, {"stream": 1.0}, {}, UPSTREAM_MODEL))
    xs = step["latencies"]["stream"]
    if step["errors"] or not xs:
        raise RuntimeError(f"direct upstream failed: {step['error_samples']}")
    return pct(xs, 50)


def _fmt_rate(x: float | None, top: float) -> str:
    return f"none up to {top:.0f}" if x is None else f"{x:.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def print_report(out: dict[str, Any]) -> None:
    """The table and the Concilium / LiteLLM ratio rows, all read from one result (one run)."""
    rates, target = out["settings"]["rates"], out["settings"]["p99_added_target_ms"]
    lads = {lad["server"]: lad for lad in out["ladders"]}
    soaks = {s["server"]: s for s in out["soaks"]}
    print(f"\n| server | first failing req/s | sustained req/s (every step up to it passes: no error, kept up, "
          f"p99 added <= {target:.0f} ms) | fewest samples in a step | added p50 / p99 (ms) at the sustained rate "
          "| highest rate kept up with | soak |")
    print("|---|---|---|---|---|---|---|")
    for name, lad in lads.items():
        at = next((s for s in lad["steps"] if s["offered_rps"] == lad["sustained_rps"]), None)
        low = lad["steps"][0] if lad["steps"] else None
        if at:
            lat = f"{at['added_p50_ms']:.1f} / {at['added_p99_ms']:.1f}"
        elif low:
            lat = f"no step passed (lowest step: {low['added_p50_ms']:.1f} / {low['added_p99_ms']:.1f})"
        else:
            lat = "-"
        sk = soaks.get(name)
        if sk is None:
            soak_txt = "the concilium-mixed soak (same process)" if name == "concilium-stream" else "-"
        else:
            soak_txt = (f"{sk['seconds']:.0f} s at {sk['rate_rps']:.0f} req/s ({sk['rate_basis']}): RSS "
                        f"{sk['rss_first_mib']:.1f} -> {sk['rss_last_mib']:.1f} MiB, second-half slope "
                        f"{sk['slope_second_half_mib_per_min']:+.2f} MiB/min, errors {sk['errors']}")
        print(f"| {name} | {_fmt_rate(lad['first_failing_rps'], rates[-1])} | {lad['sustained_rps']:.0f} | "
              f"{lad['min_samples_per_step']} | {lat} | {lad['max_kept_up_rps']:.0f} | {soak_txt} |")
    c, lt = lads.get("concilium-stream"), lads.get("litellm-stream")
    if not (c and lt):
        return
    print("\nstreamed chat, Concilium / LiteLLM (same run):")
    rows = (("sustained rate", "sustained_rps", out["concilium_over_litellm_stream"]),
            ("first failing rate", "first_failing_rps", out["concilium_over_litellm_stream_first_failing"]),
            ("highest rate kept up with", "max_kept_up_rps", out["concilium_over_litellm_stream_kept_up"]))
    for label, key, ratio in rows:
        both = f"Concilium {_fmt_rate(c[key], rates[-1])}, LiteLLM {_fmt_rate(lt[key], rates[-1])} req/s"
        if key == "first_failing_rps" and c[key] == lt[key] == rates[0]:
            print(f"  {label}: both failed the lowest step ({rates[0]:.0f} req/s), no ratio")
        elif ratio is not None:
            print(f"  {label}: {ratio:.1f}x ({both})")
        else:
            print(f"  {label}: no ratio ({both})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--step-s", type=float, default=10.0, help="minimum seconds per ladder step")
    ap.add_argument("--min-requests", type=int, default=None,
                    help="minimum requests per ladder step, so that its p99 means something (default 1000; "
                         "100 with --quick); a low step lasts min-requests / rate seconds")
    ap.add_argument("--soak-s", type=float, default=None, help="soak duration per server (default 600 s)")
    ap.add_argument("--rates", default="5,10,20,30,40,60,80,100,125,150,200,250,300,400",
                    help="offered req/s ladder")
    ap.add_argument("--quick", action="store_true",
                    help="3 s steps of >= 100 requests and a 30 s soak (unless --step-s/--min-requests/--soak-s)")
    ap.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    ap.add_argument("--out", default=str(RESULTS_DIR / "load.json"))
    ap.add_argument("--report", metavar="FILE", help="print the table of a result file written before, run nothing")
    args = ap.parse_args(argv)
    if args.report:
        print_report(json.loads(Path(args.report).read_text()))
        return 0
    if args.quick and "--step-s" not in (argv if argv is not None else sys.argv[1:]):
        args.step_s = 3.0
    if args.min_requests is None:
        args.min_requests = 100 if args.quick else 1000
    if args.soak_s is None:
        args.soak_s = 30.0 if args.quick else 600.0
    rates = sorted(float(r) for r in args.rates.split(","))
    server_cores, driver_cores = split_cores()
    pin_self(driver_cores)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    upstream = start_fake_upstream(driver_cores)
    results: dict[str, Any] = {"ladders": [], "soaks": []}
    services: list[Service] = [upstream]
    try:
        baseline = direct_baseline(loop, upstream)
        print(f"direct upstream, streamed chat: p50 {baseline * 1000:.2f} ms", flush=True)
        gw = start_concilium(POLICY.format(upstream=upstream.meta["v1"]), server_cores)
        services.append(gw)
        auth = {"authorization": f"Bearer {KEY}"}
        mixed = {"stream": 0.7, "route": 0.2, "job": 0.1}
        plans = [("concilium-mixed", gw, gw.base_url, mixed, auth, "concilium/auto"),
                 ("concilium-stream", gw, gw.base_url, {"stream": 1.0}, auth, "concilium/auto")]
        if not args.no_litellm:
            if not litellm_installed():
                print("installing LiteLLM's proxy into benchmarks/.litellm-venv ...", flush=True)
            lp = start_litellm_proxy(MODEL, upstream.meta["v1"], UPSTREAM_MODEL, cores=server_cores)
            services.append(lp)
            plans.append(("litellm-stream", lp, lp.base_url, {"stream": 1.0},
                          {"authorization": f"Bearer {lp.meta['master_key']}"}, MODEL))
        print(f"ladder: each step max({args.step_s:g} s, {args.min_requests} requests), p99 added latency "
              f"target {P99_TARGET_S * 1000:.0f} ms", flush=True)
        for name, svc, base, mix, headers, model in plans:
            loop.run_until_complete(open_loop(base, 10, 1, mix, headers, model))  # warm up
            results["ladders"].append(ladder(loop, svc, name, base, rates, args.step_s, args.min_requests, mix,
                                             headers, model, baseline))
        print(f"soak: {args.soak_s:.0f} s per server at its sustained rate", flush=True)
        for (name, svc, base, mix, headers, model), lad in zip(plans, results["ladders"], strict=True):
            if name == "concilium-stream":
                continue  # the mixed soak covers the same process
            if lad["sustained_rps"]:
                rate, basis = lad["sustained_rps"], "sustained rate"
            else:
                rate, basis = rates[0], "lowest step: no step passed"
            results["soaks"].append(soak(loop, svc, name, base, rate, basis, args.soak_s, mix, headers, model))
    finally:
        for s in reversed(services):
            s.stop()
    lads = {lad["server"]: lad for lad in results["ladders"]}
    by = {k: v["sustained_rps"] for k, v in lads.items()}
    first = {k: v["first_failing_rps"] for k, v in lads.items()}
    kept = {k: v["max_kept_up_rps"] for k, v in lads.items()}
    ratios = {"sustained": _ratio(by.get("concilium-stream"), by.get("litellm-stream")),
              "first_failing": _ratio(first.get("concilium-stream"), first.get("litellm-stream")),
              "max_kept_up": _ratio(kept.get("concilium-stream"), kept.get("litellm-stream"))}
    out = {"benchmark": "load", "git_commit": git_commit(), "machine": machine_info(),
           "versions": versions(["fastapi", "uvicorn", "aiohttp", "redis", "litellm", "orjson"]),
           "litellm_proxy_version": "1.106.2" if not args.no_litellm else None,
           "settings": {"quick": args.quick, "step_s": args.step_s, "min_requests_per_step": args.min_requests,
                        "soak_s": args.soak_s, "rates": rates, "p99_added_target_ms": P99_TARGET_S * 1000,
                        "server_cores": sorted(server_cores or []), "driver_cores": sorted(driver_cores or [])},
           "direct_upstream_stream_p50_ms": baseline * 1000,
           "first_failing_rps": first, "sustained_rps": by, "max_kept_up_rps": kept,
           "concilium_over_litellm_stream": ratios["sustained"],
           "concilium_over_litellm_stream_first_failing": ratios["first_failing"],
           "concilium_over_litellm_stream_kept_up": ratios["max_kept_up"], **results}
    json.dumps(out)  # fail loudly here, not in a reader, if something is not serialisable
    print_report(out)
    write_json(Path(args.out), out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
