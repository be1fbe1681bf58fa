"""The online router under bandit feedback and a shift: LLMRouter's dcrouter outcomes (9 open models,
a 0-1 score each per prompt) replayed as a stream where only the chosen model's score is revealed.

    .venv/bin/python benchmarks/online_router.py [--events 4000] [--seed 0] [--repeats 5]
                                                [--out benchmarks/results/online_router.json]

The shift (fixed before any run, never tuned on the stream):

- starting artifact: trained on a seeded 40% of the dcrouter *train* prompts whose task is not
  math (no math / gsm8k / agentverse-mgsm prompt at all), on 8 of the 9 models: `NEW_MODEL`
  (llama-3.1-nemotron-51b-instruct, the best model on average) is held out entirely. In the
  stream's policy it exists with its llm_candidates.json price and no tier, so its predicted
  quality is the tier prior guessed from its price (`priors.py`);
- stream: the other 60% of the non-math train prompts, every math-category train prompt and the
  500 test prompts, shuffled with `--seed`; the first `--events` of them (repeated, reshuffled,
  if `--events` is larger than that pool; the output says when).

Routers, all over the same 9 candidates and the same stream:

- static: the starting artifact, argmax of its predicted quality (no cost term), never updated;
- online: `online.Learner` (the policy's learning defaults, `policy.learning.Learning()`: ridge 4,
  bonus 0.1, ridge_unknown 1 for the model the artifact never saw, as the gateway does) on top of the
  starting artifact's predictions, argmax of `learner.adjusted(q, x)`, with `online.explore` at
  the default share 0.05; after each event only the chosen model's recorded score is revealed and
  added (`learner.add`);
- offline: an artifact trained on *all labels* (every model's score) of the stream's first half,
  argmax of predicted quality; it is only scored on the second half (its training prompts are the
  first half), and every comparison with it uses the second half only;
- random: uniform over the 9 models (its expected reward: the mean score over the models);
- oracle: the best recorded score per prompt;
- shipped default artifact, for reference only: it was trained on dcrouter train + test, i.e. on
  every stream prompt with full labels, so it is leaked and no target uses it.

Targets (from the issue): online >= 95% of the offline router's reward over the events after the
first `events // 2` feedback events (2,000 by default); in no 500-event window (sliding, every
start) online more than 1 point (x100) below static; the new model's cumulative share of the
online router's choices reaches its fair share within 300 events, where its fair share is its
oracle share (the share of prompts on which it has the best score, ties split evenly among the
tied models) over the stream. Also reported: 1/N as the alternative fair share.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS_DIR, ROOT, git_commit, machine_info, versions, write_json

from concilium.core.plan import Prediction
from concilium.policy.learning import Learning
from concilium.policy.loader import parse_policy
from concilium.router import online
from concilium.router.artifact import DIFFICULTY_VALUES
from concilium.router.converters import convert, llmrouter_aliases, llmrouter_prices
from concilium.router.learned import load_dispatcher
from concilium.router.outcomes import Outcome
from concilium.router.priors import prior_quality
from concilium.router.train import featurise, load_embedder, train

DATA = ROOT.parent / "shared" / "data" / "routing" / "llmrouter"
NEW_MODEL = "llama-3.1-nemotron-51b-instruct"
HELD_OUT_CATEGORY = "math"  # the starting artifact never sees a prompt of this category
ARTIFACT_SHARE = 0.4  # of the non-math train prompts, for the starting artifact
WINDOW = 500
FAIR_SHARE_WITHIN = 300


def policy_text(models: list[str], artifact: str | None) -> str:
    prices = llmrouter_prices(DATA / "llm_candidates.json")
    ids = llmrouter_aliases(DATA / "llm_candidates.json")
    lines = ["version: 1", "models:"]
    for m in models:
        pin, pout = prices[m]
        lines.append(f'  {m}: {{provider: openai, base_url: "http://127.0.0.1:9/v1", model: "{ids[m]}", '
                     f"price: {{input: {pin}, output: {pout}}}}}")
    lines += ["routes:", "  - name: main", f"    targets: [{', '.join(models)}]", "router:",
              f"  artifact: {artifact}" if artifact else "  artifact: null"]
    return "\n".join(lines) + "\n"


def predictions(dispatcher, policy, feats: np.ndarray, models: list[str]) -> tuple[np.ndarray, list[list[float]], list[str]]:
    """Predicted quality (events x models), the context vectors and which models got a prior,
    for the whole stream at once (the batch path; checked against `predict` on a few prompts)."""
    qual, cat, dif = dispatcher.predictor.forward_batch(feats)
    cats = dispatcher.artifact.categories
    dval = dif @ np.asarray(DIFFICULTY_VALUES)
    mapping = dispatcher.model_map(policy)
    q = np.zeros((len(feats), len(models)))
    xs = []
    for i in range(len(feats)):
        probs = {c: round(float(p), 4) for c, p in zip(cats, cat[i], strict=True)}
        d = round(float(dval[i]), 4)
        for j, m in enumerate(models):
            idx = mapping[m]
            q[i, j] = round(float(qual[i, idx]), 4) if idx is not None else round(
                prior_quality(policy.models[m], probs, d), 4)
        xs.append(online.context(Prediction(category_probs=probs, difficulty=d)))
    return q, xs, [m for m in models if mapping[m] is None]


def check_batch(dispatcher, policy, prompts: list[str], q: np.ndarray, xs: list, models: list[str]) -> None:
    for i in range(min(5, len(prompts))):
        p = dispatcher.predict({"messages": [{"role": "user", "content": prompts[i]}]}, policy)
        got = np.array([p.quality[m] for m in models])
        if np.abs(got - q[i]).max() > 2e-3 or np.abs(np.array(online.context(p)) - np.array(xs[i])).max() > 2e-3:
            raise SystemExit(f"batch predictions differ from Dispatcher.predict on event {i}")


def run_online(q: np.ndarray, xs: list, scores: np.ndarray, models: list[str], seed: int,
               explore: float, cfg: Learning, unknown: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    rng = random.Random(seed)
    learner = online.Learner(ridge=cfg.ridge, bonus=cfg.bonus, ridge_unknown=cfg.ridge_unknown)
    unknown_set = set(unknown)  # models with only a tier prior: what the gateway passes from Dispatcher.model_map
    picks = np.zeros(len(q), dtype=int)
    explored = 0
    for i in range(len(q)):
        qd = dict(zip(models, q[i].tolist(), strict=True))
        adj = learner.adjusted(qd, xs[i], unknown=unknown_set)
        greedy = max(models, key=lambda m: adj[m])  # first of the best on ties (policy order)
        choice, _prop, was_random = online.explore(models, greedy, explore, rng)
        explored += was_random
        j = models.index(choice)
        picks[i] = j
        learner.add(choice, xs[i], float(scores[i, j]), float(q[i, j]))  # only this score is revealed
    return picks, scores[np.arange(len(q)), picks], explored


def first_reach(picks: np.ndarray, j: int, share: float) -> int | None:
    cum = np.cumsum(picks == j) / np.arange(1, len(picks) + 1)
    hit = np.nonzero(cum >= share)[0]
    return int(hit[0]) + 1 if len(hit) else None


def window_diffs(a: np.ndarray, b: np.ndarray, w: int) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(a - b)])
    return (c[w:] - c[:-w]) / w * 100 if len(a) >= w else np.array([])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="online runs with exploration seeds seed..seed+k-1")
    ap.add_argument("--explore", type=float, default=0.05)
    ap.add_argument("--out", default=str(RESULTS_DIR / "online_router.json"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    rng = random.Random(args.seed)

    train_recs = convert("llmrouter", DATA / "dcrouter_train.json")
    test_recs = convert("llmrouter", DATA / "dcrouter_test.json")
    models = sorted(train_recs[0].scores)
    nonmath = [r for r in train_recs if r.category != HELD_OUT_CATEGORY]
    math_train = [r for r in train_recs if r.category == HELD_OUT_CATEGORY]
    rng.shuffle(nonmath)
    n_art = int(len(nonmath) * ARTIFACT_SHARE)
    art_recs = [Outcome(prompt=r.prompt, scores={m: s for m, s in r.scores.items() if m != NEW_MODEL},
                        id=r.id, category=r.category, source=r.source) for r in nonmath[:n_art]]
    pool = nonmath[n_art:] + math_train + test_recs
    order: list[Outcome] = []
    repeated = 0
    while len(order) < args.events:
        block = list(pool)
        rng.shuffle(block)
        repeated += bool(order)
        order.extend(block[: args.events - len(order)])
    stream = order
    n = len(stream)
    half = n // 2
    scores = np.array([[r.scores[m] for m in models] for r in stream])
    new_j = models.index(NEW_MODEL)
    print(f"models: {len(models)}; new (unseen by the starting artifact): {NEW_MODEL}")
    print(f"starting artifact: {len(art_recs)} non-{HELD_OUT_CATEGORY} train prompts, 8 models; "
          f"stream: {n} events from a pool of {len(pool)}" + (f" (pool repeated {repeated}x)" if repeated else ""))

    def mix(recs: list[Outcome]) -> dict[str, float]:
        cats: dict[str, int] = {}
        for r in recs:
            cats[r.category or "none"] = cats.get(r.category or "none", 0) + 1
        return {c: round(k / len(recs), 3) for c, k in sorted(cats.items())}

    print(f"category mix, artifact: {mix(art_recs)}\ncategory mix, stream:   {mix(stream)}")

    embedder = load_embedder(None)
    t0 = time.perf_counter()
    feats_stream = featurise([r for r in stream], embedder)
    feats_art = featurise(art_recs, embedder)
    t_feat = time.perf_counter() - t0
    timings = {"features_s": round(t_feat, 1)}
    print(f"features: {t_feat:.1f} s")

    with tempfile.TemporaryDirectory(prefix="concilium-online-bench-") as tmp:
        t0 = time.perf_counter()
        art, _ = train(art_recs, embedder, features=feats_art)
        art.save(Path(tmp) / "start")
        timings["train_start_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        off, _ = train(stream[:half], embedder, features=feats_stream[:half])
        off.save(Path(tmp) / "offline")
        timings["train_offline_s"] = round(time.perf_counter() - t0, 1)
        print(f"training: starting artifact {timings['train_start_s']} s, offline router {timings['train_offline_s']} s")

        preds = {}
        for name, path in (("static", Path(tmp) / "start"), ("offline", Path(tmp) / "offline"), ("shipped", None)):
            pol = parse_policy(policy_text(models, str(path) if path else None), f"{name}.yaml")
            disp = load_dispatcher(pol.router, pol)
            if disp is None:
                raise SystemExit(f"could not load the {name} artifact")
            q, xs, priors = predictions(disp, pol, feats_stream, models)
            check_batch(disp, pol, [r.prompt for r in stream], q, xs, models)
            preds[name] = (q, xs, priors)
    if preds["static"][2] != [NEW_MODEL]:
        raise SystemExit(f"expected only {NEW_MODEL} to get a prior, got {preds['static'][2]}")

    idx = np.arange(n)
    oracle = scores.max(axis=1)
    rand = scores.mean(axis=1)
    picks = {k: preds[k][0].argmax(axis=1) for k in ("static", "offline", "shipped")}
    reward = {k: scores[idx, p] for k, p in picks.items()}
    reward["oracle"], reward["random"] = oracle, rand

    q0, xs0, unknown = preds["static"]
    cfg = Learning()  # the policy's defaults
    t0 = time.perf_counter()
    runs = []
    for k in range(args.repeats):
        p, r, explored = run_online(q0, xs0, scores, models, args.seed + k, args.explore, cfg, unknown)
        runs.append({"seed": args.seed + k, "picks": p, "reward": r, "explored": explored})
    timings["online_s_per_run"] = round((time.perf_counter() - t0) / max(args.repeats, 1), 2)
    main_run = runs[0]
    picks["online"], reward["online"] = main_run["picks"], main_run["reward"]

    # Fair share of the new model: its oracle share (ties split evenly) over the stream.
    best = scores == oracle[:, None]
    oracle_share = float((best[:, new_j] / best.sum(axis=1)).mean())
    uniform_share = 1 / len(models)

    def summary(r: np.ndarray, name: str) -> dict:
        row = {"router": name, "cumulative_reward": round(float(r.sum()), 2), "mean_reward": round(float(r.mean()), 4),
               "mean_reward_second_half": round(float(r[half:].mean()), 4),
               "mean_reward_last_500": round(float(r[-WINDOW:].mean()), 4),
               "regret_vs_oracle": round(float((oracle - r).sum()), 2),
               "regret_vs_oracle_second_half": round(float((oracle[half:] - r[half:]).sum()), 2)}
        if name == "offline":  # trained on the first half: only the second half counts
            for key in ("cumulative_reward", "mean_reward", "regret_vs_oracle"):
                row[key] = None
        if name in picks:
            row["new_model_share"] = round(float((picks[name] == new_j).mean()), 4)
            row["new_model_share_second_half"] = round(float((picks[name][half:] == new_j).mean()), 4)
        return row

    names = ["oracle", "offline", "online", "static", "random", "shipped"]
    rows = [summary(reward[k], k) for k in names]

    def targets_for(run: dict) -> dict:
        r, p = run["reward"], run["picks"]
        ratio = float(r[half:].sum() / reward["offline"][half:].sum())
        wd = window_diffs(r, reward["static"], WINDOW)
        worst = float(wd.min()) if len(wd) else float("nan")
        reach = first_reach(p, new_j, oracle_share)
        reach_uniform = first_reach(p, new_j, uniform_share)
        return {
            "seed": run["seed"], "explored": run["explored"],
            "online_over_offline_after_half": round(ratio, 4),
            "worst_window_online_minus_static_points": round(worst, 2),
            "worst_window_start": int(wd.argmin()) if len(wd) else None,
            "new_model_reaches_oracle_share_at_event": reach,
            "new_model_reaches_uniform_share_at_event": reach_uniform,
            "met": {"reward_ratio_ge_0.95": ratio >= 0.95, "window_ge_minus_1_point": worst >= -1.0,
                    "fair_share_within_300": reach is not None and reach <= FAIR_SHARE_WITHIN},
        }

    per_run = [targets_for(run) for run in runs]
    t_main = per_run[0]

    # New model's share of the online router's choices over time (cumulative, and per 250 events).
    p = main_run["picks"]
    marks = [m for m in (50, 100, 200, 300, 500, 1000, 2000, 3000, 4000) if m <= n] + ([n] if n not in (50, 100, 200, 300, 500, 1000, 2000, 3000, 4000) else [])
    cum_share = {str(m): round(float((p[:m] == new_j).mean()), 4) for m in marks}
    block_share = [round(float((p[i:i + 250] == new_j).mean()), 4) for i in range(0, n, 250)]
    static_windows = window_diffs(reward["online"], reward["static"], WINDOW)
    blocks = [{"events": f"{i}-{min(i + WINDOW, n)}",
               **{k: round(float(reward[k][i:i + WINDOW].mean()), 4) for k in ("oracle", "online", "static", "random")},
               "offline": round(float(reward["offline"][i:i + WINDOW].mean()), 4) if i >= half else None}
              for i in range(0, n, WINDOW)]

    # ---- print
    print()
    print(f"{'router':<10} {'cum reward':>10} {'mean':>7} {'mean 2nd half':>13} {'last 500':>9} "
          f"{'regret':>8} {'regret 2nd':>10} {'new share':>9}")
    for row in rows:
        def f(v, w, fmt):
            return f"{'-':>{w}}" if v is None else f"{v:>{w}{fmt}}"
        print(f"{row['router']:<10} {f(row['cumulative_reward'], 10, '.1f')} {f(row['mean_reward'], 7, '.4f')} "
              f"{row['mean_reward_second_half']:>13.4f} {row['mean_reward_last_500']:>9.4f} "
              f"{f(row['regret_vs_oracle'], 8, '.1f')} {row['regret_vs_oracle_second_half']:>10.1f} "
              f"{f(row.get('new_model_share'), 9, '.3f')}")
    print("(offline: trained on the first half's full labels, scored on the second half only; "
          "random: expected reward; shipped: leaked, reference only)")
    print("\nper 500 events (mean reward):")
    for b in blocks:
        off_s = f"{b['offline']:.4f}" if b["offline"] is not None else "  -   "
        print(f"  {b['events']:>10}  oracle {b['oracle']:.4f}  offline {off_s}  online {b['online']:.4f}  "
              f"static {b['static']:.4f}  random {b['random']:.4f}")
    print(f"\nnew model {NEW_MODEL}: fair share = oracle share {oracle_share:.3f} (1/N = {uniform_share:.3f})")
    print(f"  online cumulative share at events {cum_share}")
    print(f"  online share per 250 events: {block_share}")
    print(f"  static's share {float((picks['static'] == new_j).mean()):.3f}, offline's (2nd half) "
          f"{float((picks['offline'][half:] == new_j).mean()):.3f}")

    def mm(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"\ntargets (exploration seed {t_main['seed']}; explored {t_main['explored']} of {n} events):")
    print(f"  online/offline reward over events {half}..{n}: {t_main['online_over_offline_after_half']:.4f} "
          f"(target >= 0.95): {mm(t_main['met']['reward_ratio_ge_0.95'])}")
    print(f"  worst {WINDOW}-event window online - static: {t_main['worst_window_online_minus_static_points']:+.2f} points "
          f"(from event {t_main['worst_window_start']}; target >= -1): {mm(t_main['met']['window_ge_minus_1_point'])}")
    reach = t_main["new_model_reaches_oracle_share_at_event"]
    print(f"  new model reaches its fair share (cumulative share >= {oracle_share:.3f}) at event {reach} "
          f"(target <= {FAIR_SHARE_WITHIN}): {mm(t_main['met']['fair_share_within_300'])}; "
          f"1/N reached at event {t_main['new_model_reaches_uniform_share_at_event']}")
    if len(per_run) > 1:
        print(f"\nacross {len(per_run)} exploration seeds:")
        for t in per_run:
            print(f"  seed {t['seed']}: ratio {t['online_over_offline_after_half']:.4f}  worst window "
                  f"{t['worst_window_online_minus_static_points']:+.2f}  fair share at {t['new_model_reaches_oracle_share_at_event']}"
                  f"  1/N at {t['new_model_reaches_uniform_share_at_event']}")
        for key in per_run[0]["met"]:
            print(f"  {key}: met in {sum(t['met'][key] for t in per_run)}/{len(per_run)}")
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")

    write_json(Path(args.out), {
        "benchmark": "online_router", "git_commit": git_commit(), "machine": machine_info(),
        "versions": versions(["numpy", "scikit-learn"]),
        "settings": {"events": n, "seed": args.seed, "repeats": args.repeats, "explore": args.explore,
                     "ridge": Learning().ridge, "bonus": Learning().bonus,
                     "ridge_unknown": Learning().ridge_unknown, "new_model": NEW_MODEL, "held_out_category": HELD_OUT_CATEGORY,
                     "artifact_share_of_nonmath_train": ARTIFACT_SHARE, "artifact_prompts": len(art_recs),
                     "stream_pool": len(pool), "pool_repeated": repeated, "half": half, "window": WINDOW,
                     "static_choice": "argmax predicted quality (no cost term)",
                     "fair_share": "oracle share of the new model over the stream, ties split evenly",
                     "category_mix": {"artifact": mix(art_recs), "stream": mix(stream)}},
        "timings_s": {**timings, "total_s": round(total, 1)},
        "rows": rows, "per_500_events": blocks,
        "new_model": {"name": NEW_MODEL, "fair_share_oracle": round(oracle_share, 4), "fair_share_uniform": round(uniform_share, 4),
                      "online_cumulative_share": cum_share, "online_share_per_250": block_share},
        "targets": t_main, "targets_per_seed": per_run,
        "worst_window_main_seed_points": round(float(static_windows.min()), 2) if len(static_windows) else None,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
