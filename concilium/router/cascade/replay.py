"""`concilium eval replay`: evaluate a cascade policy on recorded answers, offline.

    concilium eval replay --policy FILE --outcomes FILE.jsonl [--out DIR] [--route NAME]
                          [--draft MODEL --strong MODEL] [--grading scores,numeric] [--folds 5 --seeds 0,1,2]

The policy names the models (and their prices) and, in a route with `strategy: cascade`, the draft
model(s), the scorer and the threshold:

    routes:
      - name: math
        targets: [gpt-4]             # the model escalated to
        strategy: cascade
        cascade: {drafts: [mixtral], scorer: verifier, threshold: 0.5}

Policy model names are matched to the records' model names by name or by the model's upstream
`model` id. `--draft` / `--strong` override (or stand in when the policy has no cascade route).

What it reports (see `evaluate.py` for the rows and the protocol): APGR, CPT(50%), CPT(80%) and
cost-aware APGR, k-fold x seeds, for each grading (`scores`: the records' own; `routellm` /
`numeric`: re-graded from the responses against each record's `reference`); the policy's scorer
at the policy's threshold (escalated share, quality, cost per prompt); a PNG of the curves.

Through the gateway: `gateway_replay` is the hook for sending every prompt through a running
gateway (started with the policy, its models pointed at `concilium.testing.replay_upstream`) with
the openai SDK and scoring the model whose answer came back (`x-concilium-model`). It evaluates one
operating point per run — the policy as written — so sweeping a cascade threshold there means one
run per threshold; the offline sweep above is the same decision computed from the same records.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GRADING_CHOICES = ("scores", "routellm", "numeric")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="offline evaluation programs")
    sub = p.add_subparsers(dest="eval_command", required=True)
    r = sub.add_parser("replay", help="evaluate a cascade policy on recorded answers (k-fold, threshold sweep)")
    r.add_argument("--policy", required=True, help="policy YAML naming the models, prices and the cascade route")
    r.add_argument("--outcomes", required=True, nargs="+", metavar="FILE",
                   help="outcome JSONL with `responses` (e.g. `concilium router convert routellm-gsm8k ...`)")
    r.add_argument("--out", metavar="DIR", help="write replay.json and replay.png here")
    r.add_argument("--route", help="the cascade route (default: the first with strategy: cascade)")
    r.add_argument("--draft", help="draft model (policy or record name); overrides the policy")
    r.add_argument("--strong", help="model escalated to (policy or record name); overrides the policy")
    r.add_argument("--grading", default="scores,numeric",
                   help="comma-separated: scores (the records' own), routellm, numeric (need `reference`)")
    r.add_argument("--folds", type=int, default=5)
    r.add_argument("--seeds", default="0,1,2", help="comma-separated fold seeds")
    r.add_argument("--through-gateway", action="store_true",
                   help="also run the cascade through a real gateway (one per fold) against a replay upstream")
    r.add_argument("--gateway", metavar="URL",
                   help="also send every prompt through this running gateway (see gateway_replay)")
    r.add_argument("--model", default="concilium/auto", help="the model name sent to --gateway")
    r.set_defaults(func=_replay)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


class PolicyView:
    """What the replay reads from a policy YAML: models (upstream id, prices) and the cascade route.

    Read without the gateway's validation so that a cascade section is accepted whatever the
    installed policy schema knows; `concilium policy check` is the validator."""

    def __init__(self, data: dict[str, Any], source: str = "") -> None:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ValueError(f"{source}: a policy needs a `models` mapping")
        self.models: dict[str, dict[str, Any]] = {k: v or {} for k, v in data["models"].items()}
        self.routes: list[dict[str, Any]] = [r for r in data.get("routes") or [] if isinstance(r, dict)]
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> PolicyView:
        import yaml

        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{p}: cannot read the policy ({e})") from None
        return cls(data, str(p))

    def cascade_route(self, name: str | None = None) -> dict[str, Any] | None:
        for r in self.routes:
            if (name is None and r.get("strategy") == "cascade") or (name is not None and r.get("name") == name):
                return r
        if name is not None:
            raise ValueError(f"{self.source}: no route named {name!r}")
        return None

    def record_name(self, name: str, known: set[str]) -> str:
        """The records' name for a policy model (its name or its upstream `model` id)."""
        if name in known:
            return name
        spec = self.models.get(name) or {}
        upstream = spec.get("model")
        if isinstance(upstream, str):
            for k in known:
                if k.lower() == upstream.lower() or k.lower().rsplit("/", 1)[-1] == upstream.lower().rsplit("/", 1)[-1]:
                    return k
        raise ValueError(f"model {name!r} has no records (records have: {', '.join(sorted(known))})")

    def prices(self, known: set[str]) -> dict[str, tuple[float, float]]:
        out = {}
        for name, spec in self.models.items():
            price = spec.get("price") or {}
            try:
                rec = self.record_name(name, known)
            except ValueError:
                continue
            out[rec] = (float(price.get("input", 0.0)), float(price.get("output", 0.0)))
        return out


def cascade_settings(route: dict[str, Any] | None) -> dict[str, Any]:
    c = (route or {}).get("cascade") or {}
    drafts = c.get("drafts") or ([c["draft"]] if c.get("draft") else [])
    targets = [t for t in (route or {}).get("targets") or [] if t not in drafts]
    return {"drafts": list(drafts), "strong": targets[0] if targets else None, "scorer": c.get("scorer", "verifier"),
            "threshold": c.get("threshold"), "route": (route or {}).get("name")}


def policy_point(data, scorer_spec: Any, threshold: float | None, oof_accept) -> dict[str, Any] | None:
    """The policy's own operating point. A trained verifier is scored out of fold (k-fold P(good));
    any other scorer is applied to each recorded draft as it is."""
    import numpy as np

    from concilium.router.cascade.registry import build_scorer

    if threshold is None:
        return None
    name = scorer_spec if isinstance(scorer_spec, str) else (scorer_spec or {}).get("name")
    if name == "verifier":
        accept, how = oof_accept, "trained verifier, out of fold"
    else:
        scorer = build_scorer(scorer_spec)
        accept = np.array([scorer.score(p, a) for p, a in zip(data.prompts, data.answers, strict=True)])
        how = "as configured"
    esc = accept < float(threshold)
    q = float(np.where(esc, data.strong_q, data.weak).mean())
    cost = float((data.cost_weak + np.where(esc, data.cost_strong, 0.0)).mean())
    return {"scorer": scorer_spec, "threshold": float(threshold), "scored": how, "escalated": float(esc.mean()),
            "quality": q, "cost_per_prompt": cost, "quality_weak": float(data.weak.mean()),
            "quality_strong": float(data.strong_q.mean())}


def format_rows(summary: dict[str, dict[str, float]]) -> str:
    width = max(20, *(len(n) for n in summary))
    lines = [f"{'row':<{width}} {'APGR':>13} {'CPT(50%)':>9} {'CPT(80%)':>9} {'cost-aware APGR':>16}"]
    for name, v in summary.items():
        ca = f"{v['cost_apgr']:.3f}" if "cost_apgr" in v else "-"
        lines.append(f"{name:<{width}} {v['apgr']:.3f} ± {v['apgr_std']:.3f} {v['cpt50']:9.1%} {v['cpt80']:9.1%} {ca:>16}")
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], datas: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from concilium.router import metrics as M

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (grading, res) in zip(axes[0], results.items(), strict=True):
        d = datas[grading]
        for name, esc in res.oof.items():
            if name == "random":
                continue
            cv = M.two_model_curve(esc, d.weak, d.strong_q)
            ax.plot(cv.share, cv.pgr, label=f"{name} ({cv.apgr:.3f})")
        ax.plot([0, 1], [0, 1], ls=":", c="grey", label="random (0.500)")
        ax.set_xlabel(f"share escalated to {d.strong}")
        ax.set_ylabel("PGR")
        ax.set_title(f"grading: {grading} (out-of-fold, seed 0)", fontsize=9)
        ax.set_ylim(-0.1, 1.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def through_gateway_row(data, k: int, seed: int, offline_accept) -> dict[str, Any]:
    """The verifier row measured through the real gateway (`gateway_kfold_scores`), beside the
    offline out-of-fold scores of the same folds."""
    import numpy as np

    from concilium.router.cascade.evaluate import row_metrics

    g = gateway_kfold_scores(data, k=k, seed=seed)
    sc = g.pop("scores")
    ok = ~np.isnan(sc)
    out = row_metrics(-np.where(ok, sc, 0.0), data)
    out.update(g)
    out["max_abs_diff_vs_offline"] = float(np.abs(sc[ok] - offline_accept[ok]).max()) if ok.any() else None
    return out


def gateway_replay(gateway_url: str, records, model: str = "concilium/auto", api_key: str = "replay",
                   grading: str = "scores", stream: bool = False) -> dict[str, Any]:
    """Send every record's prompt through a running gateway with the openai SDK; score the answer
    by the model the gateway says answered (`x-concilium-model`, matched to the records by name).

    The gateway must be started with the policy under test, its models' `base_url` pointing at a
    `replay_upstream` serving the same records. Returns the share answered by each model, the
    quality of what the client got and the number of failed requests."""
    from openai import OpenAI

    from concilium.router.cascade.grading import grade

    client = OpenAI(base_url=gateway_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0)
    by_model: dict[str, int] = {}
    quality, failed = [], 0
    for r in records:
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": r.prompt}], stream=stream)
        except Exception:  # noqa: BLE001 - a failed request is counted, the replay goes on
            failed += 1
            continue
        answered = raw.headers.get("x-concilium-model", "")
        body = raw.parse()
        text = "".join(c.choices[0].delta.content or "" for c in body if c.choices) if stream else \
            (body.choices[0].message.content or "")
        by_model[answered] = by_model.get(answered, 0) + 1
        rec_model = next((m for m in r.responses if r.responses[m] == text), None)
        if rec_model is None:
            quality.append(0.0)
        elif grading == "scores":
            quality.append(r.scores.get(rec_model, 0.0))
        else:
            quality.append(grade(text, r.reference or "", grading))
    n = len(quality)
    return {"requests": len(records), "failed": failed, "answered_by": by_model,
            "quality": sum(quality) / n if n else None}


def _replay(args: argparse.Namespace) -> int:
    import warnings

    from concilium.router.cascade.evaluate import cascade_data, kfold, threshold_table
    from concilium.router.cascade.verifier import VerifierConfig
    from concilium.router.outcomes import OutcomeError, read_outcomes
    from concilium.router.train import load_embedder

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        policy = PolicyView.load(args.policy)
        route = policy.cascade_route(args.route)
        settings = cascade_settings(route)
        records = [r for f in args.outcomes for r in read_outcomes(f)]
        known = {m for r in records for m in r.responses} | {m for r in records for m in r.scores}
        draft = policy.record_name(args.draft or (settings["drafts"][0] if settings["drafts"] else ""), known)
        strong = policy.record_name(args.strong or settings["strong"] or "", known)
        gradings = [g.strip() for g in args.grading.split(",") if g.strip()]
        bad = [g for g in gradings if g not in GRADING_CHOICES]
        if bad:
            raise ValueError(f"unknown grading {bad[0]!r}; known: {', '.join(GRADING_CHOICES)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        prices = policy.prices(known)
    except (ValueError, OutcomeError) as e:
        return _fail(str(e))
    embedder = load_embedder(None)
    out: dict[str, Any] = {"policy": args.policy, "outcomes": args.outcomes, "draft": draft, "strong": strong,
                           "cascade": settings, "folds": args.folds, "seeds": seeds, "prices_per_m": prices,
                           "gradings": {}}
    results, datas = {}, {}
    for g in gradings:
        try:
            data = cascade_data(records, draft, strong, g, prices)
        except OutcomeError as e:
            print(f"grading {g}: skipped ({e})")
            continue
        res = kfold(data, VerifierConfig(), embedder, args.folds, seeds)
        results[g], datas[g] = res, data
        summary = res.summary()
        print(f"\ngrading: {g}; {res.n} prompts; {draft} {data.weak.mean():.3f} / {strong} {data.strong_q.mean():.3f}; "
              f"{args.folds}-fold x {len(seeds)} seeds")
        print(format_rows(summary))
        accept = -res.oof["verifier"]
        point = policy_point(data, settings["scorer"], settings["threshold"], accept)
        if point:
            print(f"policy point ({point['scorer']} >= {point['threshold']}): escalated {point['escalated']:.1%}, "
                  f"quality {point['quality']:.3f}, ${point['cost_per_prompt']:.2e} per prompt")
        out["gradings"][g] = {"n": res.n, "quality_weak": float(data.weak.mean()),
                              "quality_strong": float(data.strong_q.mean()), "rows": summary,
                              "policy_point": point, "thresholds": threshold_table(accept, data)}
        if args.through_gateway:
            out["gradings"][g]["through_gateway"] = through_gateway_row(data, args.folds, seeds[0], -res.oof["verifier"])
            tg = out["gradings"][g]["through_gateway"]
            print(f"through the gateway (seed {seeds[0]}): APGR {tg['apgr']:.3f}, CPT(80%) {tg['cpt80']:.1%}, "
                  f"max |score - offline| {tg['max_abs_diff_vs_offline']:.4f}, request p50 {tg['latency_p50_ms']:.1f} ms")
    if not results:
        return _fail("no grading could be evaluated on these records")
    if args.gateway:
        out["gateway"] = gateway_replay(args.gateway, datas[next(iter(datas))].records, args.model,
                                        grading=next(iter(datas)))
        print(f"\nthrough the gateway at {args.gateway}: {out['gateway']}")
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "replay.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {folder / 'replay.json'} and {plot_curves(results, datas, folder / 'replay.png')}")
    return 0


# --- the whole cascade through the real gateway ----------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], ready_url: str, log: Path, timeout: float = 90.0):
    """Start a process and poll `ready_url` until it answers 200 (a readiness check, not a sleep)."""
    import os
    import subprocess
    import time
    import urllib.error
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2:4]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as r:
                if r.status == 200:
                    return proc
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.05)
    proc.terminate()
    raise TimeoutError(f"{ready_url} not ready after {timeout}s: {log.read_text()[-2000:]}")


def _stop(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


CASCADE_POLICY = """version: 1
models:
  draft: {{provider: openai, base_url: "{url}/v1", model: "{draft}", price: {{input: {p_draft[0]}, output: {p_draft[1]}}}}}
  strong: {{provider: openai, base_url: "{url}/v1", model: "{strong}", price: {{input: {p_strong[0]}, output: {p_strong[1]}}}}}
routes:
  - name: replay
    targets: [strong]
    rank: false
    strategy: cascade
    cascade: {{drafts: [draft], scorer: {{name: verifier, artifact: "{artifact}"}}, threshold: 1.0}}
retry: {{attempts: 0, backoff_s: 0.01, backoff_max_s: 0.05}}
"""


def gateway_kfold_scores(data, config=None, k: int = 5, seed: int = 0, workdir: str | Path | None = None,
                         on_fold=None) -> dict[str, Any]:
    """The cascade decision made by the real gateway, k-fold: per fold, a verifier fitted on the
    other folds' drafts is written to disk, a gateway is started with a `strategy: cascade` policy
    using it (threshold 1.0: every draft is scored and escalated, so one pass gives every score)
    against a replay upstream serving the records, and each held-out prompt is sent with the openai
    SDK and `x-concilium-explain: true`. Returns the per-prompt draft scores the gateway computed
    (NaN where a request failed), the latency of each request, and the failures; the threshold
    sweep over those scores is the same curve a run per threshold would trace."""
    import sys
    import tempfile
    import time

    import numpy as np
    from openai import OpenAI

    from concilium.router.cascade.evaluate import folds
    from concilium.router.cascade.verifier import VerifierConfig, featurise, fit_features
    from concilium.router.outcomes import write_outcomes

    cfg = config or VerifierConfig()
    tmp = Path(workdir or tempfile.mkdtemp(prefix="concilium-replay-"))
    tmp.mkdir(parents=True, exist_ok=True)
    write_outcomes(data.records, tmp / "records.jsonl")
    x = featurise(data.prompts, data.answers, cfg)
    up_port = _free_port()
    upstream = _start([sys.executable, "-m", "concilium.testing.replay_upstream", "--outcomes", str(tmp / "records.jsonl"),
                       "--port", str(up_port)], f"http://127.0.0.1:{up_port}/_control/stats", tmp / "upstream.log")
    scores = np.full(len(data.weak), np.nan)
    latency_ms: list[float] = []
    failed = 0
    prices = {"p_draft": (0.0, 0.0), "p_strong": (0.0, 0.0)}
    try:
        for j, (tr, te) in enumerate(folds(len(data.weak), k, seed)):
            art = tmp / f"verifier-fold{j}"
            fit_features(x[tr], data.weak[tr], None, cfg).save(art)
            policy = tmp / f"policy-fold{j}.yaml"
            policy.write_text(CASCADE_POLICY.format(url=f"http://127.0.0.1:{up_port}", draft=data.draft,
                                                    strong=data.strong, artifact=art, **prices))
            gw_port = _free_port()
            gw = _start([sys.executable, "-m", "concilium.cli", "serve", "--policy", str(policy), "--port", str(gw_port),
                         "--log-level", "warning"], f"http://127.0.0.1:{gw_port}/readyz", tmp / f"gateway-fold{j}.log")
            try:
                client = OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="replay", max_retries=0, timeout=60)
                for i in te:
                    t0 = time.perf_counter()
                    try:
                        raw = client.chat.completions.with_raw_response.create(
                            model="concilium/auto", messages=[{"role": "user", "content": data.prompts[i]}],
                            extra_headers={"x-concilium-explain": "true"})
                        body = json.loads(raw.http_response.text)
                        steps = (body.get("concilium") or {}).get("cascade") or []
                        scored = [s for s in steps if s.get("score") is not None]
                        if scored:
                            scores[i] = float(scored[0]["score"])
                        else:
                            failed += 1
                    except Exception:  # noqa: BLE001 - counted; the replay goes on
                        failed += 1
                    latency_ms.append((time.perf_counter() - t0) * 1e3)
            finally:
                _stop(gw)
            if on_fold:
                on_fold(j)
    finally:
        _stop(upstream)
    lat = np.array(latency_ms) if latency_ms else np.zeros(1)
    return {"scores": scores, "failed": failed, "requests": len(latency_ms),
            "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p99_ms": float(np.percentile(lat, 99))}
