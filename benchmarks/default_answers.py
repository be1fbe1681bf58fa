"""The README's first example as a new user runs it: `concilium serve` on policies/default.yaml, then
"What is the capital of France?" through the openai SDK with no sampling parameters, N times, for
the default policy's SmolLM2 `defaults` and for other top_p values (the policy copied with only
that value changed). Counts the answers that contain "Paris".

Run:  .venv/bin/python benchmarks/default_answers.py [--tries 20] [--top-p 0.9,0.5]
Writes benchmarks/results/default_answers.json.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from _common import RESULTS_DIR, ROOT, git_commit, machine_info, start_concilium, versions, write_json

QUESTION = "What is the capital of France?"


def ask(base_url: str, tries: int) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused-without-keys", max_retries=0, timeout=120)
    return [client.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": QUESTION}])
            .choices[0].message.content or "" for _ in range(tries)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=20)
    ap.add_argument("--top-p", default="0.9", help="other top_p values to try besides the policy's own")
    ap.add_argument("--out", default=str(RESULTS_DIR / "default_answers.json"))
    args = ap.parse_args(argv)
    text = (ROOT / "policies" / "default.yaml").read_text()
    own = re.search(r"defaults: \{temperature: ([0-9.]+), top_p: ([0-9.]+)\}", text)
    assert own, "policies/default.yaml: SmolLM2's defaults not found"
    variants = [("policy", text)] + [
        (f"top_p {p}", text.replace(own.group(0), f"defaults: {{temperature: {own.group(1)}, top_p: {p}}}"))
        for p in args.top_p.split(",") if p and p != own.group(2)]
    rows = []
    for name, policy in variants:
        svc = start_concilium(policy, env={"OPENAI_API_KEY": None, "ANTHROPIC_API_KEY": None}, timeout=300)
        try:
            t0 = time.time()
            answers = ask(svc.base_url, args.tries)
        finally:
            svc.stop()
        hits = sum("Paris" in a for a in answers)
        rows.append({"variant": name, "defaults": re.search(r"defaults: \{[^}]*\}", policy).group(0),
                     "tries": args.tries, "paris": hits, "seconds": round(time.time() - t0, 1),
                     "answers": answers})
        print(f"{name:<12} {hits:>3} / {args.tries} answers say Paris", flush=True)
    write_json(Path(args.out), {"benchmark": "default_answers", "git_commit": git_commit(),
                                "machine": machine_info(), "versions": versions(["openai"]),
                                "question": QUESTION, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
