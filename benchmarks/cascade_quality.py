"""Cascade quality on RouteLLM GSM8K: read Mixtral's draft answer, escalate to GPT-4 when it looks wrong.

The offline replay of `concilium eval replay` on the shared RouteLLM file (1,319 GSM8K prompts with
both models' recorded answers; RouteLLM's contaminated prompts dropped), 5-fold x 3 seeds: every
trained scorer is fitted on four folds and scores the fifth. For both gradings — RouteLLM's (the
last digits of the answer, the file's own True/False) and numeric (the final answer's value
against GSM8K's reference) — it reports APGR, CPT(50%), CPT(80%) and cost-aware APGR for: random,
the prompt-only router (the router's pipeline refitted per fold), the untrained rules, the trained
verifier (the shipped configuration, two smaller feature sets and one with the static embeddings of prompt and answer), the verifier combined with the
prompt router's P(strong good), a perfect verifier and the oracle; the escalation threshold table
for the verifier; the verifier row again through the real gateway (a gateway per fold with a
`strategy: cascade` policy against the replay upstream, prompts sent with the openai SDK); and the
latency of each scorer on the recorded answers (p50/p99, one thread).

Prices (USD per million tokens, from litellm's bundled price map 1.106.2): gpt-4-1106-preview
10 in / 30 out; Mixtral-8x7B-Instruct (together_ai) 0.6 / 0.6. Tokens: characters / 4.

Run: .venv/bin/python benchmarks/cascade_quality.py [--data ../shared/data] [--seeds 0,1,2] [--quick]
Prints tables; writes benchmarks/results/cascade_quality.json and cascade_quality.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, git_commit, machine_info, versions, write_json  # noqa: E402

from concilium.router import converters as conv  # noqa: E402
from concilium.router.cascade import AgreementScorer, ChecksScorer, LogprobScorer, RulesVerifier  # noqa: E402
from concilium.router.cascade.base import Draft  # noqa: E402
from concilium.router.cascade.evaluate import cascade_data, kfold, threshold_table  # noqa: E402
from concilium.router.cascade.replay import format_rows, plot_curves, through_gateway_row  # noqa: E402
from concilium.router.cascade.verifier import VerifierConfig, load_verifier  # noqa: E402
from concilium.router.features import lexical_matrix  # noqa: E402
from concilium.router.train import load_embedder  # noqa: E402

PRICES = {conv.ROUTELLM_WEAK: (0.6, 0.6), conv.ROUTELLM_STRONG: (10.0, 30.0)}
TARGETS = {"apgr": 0.88, "cpt80": 0.27, "cost_apgr": 0.85, "scorer_p50_ms": 1.0}
ABLATIONS = {
    "verifier: answer features only": VerifierConfig(blocks=("answer",), hash_dim=0),
    "verifier: no hashed n-grams": VerifierConfig(blocks=("answer", "prompt_lexical", "answer_lexical"), hash_dim=0),
    "verifier: + static embeddings": VerifierConfig(
        blocks=("answer", "prompt_lexical", "answer_lexical", "hashed", "embedding")),
}
GRADING_NAMES = {"scores": "routellm (the file's True/False: last digits)", "numeric": "numeric (final answer value)"}


def latency(fn, items, repeat: int) -> dict[str, float]:
    for it in items[:50]:
        fn(*it)
    times = []
    for i in range(repeat):
        it = items[i % len(items)]
        t0 = time.perf_counter()
        fn(*it)
        times.append((time.perf_counter() - t0) * 1e3)
    a = np.array(times)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "calls": repeat}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one seed, no ablations, fewer timing calls")
    ap.add_argument("--no-gateway", action="store_true", help="skip the run through the real gateway")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    data_dir = Path(args.data)
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    records = conv.convert("routellm-gsm8k", data_dir / "routing/routellm/gsm8k_responses.csv",
                           reference=data_dir / "prompts/gsm8k/test.jsonl")
    embedder = load_embedder(None)
    cfg = VerifierConfig()
    out: dict = {"benchmark": "cascade_quality", "commit": git_commit(), "machine": machine_info(),
                 "versions": versions(["numpy", "scikit-learn", "safetensors", "tokenizers"]),
                 "load_average_start": os.getloadavg(), "data": "RouteLLM gsm8k_responses.csv (Apache-2.0), "
                 "contaminated prompts dropped; GSM8K test.jsonl (MIT) for numeric grading",
                 "draft": conv.ROUTELLM_WEAK, "strong": conv.ROUTELLM_STRONG, "prices_per_m_tokens": PRICES,
                 "folds": args.folds, "seeds": seeds, "verifier_config": cfg.__dict__ | {"blocks": list(cfg.blocks)},
                 "targets": TARGETS, "gradings": {}}
    results, datas = {}, {}
    t_start = time.time()
    for grading in ("scores", "numeric"):
        data = cascade_data(records, conv.ROUTELLM_WEAK, conv.ROUTELLM_STRONG, grading, PRICES)
        prompt_x = np.hstack([embedder.encode_batch(data.prompts), lexical_matrix(data.prompts)])
        t0 = time.time()
        res = kfold(data, cfg, embedder, args.folds, seeds, prompt_features=prompt_x)
        summary = res.summary()
        if not args.quick:
            for name, acfg in ABLATIONS.items():
                ab = kfold(data, acfg, embedder, args.folds, seeds, prompt_features=prompt_x).summary()
                summary[name] = ab["verifier"]
                summary[name.replace("verifier:", "verifier + router:")] = ab["verifier + router"]
        results[grading], datas[grading] = res, data
        print(f"\n== grading: {GRADING_NAMES[grading]}; {res.n} prompts; Mixtral {data.weak.mean():.3f}, "
              f"GPT-4 {data.strong_q.mean():.3f}; {args.folds}-fold x {len(seeds)} seeds ({time.time() - t0:.0f} s)")
        print(format_rows(summary))
        accept = -res.oof["verifier"]
        table = threshold_table(accept, data, (0.1, 0.2, 0.27, 0.3, 0.4, 0.5))
        print("verifier thresholds (out-of-fold, seed 0):")
        for row in table:
            print(f"  escalate {row['escalated']:5.1%} at P(good) < {row['threshold']:.3f}: quality {row['quality']:.3f}, "
                  f"${row['cost_per_prompt']:.2e} per prompt")
        if not args.no_gateway:
            t1 = time.time()
            try:
                tg = through_gateway_row(data, args.folds, seeds[0], -res.oof["verifier"])
            except (RuntimeError, TimeoutError, OSError) as e:  # a gateway that does not start is a result too
                out.setdefault("through_gateway_errors", {})[grading] = str(e)[-2000:]
                print(f"through the gateway: failed ({str(e)[:300]})")
                tg = None
        if not args.no_gateway and tg is not None:
            summary[f"verifier, through the gateway (seed {seeds[0]})"] = tg
            print(f"through the gateway (seed {seeds[0]}, {tg['requests']} requests, {tg['failed']} failed, "
                  f"{time.time() - t1:.0f} s): APGR {tg['apgr']:.3f}, CPT(80%) {tg['cpt80']:.1%}, cost-aware "
                  f"{tg['cost_apgr']:.3f}; max |gateway score - offline score| {tg['max_abs_diff_vs_offline']:.2e}; "
                  f"whole cascade per request p50 {tg['latency_p50_ms']:.1f} ms, p99 {tg['latency_p99_ms']:.1f} ms")
        best = summary["verifier + router"]
        out["gradings"][grading] = {
            "grading": GRADING_NAMES[grading], "n": res.n, "quality_weak": float(data.weak.mean()),
            "quality_strong": float(data.strong_q.mean()),
            "cost_weak_per_prompt": float(data.cost_weak.mean()), "cost_strong_per_prompt": float(data.cost_strong.mean()),
            "rows": summary, "thresholds": table,
            "targets_met": {"apgr": best["apgr"] >= TARGETS["apgr"], "cpt80": best["cpt80"] <= TARGETS["cpt80"],
                            "cost_apgr": best.get("cost_apgr", 0) >= TARGETS["cost_apgr"]},
        }
    out["eval_seconds"] = round(time.time() - t_start, 1)

    # Scorer latency on the recorded drafts (single thread, after warm-up).
    data = datas["scores"]
    items = list(zip(data.prompts, data.answers, strict=True))
    n = 500 if args.quick else 3000
    shipped = load_verifier()
    rules, checks = RulesVerifier(), ChecksScorer()
    lp = LogprobScorer()
    comp = {"choices": [{"message": {"content": "x"}, "logprobs": {"content": [
        {"token": f"t{i}", "logprob": -0.01 * (i % 7)} for i in range(200)]}}]}
    agree = AgreementScorer("number")
    speed = {
        "verifier (shipped)": latency(lambda p, a: shipped.probability(p, a), items, n),
        "verifier-rules": latency(lambda p, a: rules.score(p, a), items, n),
        "checks (no format asked: python blocks only)": latency(lambda p, a: checks.score(p, a), items, n),
        "logprobs (200 tokens)": latency(lambda p, a: lp.score_draft(Draft(p, a, completion=comp)), items, n),
        "agreement (3 answers)": latency(lambda p, a: agree.score(p, a, samples=[a, a]), items, n),
    }
    out["scorer_latency"] = speed
    out["load_average_end"] = os.getloadavg()
    print("\nscorer latency per draft (ms):")
    for k, v in speed.items():
        print(f"  {k:<46} p50 {v['p50_ms']:.3f}  p99 {v['p99_ms']:.3f}")
    out["through_gateway"] = ("per grading, the row 'verifier, through the gateway': one gateway per fold "
                              "(`concilium serve`, strategy: cascade, the fold's verifier, threshold 1.0 so every "
                              "draft is scored and escalated) against the replay upstream; scores read from "
                              "x-concilium-explain; latency = the whole cascade request (draft + score + strong "
                              "answer from the replay upstream) as the openai SDK client saw it")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    png = plot_curves(results, datas, RESULTS_DIR / "cascade_quality.png")
    write_json(RESULTS_DIR / "cascade_quality.json", out)
    print(f"\nwrote {RESULTS_DIR / 'cascade_quality.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
