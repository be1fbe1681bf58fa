"""`concilium router convert | train | eval | calibrate | build-default`.

Imports stay inside the handlers so that `concilium --help` does not load numpy or scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class TrainDefaults:
    c_quality = 0.001  # kept equal to train.TrainConfig.c_quality (checked by a test)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("router", help="train, evaluate and calibrate the learned dispatcher")
    sub = p.add_subparsers(dest="router_command", required=True)

    c = sub.add_parser("convert", help="convert a public routing data set to outcome JSONL")
    c.add_argument("source", help="outcomes: routellm-gsm8k | routellm-mmlu | routellm-mt-bench | llmrouter | routerdc; "
                   "labelled prompts: mt-bench | arena-hard | math | gsm8k | humaneval | wizardlm")
    c.add_argument("path", help="the published file or folder (see docs/router.md)")
    c.add_argument("--out", required=True, help="output JSONL file")
    c.add_argument("--keep-contaminated", action="store_true", help="keep RouteLLM's contaminated prompts")
    c.add_argument("--reference", metavar="FILE",
                   help="routellm-gsm8k: GSM8K's prompts/gsm8k/test.jsonl, to attach reference answers (numeric grading)")
    c.set_defaults(func=_convert)

    t = sub.add_parser("train", help="train a router artifact from outcome JSONL files")
    t.add_argument("--outcomes", nargs="+", default=[], metavar="FILE", help="outcome JSONL files")
    t.add_argument("--feedback", nargs="*", default=[], metavar="FILE",
                   help="feedback JSONL files (the gateway's var/feedback.jsonl, or an export of the Redis stream)")
    t.add_argument("--decisions", metavar="FILE",
                   help="routing decisions JSONL (request_id, model, prompt) to join feedback that carries no prompt")
    t.add_argument("--feedback-weight", type=float, default=1.0, help="training weight of a feedback record")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--embedder", metavar="DIR", help="take the static embedder from this artifact (default: the shipped one)")
    t.add_argument("--distill", action="store_true", help="distill a fresh static embedder (slow: minutes)")
    t.add_argument("--clusters", type=int, default=4096, help="vocabulary clusters when distilling (0: none)")
    t.add_argument("--alias", action="append", default=[], metavar="MODEL=NAME",
                   help="another name a policy may use for MODEL (repeatable)")
    t.add_argument("--c", type=float, default=TrainDefaults.c_quality,
                   help="inverse L2 regularisation of the quality heads (default %(default)s)")
    t.add_argument("--holdout", type=float, default=0.0,
                   help="hold out this share of records, train on the rest and print the evaluation")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.add_argument("--verifier-models", metavar="M1,M2",
                   help="train the answer verifier on these models' responses (default: every model with responses)")
    t.add_argument("--no-verifier", action="store_true",
                   help="do not train the answer verifier even when the records carry `responses`")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a router artifact on held-out outcomes")
    e.add_argument("--outcomes", required=True, metavar="FILE")
    e.add_argument("--model", required=True, metavar="DIR", help="router artifact directory")
    e.add_argument("--models", help="comma-separated models to compare (default: those scored on every record)")
    e.add_argument("--png", help="write the quality curves here (default: next to --json, or none)")
    e.add_argument("--json", help="write the numbers here")
    e.set_defaults(func=_eval)

    k = sub.add_parser("calibrate", help="pick the objective's knob for a target traffic share")
    k.add_argument("--policy", required=True)
    k.add_argument("--prompts", required=True, metavar="FILE",
                   help="reference prompts: JSONL with `prompt` or `messages` (outcome files work)")
    k.add_argument("--target", help="a model name, or tier:small|medium|large|frontier (not for a cascade route)")
    k.add_argument("--share", required=True, type=float,
                   help="wanted share of first choices, 0..1; for a cascade route: the share of requests that escalate")
    k.add_argument("--route", help="the route whose targets compete (default: the first route with rank: true)")
    k.add_argument("--kind", choices=["min_cost", "tradeoff", "max_quality"],
                   help="objective to calibrate (default: the policy's)")
    k.add_argument("--limit", type=int, default=5000, help="use at most this many prompts")
    k.set_defaults(func=_calibrate)

    v = sub.add_parser("versions", help="the routers in force: the trained artifact, the online learner's "
                       "state and history (router.learning)")
    v.set_defaults(func=_versions)
    pr = sub.add_parser("promote", help="make the online learner route (every gateway within a second)")
    pr.add_argument("--reason", default="manual promotion")
    pr.set_defaults(func=lambda a: _set_live("learner", a))
    rb = sub.add_parser("rollback", help="route with the trained router again; the learner goes back to shadow")
    rb.add_argument("--reason", default="manual rollback")
    rb.set_defaults(func=lambda a: _set_live("static", a))
    o = sub.add_parser("evaluate-offline", help="score the static router and the online learner from the "
                       "decision log and feedback (inverse-propensity and doubly-robust, 95%% intervals)")
    o.add_argument("--log", help="decision log JSONL (default: the gateway's store: Redis or <data>/decisions.jsonl)")
    o.add_argument("--feedback", help="feedback JSONL (default: the gateway's feedback store)")
    o.add_argument("--out", help="write the estimates as JSON here")
    o.set_defaults(func=_evaluate_offline)

    b = sub.add_parser("build-default", help="rebuild the shipped default artifact from the public data")
    b.add_argument("--data", default="../shared/data", help="folder holding routing/ (see docs/router.md)")
    b.add_argument("--out", default=str(Path(__file__).resolve().parent / "default"))
    b.add_argument("--distill", action="store_true",
                   help="distill a fresh embedder (slow: minutes); otherwise reuse --embedder's")
    b.add_argument("--clusters", type=int, default=4096, help="vocabulary clusters when distilling (0: none)")
    b.add_argument("--embedder", metavar="DIR", help="embedder source artifact (default: the shipped one)")
    b.add_argument("--verifier-only", action="store_true",
                   help="only (re)train the answer verifier in --out; the router's heads stay as they are")
    b.set_defaults(func=_build_default)


def _learning_store():
    from concilium.pipeline.learning import open_store
    from concilium.settings import Settings

    settings = Settings()
    return settings, open_store(settings.redis_url, settings.data_dir)


def _versions(args: argparse.Namespace) -> int:
    import asyncio
    import time

    settings, store = _learning_store()

    async def show() -> None:
        try:
            state, history, stats = await store.state(), await store.history(), await store.read()
        finally:
            await store.close()
        where = settings.redis_url or f"{settings.data_dir}/learning"
        print(f"online learner ({where}): {state.get('live', 'static')} router live; "
              f"{int(sum(s.n for s in stats.values()))} feedback events")
        for m, st in sorted(stats.items()):
            print(f"  {m}: {int(st.n)} events")
        for h in history:
            print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(h['changed']))}Z  {h['live']} live: {h['reason']}")

    asyncio.run(show())
    return 0


def _set_live(live: str, args: argparse.Namespace) -> int:
    import asyncio

    _, store = _learning_store()

    async def go() -> None:
        try:
            await store.set_state(live, args.reason)
        finally:
            await store.close()

    asyncio.run(go())
    print(f"{live} router live ({args.reason}); gateways follow within a second")
    return 0


def _evaluate_offline(args: argparse.Namespace) -> int:
    import asyncio

    from concilium.pipeline.learning import evaluate, joined
    from concilium.router.feedback import open_store as open_feedback
    from concilium.router.feedback import read_feedback_file

    settings, store = _learning_store()

    async def load() -> tuple[list[dict], dict[str, float]]:
        try:
            if args.log:
                decisions = [json.loads(line) for line in open(args.log) if line.strip()]
            else:
                decisions = await store.read_log()
            if args.feedback:
                fbs = read_feedback_file(args.feedback)
            else:
                fstore = open_feedback(settings.redis_url, settings.data_dir)
                try:
                    fbs = await fstore.read_all()
                finally:
                    await fstore.close()
        finally:
            await store.close()
        return decisions, {f.request_id: f.score for f in fbs}

    decisions, scores = asyncio.run(load())
    events = joined(decisions, scores)
    if not events:
        return _fail(f"no decision in the log ({len(decisions)} decisions) has feedback ({len(scores)} scores)")
    est = evaluate(events)
    print(f"{est['events']} rewarded decisions of {len(decisions)} logged; mean reward of what was served "
          f"{est['logged_reward']:.3f}")
    print(f"{'router':<10}{'IPS':>8}{'95% interval':>18}{'DR':>8}{'95% interval':>18}{'agrees':>8}")
    for r in ("static", "learner"):
        i, d = est[r]["ips"], est[r]["dr"]
        print(f"{r:<10}{i[0]:>8.3f}   [{i[1]:.3f}, {i[2]:.3f}]{d[0]:>8.3f}   [{d[1]:.3f}, {d[2]:.3f}]"
              f"{est[r]['agrees_with_logged']:>8.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(est, indent=2))
    return 0


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _convert(args: argparse.Namespace) -> int:
    from concilium.router.converters import convert
    from concilium.router.outcomes import OutcomeError, write_outcomes

    try:
        recs = convert(args.source, args.path, drop_contaminated=not args.keep_contaminated,
                       reference=args.reference)
    except (OutcomeError, OSError) as e:
        return _fail(str(e))
    n = write_outcomes(recs, args.out)
    print(f"wrote {n} records to {args.out}")
    return 0


def _parse_aliases(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        model, sep, alias = item.partition("=")
        if not sep or not model or not alias:
            raise ValueError(f"--alias expects MODEL=NAME, got {item!r}")
        out.setdefault(model, []).append(alias)
    return out


def _load_training(args: argparse.Namespace):
    from concilium.router.feedback import feedback_outcomes, read_decisions, read_feedback_file
    from concilium.router.outcomes import read_outcomes

    records = []
    for f in args.outcomes:
        records += read_outcomes(f)
    fb_used = fb_skipped = 0
    if args.feedback:
        fbs = [fb for f in args.feedback for fb in read_feedback_file(f)]
        decisions = read_decisions(args.decisions) if args.decisions else {}
        fb_recs, fb_skipped = feedback_outcomes(fbs, decisions, args.feedback_weight)
        records += fb_recs
        fb_used = len(fb_recs)
    return records, fb_used, fb_skipped


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from concilium.router.evaluate import (
        eval_matrix,
        format_n_model,
        format_two_model,
        n_model_report,
        predicted_quality,
        two_model_report,
    )
    from concilium.router.outcomes import OutcomeError, file_sha256
    from concilium.router.train import TrainConfig, load_embedder, train

    if not args.outcomes and not args.feedback:
        return _fail("give --outcomes FILE... and/or --feedback FILE...")
    try:
        aliases = _parse_aliases(args.alias)
        records, fb_used, fb_skipped = _load_training(args)
    except (OutcomeError, ValueError, OSError) as e:
        return _fail(str(e))
    if args.feedback:
        print(f"feedback: {fb_used} outcome records, {fb_skipped} records without a model and prompt skipped")
    if args.distill:
        from concilium.router.distill import distill_static

        embedder = distill_static(None, args.clusters or None)
    else:
        try:
            embedder = load_embedder(args.embedder)
        except (OSError, ValueError) as e:
            return _fail(f"cannot load the embedder: {e}")
    held = []
    if args.holdout > 0:
        rng = np.random.default_rng(args.seed)
        order = rng.permutation(len(records))
        n_held = int(round(len(records) * args.holdout))
        held = [records[i] for i in order[:n_held]]
        records = [records[i] for i in order[n_held:]]
    files = list(args.outcomes) + list(args.feedback)
    meta = {"data": {"files": file_sha256(files), "n_records": len(records), "holdout": len(held)}}
    try:
        artifact, report = train(records, embedder, TrainConfig(c_quality=args.c), aliases, meta, progress=not args.quiet)
    except OutcomeError as e:
        return _fail(str(e))
    if held:
        try:
            data = eval_matrix([r for r in held if all(m in r.scores for m in report.models)] or held)
            pred = predicted_quality(artifact, data)
            metrics: dict = {}
            if len(data.models) == 2:
                two = two_model_report(pred, data)
                print(format_two_model(two))
                metrics["apgr"] = two["rows"]["router"]["apgr"]
            if data.cost is not None:
                many = n_model_report(pred, data)
                print(format_n_model(many))
                metrics["aiq"] = many["rows"]["router"]["aiq"]
            artifact.meta["metrics"] = {"holdout": metrics}
        except OutcomeError as e:
            print(f"holdout evaluation skipped: {e}")
    out = artifact.save(args.out)
    if not args.no_verifier:
        rc = _train_verifier(records, embedder, args, out)
        if rc:
            return rc
    print(f"trained on {report.n_records} records; quality heads: "
          + ", ".join(f"{m} ({n})" for m, n in report.models.items()))
    if report.skipped_models:
        print("too few records, no head: " + ", ".join(f"{m} ({n})" for m, n in report.skipped_models.items()))
    print(f"wrote {out}")
    return 0


def _train_verifier(records, embedder, args: argparse.Namespace, out: Path) -> int:
    """Fit the answer verifier next to the router when the records carry responses."""
    from concilium.router.cascade.verifier import VerifierError, examples_from, train_verifier

    if not examples_from(records):
        return 0
    models = [m for m in args.verifier_models.split(",") if m] if args.verifier_models else None
    try:
        ver = train_verifier(records, embedder=embedder, models=models)
    except VerifierError as e:
        print(f"answer verifier not trained: {e}")
        return 0
    ver.save(out)
    t = ver.meta["training"]
    print(f"answer verifier: {t['examples']} responses of " + ", ".join(f"{m} ({n})" for m, n in t["models"].items())
          + f"; C = {t['c']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from concilium.router.artifact import Artifact, ArtifactError
    from concilium.router.evaluate import (
        eval_matrix,
        format_n_model,
        format_two_model,
        n_model_report,
        plot,
        predicted_quality,
        two_model_report,
    )
    from concilium.router.outcomes import OutcomeError, read_outcomes

    try:
        artifact = Artifact.load(args.model)
        records = read_outcomes(args.outcomes)
        models = args.models.split(",") if args.models else None
        if models:
            records = [r for r in records if all(m in r.scores for m in models)]
        data = eval_matrix(records, models)
        pred = predicted_quality(artifact, data)
    except (ArtifactError, OutcomeError) as e:
        return _fail(str(e))
    print(f"{len(records)} records, models: {', '.join(data.models)}")
    two = many = None
    out: dict = {"outcomes": args.outcomes, "model": args.model, "n": len(records), "models": data.models}
    if len(data.models) == 2:
        two = two_model_report(pred, data)
        print(format_two_model(two))
        out["two_model"] = {k: {kk: vv for kk, vv in v.items() if kk != "curve"} for k, v in two["rows"].items()}
    if data.cost is not None:
        many = n_model_report(pred, data)
        print(format_n_model(many))
        out["n_model"] = {k: {kk: vv for kk, vv in v.items() if kk != "points"} for k, v in many["rows"].items()}
    elif len(data.models) > 2:
        print("no `costs` in the records: the quality-cost table and AIQ need them")
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if png and (two or many):
        print(f"wrote {plot(two, many, png, title=Path(args.outcomes).name)}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from concilium.policy.loader import PolicyError, load_policy
    from concilium.router.calibrate import CalibrationError, calibrate
    from concilium.router.learned import load_dispatcher
    from concilium.router.outcomes import iter_jsonl

    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        return _fail(str(e))
    if args.route:
        route = next((r for r in policy.routes if r.name == args.route), None)
        if route is None:
            return _fail(f"no route named {args.route!r}; routes: {', '.join(r.name for r in policy.routes)}")
        if route.cascade is not None:
            return _calibrate_cascade(route, args)
    else:
        route = next((r for r in policy.routes if r.rank and len(r.targets) > 1), None)
        if route is None:
            return _fail("no route with rank: true and several targets; name one with --route")
    if not args.target:
        return _fail("--target is required (a model name, or tier:...), except for a cascade route")
    dispatcher = load_dispatcher(policy.router, policy)
    if dispatcher is None:
        return _fail("no learned router for this policy (router.learned is false or the artifact does not load)")
    bodies = []
    try:
        for row in iter_jsonl(args.prompts):
            if isinstance(row.get("messages"), list):
                bodies.append({"messages": row["messages"]})
            elif isinstance(row.get("prompt"), str):
                bodies.append({"messages": [{"role": "user", "content": row["prompt"]}]})
            if len(bodies) >= args.limit:
                break
    except (OSError, json.JSONDecodeError) as e:
        return _fail(f"{args.prompts}: {e}")
    try:
        cal = calibrate(dispatcher, policy, bodies, list(route.targets), args.target, args.share, args.kind)
    except CalibrationError as e:
        return _fail(str(e))
    print(f"route {route.name}: {cal.n_prompts} reference prompts, target {args.target} -> {', '.join(cal.target)}")
    print(f"{cal.knob} = {cal.value:.6g} sends {cal.share:.1%} of first choices to the target (wanted {cal.target_share:.1%})")
    for m, s in sorted(cal.shares.items(), key=lambda kv: -kv[1]):
        print(f"  {m:<30} {s:6.1%}")
    print("\nput this in the policy:\n" + cal.yaml())
    return 0


def _calibrate_cascade(route, args: argparse.Namespace) -> int:
    """The threshold at which `--share` of the reference drafts escalate: the route's scorer reads
    each record's recorded answer of the route's first draft model (outcome records with `responses`)."""
    import numpy as np

    from concilium.router.cascade import Draft, ScorerSpecError, build_scorer
    from concilium.router.outcomes import OutcomeError, read_outcomes

    if not 0.0 < args.share < 1.0:
        return _fail("--share (the escalation share) must be between 0 and 1")
    draft = route.cascade.drafts[0]
    try:
        scorer = build_scorer(route.cascade.scorer)
        records = read_outcomes(args.prompts)
    except (ScorerSpecError, OutcomeError, OSError) as e:
        return _fail(str(e))
    answered = [r for r in records if draft in r.responses][: args.limit]
    if len(answered) < 20:
        return _fail(f"{args.prompts}: {len(answered)} records carry a response of {draft!r} (need at least 20; "
                     "outcome records with `responses: {model: text}`)")
    scores = np.sort([scorer.score_draft(Draft(r.prompt, r.responses[draft])) for r in answered])
    k = min(len(scores) - 1, max(0, round(args.share * len(scores))))
    threshold = float(scores[k])
    share = float(np.mean(scores < threshold))
    print(f"route {route.name}: {len(answered)} reference answers of {draft}, scorer {route.cascade.scorer}")
    print(f"threshold {threshold:.4f} escalates {share:.1%} of them (wanted {args.share:.1%})")
    print(f"\nput this in the policy:\n  cascade: {{threshold: {threshold:.4f}}}")
    return 0


def _build_default(args: argparse.Namespace) -> int:
    from concilium.router.build import build_default, build_default_verifier

    try:
        if args.verifier_only:
            out = build_default_verifier(Path(args.data), Path(args.out))
        else:
            out = build_default(Path(args.data), Path(args.out), args.distill, args.clusters, args.embedder)
    except (OSError, ValueError) as e:
        return _fail(str(e))
    print(f"wrote {out}")
    return 0
