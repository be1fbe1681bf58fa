"""What a response-cache hit costs: latency and gateway CPU per request, one client, against the fake
upstream, for a policy without a cache (the pass-through), a miss (every prompt new), an exact hit,
a streamed exact hit and a semantic hit (the stored prompt with a typo).

    .venv/bin/python benchmarks/cache.py [--requests 400] [--out benchmarks/results/cache.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
from pathlib import Path

from _common import (
    RESULTS_DIR,
    git_commit,
    machine_info,
    pin_self,
    split_cores,
    start_concilium,
    start_fake_upstream,
    tree_cpu_seconds,
    versions,
    write_json,
)

POLICY = """
version: 1
models:
  m: {{provider: openai, base_url: "{upstream}", model: m, price: {{input: 1, output: 2}}}}
routes:
  - name: main
    targets: [m]
{cache}
"""
PROMPT = "Which river flows through the city of Vienna, and where does it reach the sea? ({i})"
TYPO = "Which rvier flows through the city of Vienna, and where does it reach the sea? ({i})"


def _post(conn: http.client.HTTPConnection, text: str, stream: bool) -> str:
    body = json.dumps({"model": "concilium/auto", "messages": [{"role": "user", "content": text}],
                       "temperature": 0, "max_tokens": 16, "stream": stream})
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json",
                                                        "authorization": "Bearer x"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}")
    return r.getheader("x-concilium-cache") or "-"


def run_case(gw, name: str, texts: list[str], stream: bool, expect: str, warm: list[str] | None = None) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    for t in warm if warm is not None else texts[:20]:  # warm-up
        _post(conn, t, stream)
    lat, seen = [], {}
    cpu0 = tree_cpu_seconds(gw.proc.pid)
    for t in texts:
        t0 = time.perf_counter()
        state = _post(conn, t, stream)
        lat.append(time.perf_counter() - t0)
        seen[state] = seen.get(state, 0) + 1
    cpu = tree_cpu_seconds(gw.proc.pid) - cpu0
    conn.close()
    lat.sort()
    row = {"case": name, "requests": len(texts), "cache_header": seen, "expected": expect,
           "p50_ms": round(statistics.median(lat) * 1e3, 3), "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1e3, 3),
           "gateway_cpu_ms_per_request": round(cpu / len(texts) * 1e3, 3)}
    print(f"{name:<22} p50 {row['p50_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms  "
          f"CPU {row['gateway_cpu_ms_per_request']:>6.2f} ms/req  {seen}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--out", default=str(RESULTS_DIR / "cache.json"))
    args = ap.parse_args(argv)
    n = args.requests
    server_cores, driver_cores = split_cores()
    pin_self(driver_cores)
    upstream = start_fake_upstream(driver_cores)
    rows = []
    try:
        v1 = upstream.meta["v1"]
        plain = start_concilium(POLICY.format(upstream=v1, cache=""), server_cores)
        try:
            rows.append(run_case(plain, "no cache section", [PROMPT.format(i=i) for i in range(n)], False, "-"))
        finally:
            plain.stop()
        gw = start_concilium(POLICY.format(upstream=v1, cache="cache: {max_entries: 100000, semantic: {}}"),
                             server_cores)
        try:
            rows.append(run_case(gw, "miss", [PROMPT.format(i=i) for i in range(n)], False, "miss",
                                 warm=[PROMPT.format(i=n + i) for i in range(20)]))
            stored = [PROMPT.format(i=i) for i in range(n)]
            rows.append(run_case(gw, "exact hit", stored, False, "hit"))
            rows.append(run_case(gw, "exact hit, streamed", stored, True, "hit"))
            rows.append(run_case(gw, "semantic hit (typo)", [TYPO.format(i=i) for i in range(n)], False, "hit"))
        finally:
            gw.stop()
    finally:
        upstream.stop()
    write_json(Path(args.out), {"benchmark": "cache", "git_commit": git_commit(), "machine": machine_info(),
                                "versions": versions(["uvicorn", "numpy"]), "cores": {
                                    "gateway": sorted(server_cores or []), "driver": sorted(driver_cores or [])},
                                "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
