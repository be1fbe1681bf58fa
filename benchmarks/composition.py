"""What composing costs: the gateway overhead of `strategy: fusion` and `strategy: chain` requests, and
a harness that judges composed answers against `single`'s.

Overhead (the default mode): one client, sequential requests, against the fake upstream, where every
upstream model waits the same fixed first-byte delay D (`--delay-s`). Four cases, side by side:
`single` (the synthesiser alone), `fusion-3` (panel a, b, c concurrently, then the synthesiser),
`fusion-3 stream` (the same, `stream: true`, the whole SSE body read) and `chain-2` (`planner: rules`
on a prompt of two numbered parts: two specialist steps concurrently, then the synthesiser). Each
policy gets its own gateway (one core); the upstream and the client share the other cores. Per case:
p50/p99 latency, added latency = p50 - ideal (ideal = D x sequential stages: 1 for single, 2 for the
compositions), gateway CPU per request (its whole process tree, from /proc), upstream calls per
request (the upstream's own count), CPU per upstream call, the CPU ratio to single and the added CPU
(case - single), checked against the issue's goal of <= 2 ms per composed request. Nothing is
asserted: it measures and reports.

    .venv/bin/python benchmarks/composition.py [--requests 200] [--delay-s 0.05] \
        [--out benchmarks/results/composition.json]

Quality (`--quality`): questions (the first turn of MT-Bench, or Arena-Hard v2's prompts) go through
one gateway to four routes, chosen by the request's `metadata.strategy`: `single`, `fusion` (a panel
of the configured models), `self-moa` (one model, `samples: 3`) and `chain` (rules planner). A judge
model (pinned by name through the same gateway, temperature 0) compares each composed answer with
`single`'s answer to the same question, in an order drawn at random per pair (position bias), and
answers A, B or tie; anything else counts as `invalid`. Printed: win/tie/loss/invalid rates per
strategy, and its cost and completion tokens as the gateway counted them (`/metrics`:
`concilium_cost_usd_total` and `concilium_tokens_total` by route, every step and the synthesis).

    .venv/bin/python benchmarks/composition.py --quality [--policy FILE --judge MODEL] \
        [--dataset mt_bench|arena_hard_v2] [--questions 5] [--max-tokens 64] [--seed 0] \
        [--out benchmarks/results/composition_quality.json]

`--policy FILE`: your models (any OpenAI-compatible ones), with four routes named `single`, `fusion`,
`self-moa` and `chain`, each with `match: {metadata: {strategy: <its name>}}` (the shape of the
policy this script generates, written to the log folder at each run); `--judge` names a model of that
policy. Without `--policy`, every role (panel, sampler, specialists, synthesiser and judge) is the
local SmolLM2-135M (`provider: local`, `smollm2-135m-instruct`); its fusion panel is that one model
three times. A 135M judge measures nothing: such a run only shows that the harness works end to end,
and its output and JSON say so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import statistics
import time
import urllib.request
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

# ---------------------------------------------------------------- overhead

POLICY = """
version: 1
models:
  a: {{provider: openai, base_url: "{upstream}", model: a-up, price: {{input: 1, output: 2}}}}
  b: {{provider: openai, base_url: "{upstream}", model: b-up, price: {{input: 1, output: 2}}}}
  c: {{provider: openai, base_url: "{upstream}", model: c-up, price: {{input: 1, output: 2}}}}
  synth: {{provider: openai, base_url: "{upstream}", model: synth-up, price: {{input: 1, output: 2}}}}
router: {{virtual_models: [concilium/auto], learned: false}}
routes:
  - name: composed
    targets: [synth]
    rank: false
{strategy}
"""
STRATEGIES = {
    "single": "",
    "fusion": "    strategy: fusion\n    fusion: {panel: [a, b, c]}",
    "chain": "    strategy: chain\n    chain: {planner: rules, specialists: {default: a}}",
}
# (case, policy, streamed, sequential upstream stages, expected x-concilium-strategy)
CASES = [("single", "single", False, 1, "-"),  # a single route sends no x-concilium-strategy
         ("fusion-3", "fusion", False, 2, "fusion"),
         ("fusion-3 stream", "fusion", True, 2, "fusion"), ("chain-2", "chain", False, 2, "chain")]
PROMPT = ("Answer both parts in one sentence each.\n1. Which river flows through the city of Vienna?\n"
          "2. Which sea does that river reach?")
GOAL_MS = 2.0


def _upstream_requests(upstream) -> int:
    with urllib.request.urlopen(upstream.base_url + "/_control/stats", timeout=10) as r:
        return int(json.loads(r.read())["requests"])


def _set_delay(upstream, delay_s: float) -> None:
    for m in ("a-up", "b-up", "c-up", "synth-up"):
        req = urllib.request.Request(upstream.base_url + "/_control/default", method="POST",
                                     data=json.dumps({"model": m, "fault": {"delay_s": delay_s}}).encode(),
                                     headers={"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()


def _post(conn: http.client.HTTPConnection, stream: bool) -> str:
    body = json.dumps({"model": "concilium/auto", "messages": [{"role": "user", "content": PROMPT}],
                       "temperature": 0, "max_tokens": 16, "stream": stream})
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json",
                                                        "authorization": "Bearer x"})
    r = conn.getresponse()
    raw = r.read()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {raw[:300]!r}")
    if stream and not raw.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"stream did not end with [DONE]: {raw[-300:]!r}")
    if not stream and b'"choices"' not in raw:
        raise RuntimeError(f"no choices in the answer: {raw[:300]!r}")
    return r.getheader("x-concilium-strategy") or "-"


def run_case(gw, upstream, name: str, stream: bool, stages: int, expect: str, n: int, delay_s: float) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    for _ in range(20):  # warm-up
        _post(conn, stream)
    lat, seen = [], {}
    up0 = _upstream_requests(upstream)
    cpu0 = tree_cpu_seconds(gw.proc.pid)
    for _ in range(n):
        t0 = time.perf_counter()
        state = _post(conn, stream)
        lat.append(time.perf_counter() - t0)
        seen[state] = seen.get(state, 0) + 1
    cpu = tree_cpu_seconds(gw.proc.pid) - cpu0
    calls = _upstream_requests(upstream) - up0
    conn.close()
    lat.sort()
    ideal = delay_s * stages
    p50 = statistics.median(lat)
    cpu_ms = cpu / n * 1e3
    return {"case": name, "requests": n, "stream": stream, "strategy_header": seen, "expected": expect,
            "sequential_stages": stages, "ideal_ms": round(ideal * 1e3, 3),
            "p50_ms": round(p50 * 1e3, 3), "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1e3, 3),
            "added_latency_p50_ms": round((p50 - ideal) * 1e3, 3),
            "gateway_cpu_ms_per_request": round(cpu_ms, 3),
            "upstream_calls_per_request": round(calls / n, 3),
            "gateway_cpu_ms_per_upstream_call": round(cpu_ms / (calls / n), 3) if calls else None}


def overhead(args: argparse.Namespace) -> int:
    n, d = args.requests, args.delay_s
    server_cores, driver_cores = split_cores()
    pin_self(driver_cores)
    upstream = start_fake_upstream(driver_cores)
    rows = []
    try:
        _set_delay(upstream, d)
        v1 = upstream.meta["v1"]
        for policy in ("single", "fusion", "chain"):
            gw = start_concilium(POLICY.format(upstream=v1, strategy=STRATEGIES[policy]), server_cores)
            try:
                for name, pol, stream, stages, expect in CASES:
                    if pol == policy:
                        rows.append(run_case(gw, upstream, name, stream, stages, expect, n, d))
                        print(f"  measured {name}", flush=True)
            finally:
                gw.stop()
    finally:
        upstream.stop()
    base = rows[0]["gateway_cpu_ms_per_request"]
    for r in rows:
        r["cpu_ratio_to_single"] = round(r["gateway_cpu_ms_per_request"] / base, 3) if base else None
        r["added_cpu_ms_vs_single"] = round(r["gateway_cpu_ms_per_request"] - base, 3)
        r["added_cpu_under_goal"] = None if r["case"] == "single" else r["added_cpu_ms_vs_single"] <= GOAL_MS
    print(f"\nupstream delay D = {d * 1e3:g} ms per call; {n} sequential requests per case, one client; "
          f"ideal = D x sequential stages\n")
    head = (f"{'case':<16} {'p50 ms':>8} {'p99 ms':>8} {'ideal':>6} {'added':>7} {'CPU ms/req':>10} "
            f"{'calls/req':>9} {'CPU ms/call':>11} {'x single':>8} {'+CPU ms':>8}  added CPU <= {GOAL_MS:g} ms?")
    print(head)
    print("-" * len(head))
    for r in rows:
        verdict = "(baseline)" if r["added_cpu_under_goal"] is None else "yes" if r["added_cpu_under_goal"] else "NO"
        print(f"{r['case']:<16} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['ideal_ms']:>6.0f} "
              f"{r['added_latency_p50_ms']:>7.2f} {r['gateway_cpu_ms_per_request']:>10.2f} "
              f"{r['upstream_calls_per_request']:>9.2f} {r['gateway_cpu_ms_per_upstream_call'] or 0:>11.2f} "
              f"{r['cpu_ratio_to_single'] or 0:>8.2f} {r['added_cpu_ms_vs_single']:>8.2f}  {verdict}  "
              f"{r['strategy_header']}", flush=True)
    out = Path(args.out or RESULTS_DIR / "composition.json")
    write_json(out, {"benchmark": "composition", "mode": "overhead", "git_commit": git_commit(),
                     "machine": machine_info(), "versions": versions(["uvicorn", "numpy", "orjson"]),
                     "cores": {"gateway": sorted(server_cores or []), "driver": sorted(driver_cores or [])},
                     "delay_s": d, "requests_per_case": n, "goal_added_cpu_ms_per_composed_request": GOAL_MS,
                     "prompt": PROMPT, "policies": STRATEGIES, "rows": rows})
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- quality

QUALITY_STRATEGIES = ("single", "fusion", "self-moa", "chain")
LOCAL = "smollm2-135m-instruct"
LOCAL_POLICY = f"""
version: 1
models:
  smollm2:
    provider: local
    model: {LOCAL}
    context_window: 8192
    max_output_tokens: 512
    price: {{input: 0.0, output: 0.0}}
    defaults: {{temperature: 0.2, top_p: 0.5}}
router: {{virtual_models: [concilium/auto], learned: false}}
routes:
  - name: single
    match: {{metadata: {{strategy: single}}}}
    targets: [smollm2]
    rank: false
  - name: fusion
    match: {{metadata: {{strategy: fusion}}}}
    targets: [smollm2]
    rank: false
    strategy: fusion
    fusion: {{panel: [smollm2, smollm2, smollm2]}}
  - name: self-moa
    match: {{metadata: {{strategy: self-moa}}}}
    targets: [smollm2]
    rank: false
    strategy: fusion
    fusion: {{panel: [smollm2], samples: 3}}
  - name: chain
    match: {{metadata: {{strategy: chain}}}}
    targets: [smollm2]
    rank: false
    strategy: chain
    chain: {{planner: rules, specialists: {{default: smollm2}}}}
"""
TOY_NOTE = "a 135M judge measures nothing; this run shows the harness works end to end"
DATASETS = {"mt_bench": "mt_bench/question.jsonl", "arena_hard_v2": "arena_hard_v2/question.jsonl"}
JUDGE_PROMPT = (
    "You compare two answers to the same question. Decide which answer is more helpful, correct and "
    "complete.\n\n[Question]\n{question}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Which answer is better? Reply with exactly one word: A, B or tie."
)


def load_questions(data: Path, dataset: str, n: int) -> list[dict]:
    out = []
    for line in (data / DATASETS[dataset]).read_text().splitlines():
        if not line.strip():
            continue
        q = json.loads(line)
        if dataset == "mt_bench":  # first turn only
            out.append({"id": str(q["question_id"]), "category": q.get("category"), "text": q["turns"][0]})
        else:
            out.append({"id": q["uid"], "category": q.get("subcategory") or q.get("category"), "text": q["prompt"]})
        if len(out) >= n:
            break
    return out


def _chat(port: int, body: dict, headers: dict[str, str] | None = None, timeout: float = 900) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"content-type": "application/json", "authorization": "Bearer x", **(headers or {})})
        r = conn.getresponse()
        raw = r.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"raw": raw[:300].decode(errors="replace")}
        return r.status, data, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def _text(data: dict) -> str:
    try:
        return data["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        return ""


def parse_verdict(text: str) -> str:
    """'A', 'B' or 'tie' from the judge's reply (the first of them it says), else 'invalid'."""
    hits = [m for m in (re.search(r"\btie\b", text, re.IGNORECASE), re.search(r"\b[AB]\b", text)) if m]
    if not hits:
        return "invalid"
    first = min(hits, key=lambda m: m.start()).group(0)
    return "tie" if first.lower() == "tie" else first


def scrape(port: int) -> dict[str, dict[str, float]]:
    """{"cost": {route: usd}, "completion_tokens": {route: n}, "prompt_tokens": {...}} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {"cost": {}, "completion_tokens": {}, "prompt_tokens": {}}
    for line in text.splitlines():
        m = re.match(r"^(concilium_cost_usd_total|concilium_tokens_total)\{([^}]*)\} (\S+)$", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        key = "cost" if m.group(1) == "concilium_cost_usd_total" else f"{labels.get('kind')}_tokens"
        if key in out:
            route = labels.get("route", "?")
            out[key][route] = out[key].get(route, 0.0) + float(m.group(3))
    return out


def ask(port: int, question: str, strategy: str, max_tokens: int) -> dict:
    body = {"model": "concilium/auto", "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "metadata": {"strategy": strategy}}
    t0 = time.perf_counter()
    status, data, headers = _chat(port, body, {"x-concilium-explain": "true"})
    out = {"strategy": strategy, "status": status, "latency_s": round(time.perf_counter() - t0, 3),
           "route": headers.get("x-concilium-route"), "answered_as": headers.get("x-concilium-strategy"),
           "text": _text(data)}
    if status != 200:
        out["error"] = json.dumps(data)[:500]
    elif out["route"] != strategy:
        out["error"] = f"the request went to route {out['route']!r}, not {strategy!r}: check the policy's routes"
    steps = (data.get("concilium") or {}).get("steps") if isinstance(data, dict) else None
    if steps:
        out["steps"] = [{k: s.get(k) for k in ("id", "role", "model", "status", "cost_usd", "latency_s", "error")
                         if s.get(k) is not None} for s in steps]
    out["calls"] = 1 + sum(1 for s in steps or [] if s.get("role") != "synthesiser" and s.get("status") != "planned")
    return out


def judge(port: int, model: str, question: str, single: str, composed: str, rng: random.Random) -> dict:
    composed_first = rng.random() < 0.5
    a, b = (composed, single) if composed_first else (single, composed)
    body = {"model": model, "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": JUDGE_PROMPT.format(question=question, a=a, b=b)}]}
    status, data, _ = _chat(port, body)
    reply = _text(data) if status == 200 else f"HTTP {status}: {json.dumps(data)[:200]}"
    verdict = parse_verdict(reply) if status == 200 else "invalid"
    outcome = {"tie": "tie", "invalid": "invalid"}.get(verdict) or (
        "win" if (verdict == "A") == composed_first else "loss")
    return {"composed_is": "A" if composed_first else "B", "judge_reply": reply[:200], "verdict": verdict,
            "outcome": outcome}


def quality(args: argparse.Namespace) -> int:
    toy = args.policy is None
    policy_text = LOCAL_POLICY if toy else Path(args.policy).read_text()
    judge_model = args.judge or "smollm2"
    questions = load_questions(Path(args.data), args.dataset, args.questions)
    rng = random.Random(args.seed)
    if toy:
        print(f"NOTE: {TOY_NOTE}", flush=True)
    t_start = time.perf_counter()
    gw = start_concilium(policy_text, None, timeout=600)
    records = []
    try:
        for q in questions:
            answers = {s: ask(gw.port, q["text"], s, args.max_tokens) for s in QUALITY_STRATEGIES}
            base = answers["single"]
            judged = {}
            for s in QUALITY_STRATEGIES[1:]:
                if base.get("error") or not base["text"].strip():
                    judged[s] = {"outcome": "skipped", "why": "single did not answer"}
                elif answers[s].get("error") or not answers[s]["text"].strip():
                    judged[s] = {"outcome": "error", "why": answers[s].get("error") or "empty answer"}
                else:
                    judged[s] = judge(gw.port, judge_model, q["text"], base["text"], answers[s]["text"], rng)
            records.append({"question": q, "answers": answers, "judged": judged})
            print(f"  question {q['id']} ({q['category']}): " + ", ".join(
                f"{s} {judged[s]['outcome']}" for s in QUALITY_STRATEGIES[1:]) + "  latency " + ", ".join(
                f"{s} {answers[s]['latency_s']:.1f}s" for s in QUALITY_STRATEGIES), flush=True)
        metrics = scrape(gw.port)
    finally:
        gw.stop()
    wall = time.perf_counter() - t_start
    kinds = ("win", "tie", "loss", "invalid", "error", "skipped")
    rows = []
    for s in QUALITY_STRATEGIES:
        got = [r["answers"][s] for r in records]
        row = {"strategy": s, "questions": len(records), "answered": sum(1 for a in got if not a.get("error")),
               "calls_per_question": round(statistics.mean(a["calls"] for a in got), 2) if got else None,
               "p50_latency_s": round(statistics.median(a["latency_s"] for a in got), 3) if got else None,
               "cost_usd": round(metrics["cost"].get(s, 0.0), 8),
               "completion_tokens": int(metrics["completion_tokens"].get(s, 0.0)),
               "prompt_tokens": int(metrics["prompt_tokens"].get(s, 0.0))}
        if s != "single":
            outcomes = [r["judged"][s]["outcome"] for r in records]
            row.update({f"{k}_rate": round(outcomes.count(k) / len(outcomes), 3) if outcomes else None
                        for k in kinds})
        rows.append(row)
    judge_cost = sum(v for k, v in metrics["cost"].items() if k not in QUALITY_STRATEGIES)
    print(f"\n{len(records)} {args.dataset} questions (first turn), max_tokens {args.max_tokens}, judge {judge_model}, "
          f"judged against single in random order (seed {args.seed}); {wall:.0f} s in all\n")
    head = (f"{'strategy':<9} {'answered':>8} {'win':>6} {'tie':>6} {'loss':>6} {'invalid':>7} {'error':>6} "
            f"{'calls/q':>7} {'p50 s':>6} {'cost USD':>10} {'out tokens':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        rates = "".join(f" {r[k + '_rate'] * 100:>{w}.0f}%" if r.get(k + "_rate") is not None else f" {'-':>{w + 1}}"
                        for k, w in (("win", 5), ("tie", 5), ("loss", 5), ("invalid", 6), ("error", 5)))
        print(f"{r['strategy']:<9} {r['answered']:>4}/{r['questions']:<3}{rates} {r['calls_per_question']:>7.2f} "
              f"{r['p50_latency_s']:>6.1f} {r['cost_usd']:>10.6f} {r['completion_tokens']:>10}", flush=True)
    print(f"judge calls cost {judge_cost:.6f} USD (routes other than the four)")
    if toy:
        print(f"NOTE: {TOY_NOTE}")
    out = Path(args.out or RESULTS_DIR / "composition_quality.json")
    write_json(out, {"benchmark": "composition", "mode": "quality", "note": TOY_NOTE if toy else None,
                     "git_commit": git_commit(), "machine": machine_info(),
                     "versions": versions(["uvicorn", "numpy", "orjson", "llama_cpp_python"]),
                     "dataset": args.dataset, "questions": len(records), "max_tokens": args.max_tokens,
                     "judge": judge_model, "seed": args.seed, "policy": policy_text if toy else str(args.policy),
                     "wall_s": round(wall, 1), "metrics_by_route": metrics, "judge_cost_usd": judge_cost,
                     "rows": rows, "records": records})
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200, help="overhead: measured requests per case")
    ap.add_argument("--delay-s", type=float, default=0.05, help="overhead: every upstream call's first-byte delay")
    ap.add_argument("--quality", action="store_true", help="run the quality harness instead of the overhead")
    ap.add_argument("--policy", help="quality: a policy with routes single, fusion, self-moa and chain")
    ap.add_argument("--judge", help="quality: the judge, a model of the policy (default smollm2)")
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="mt_bench")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "prompts"))
    ap.add_argument("--questions", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="default: benchmarks/results/composition.json (composition_quality.json with "
                                  "--quality)")
    args = ap.parse_args(argv)
    if args.policy and not args.judge:
        ap.error("--policy needs --judge (a model of that policy)")
    return quality(args) if args.quality else overhead(args)


if __name__ == "__main__":
    raise SystemExit(main())
