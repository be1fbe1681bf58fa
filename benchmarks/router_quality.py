"""Router quality and speed on public data, against simple and published-style baselines.

1. APGR (5-fold cross-validation, per-fold mean +- std) on RouteLLM GSM8K and MMLU (Mixtral-8x7B vs
   GPT-4, contaminated prompts dropped) for: random, prompt length, TF-IDF + logistic regression,
   kNN on embeddings, ours (the dispatcher's training pipeline on the fold's training part), oracle;
   and, as a reference that no router can have, ranking by the mean score RouterDC's seven 7B
   models got on the same prompt.
2. AIQ on LLMRouter's 9-model test split (trained on its train split minus any test prompt) for
   every single model, the random mix, kNN, ours and the oracle; and on RouterDC's 7 models (one a
   math specialist) the mean score of the chosen model per test task, in- and out-of-distribution.
3. Category accuracy and difficulty correlation on labelled prompts the artifact never saw (the
   held-out halves of Arena-Hard v2 and MATH, which the shipped artifact trains on half of; HumanEval,
   GSM8K train and WizardLM whole), for the shipped artifact beside one trained in the same run
   without the labelled sets; prompt length as the difficulty baseline.
4. Latency of `decide()` with the shipped artifact for a 200-token prompt (p50/p99), its parts, and
   the artifact's load time; with --minilm also the full MiniLM transformer as the embedder
   (quality and latency), the alternative the static embedder was chosen over.

Run: .venv/bin/python benchmarks/router_quality.py [--data ../shared/data] [--minilm] [--quick]
Prints tables; writes benchmarks/results/router_quality.json and router_quality_*.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import RESULTS_DIR, git_commit, machine_info, versions, write_json  # noqa: E402

from concilium.router import converters as conv  # noqa: E402
from concilium.router import metrics as M  # noqa: E402
from concilium.router.artifact import Artifact  # noqa: E402
from concilium.router.build import default_records  # noqa: E402
from concilium.router.categories import CATEGORIES  # noqa: E402
from concilium.router.evaluate import plot  # noqa: E402
from concilium.router.features import lexical_matrix  # noqa: E402
from concilium.router.labelled import half, read_labelled  # noqa: E402
from concilium.router.learned import DEFAULT_ARTIFACT, Dispatcher  # noqa: E402
from concilium.router.outcomes import Outcome, prompt_key  # noqa: E402
from concilium.router.predictor import Predictor  # noqa: E402
from concilium.router.train import TrainConfig, train  # noqa: E402

KNN_K = 50
REF_ROW = "ref: 7 other models' mean*"
FOLDS = 5
SEED = 0


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- features


class Featuriser:
    """Embeddings (+ lexical features) of every prompt, computed once and cached by text."""

    def __init__(self, name: str, encode_batch) -> None:
        self.name = name
        self.encode_batch = encode_batch
        self.cache: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for i in range(0, len(todo), 1024):
            part = todo[i : i + 1024]
            for t, v in zip(part, self.encode_batch(part), strict=True):
                self.cache[t] = v
        return np.stack([self.cache[t] for t in texts])

    def features(self, texts: list[str]) -> np.ndarray:
        return np.hstack([self.embed(texts), lexical_matrix(texts)])


# ----------------------------------------------------------------------------- routers


def knn_scores(e_train: np.ndarray, y_train: np.ndarray, e_test: np.ndarray, k: int = KNN_K) -> np.ndarray:
    """Mean outcome of the k most similar training prompts (cosine on unit embeddings), per model."""
    out = np.zeros((len(e_test), y_train.shape[1]))
    for i in range(0, len(e_test), 512):
        sims = e_test[i : i + 512] @ e_train.T
        idx = np.argpartition(-sims, min(k, len(e_train) - 1), axis=1)[:, :k]
        out[i : i + 512] = y_train[idx].mean(axis=1)
    return out


def tfidf_lr(train_texts: list[str], y: np.ndarray, test_texts: list[str]) -> np.ndarray:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(min_df=2, ngram_range=(1, 2), sublinear_tf=True)
    x = vec.fit_transform(train_texts)
    lr = LogisticRegression(max_iter=3000).fit(x, y)
    return lr.predict_proba(vec.transform(test_texts))[:, 1]


def ours_quality(train_recs: list[Outcome], x_train: np.ndarray, x_test: np.ndarray, models: list[str]) -> np.ndarray:
    """Train the dispatcher's heads on the training part; predicted quality of `models` on the test part.
    Features are precomputed (static or MiniLM embedding + lexical), so the embedder stored in the
    throw-away artifact is never called here."""
    art, _ = train(train_recs, EMBEDDER, TrainConfig(), features=x_train)
    pred = Predictor(art)
    q, _, _ = pred.forward_batch(x_test.astype(np.float32))
    names = art.model_names
    return q[:, [names.index(m) for m in models]]


# ----------------------------------------------------------------------------- 1. APGR


def routerdc_mean_scores(folder: Path) -> dict[str, float]:
    """prompt key -> mean score of RouterDC's seven 7B models on that prompt (RouterDC writes MMLU
    prompts without RouteLLM's trailing 'Answer:'). A reference for how much per-prompt difficulty
    signal exists, not a router: at routing time nobody knows how seven other models did."""
    return {_ref_key(r.prompt): float(np.mean(list(r.scores.values()))) for r in conv.convert("routerdc", folder)}


def _ref_key(prompt: str) -> str:
    p = prompt.rstrip()
    return prompt_key(p.removesuffix("Answer:"))


def apgr_table(name: str, recs: list[Outcome], feats: dict[str, Featuriser], quick: bool,
               reference: dict[str, float] | None = None) -> dict:
    from sklearn.model_selection import KFold

    W, S = conv.ROUTELLM_WEAK, conv.ROUTELLM_STRONG
    texts = [r.prompt for r in recs]
    weak = np.array([r.scores[W] for r in recs])
    strong = np.array([r.scores[S] for r in recs])
    y = np.stack([weak, strong], axis=1)
    gain = (strong > weak).astype(int)
    lengths = np.array([len(t) for t in texts], dtype=float)
    rng = np.random.default_rng(SEED)
    x_all = {k: f.features(texts) for k, f in feats.items()}
    rows: dict[str, list] = {}
    ref = None
    if reference:
        ref = np.array([reference.get(_ref_key(t), np.nan) for t in texts])

    def add(router: str, score: np.ndarray, te: np.ndarray) -> None:
        c = M.two_model_curve(score, weak[te], strong[te])
        rows.setdefault(router, []).append((c.apgr, c.cpt(0.5), c.cpt(0.8)))

    folds = list(KFold(FOLDS, shuffle=True, random_state=SEED).split(texts))
    if quick:
        folds = folds[:2]
    for fi, (tr, te) in enumerate(folds):
        log(f"  {name}: fold {fi + 1}/{len(folds)}")
        add("random (expected)", np.zeros(len(te)), te)
        add("random (one draw)", rng.random(len(te)), te)
        add("prompt length", lengths[te], te)
        add("TF-IDF + LR", tfidf_lr([texts[i] for i in tr], gain[tr], [texts[i] for i in te]), te)
        for k, x in x_all.items():
            emb_dim = feats[k].embed(texts[:1]).shape[1]
            e = x[:, :emb_dim]
            p = knn_scores(e[tr], y[tr], e[te])
            add(f"kNN-{KNN_K} ({k})", p[:, 1] - p[:, 0], te)
            q = ours_quality([recs[i] for i in tr], x[tr], x[te], [W, S])
            add(f"ours ({k})", q[:, 1] - q[:, 0], te)
        add("oracle", M.oracle_scores(weak[te], strong[te]), te)
        if ref is not None:
            te_ref = te[~np.isnan(ref[te])]
            add(REF_ROW, -ref[te_ref], te_ref)
    table = {}
    for router, vals in rows.items():
        a = np.array(vals)
        table[router] = {"apgr": float(a[:, 0].mean()), "apgr_std": float(a[:, 0].std()),
                         "cpt50": float(a[:, 1].mean()), "cpt80": float(a[:, 2].mean()), "folds": len(vals)}
    out = {"n": len(recs), "quality_weak": float(weak.mean()), "quality_strong": float(strong.mean()),
           "routers": table}
    if ref is not None:
        out["n_reference"] = int((~np.isnan(ref)).sum())
    return out


def print_apgr(results: dict) -> None:
    names = list(results)
    routers = list(results[names[0]]["routers"])
    log("\nAPGR, 5-fold CV (per-fold mean +- std), RouteLLM Mixtral-8x7B vs GPT-4, contaminated prompts dropped")
    head = f"{'router':<28}" + "".join(f"{n + ' APGR':>20}{'CPT50':>8}{'CPT80':>8}" for n in names)
    log(head)
    for r in routers:
        line = f"{r:<28}"
        for n in names:
            t = results[n]["routers"][r]
            line += f"{t['apgr']:>13.3f} +-{t['apgr_std']:.3f}{t['cpt50']:>8.1%}{t['cpt80']:>8.1%}"
        log(line)
    log("  ".join(f"{n}: n={results[n]['n']}, weak {results[n]['quality_weak']:.3f}, strong "
                  f"{results[n]['quality_strong']:.3f}" for n in names))
    if REF_ROW in results[names[0]]["routers"]:
        log("* not a router: routes by how RouterDC's seven 7B models actually scored on the same prompt (known "
            "only after running them), on the prompts RouterDC also holds ("
            + ", ".join(f"{n} {results[n].get('n_reference', 0)}" for n in names)
            + "): how far per-prompt difficulty itself goes")


# ----------------------------------------------------------------------------- 2. AIQ


def aiq_table(train_recs: list[Outcome], test_recs: list[Outcome], feats: dict[str, Featuriser]) -> tuple[dict, dict]:
    banned = {prompt_key(r.prompt) for r in test_recs}
    train_recs = [r for r in train_recs if prompt_key(r.prompt) not in banned]
    models = list(test_recs[0].scores)
    q_true = np.array([[r.scores[m] for m in models] for r in test_recs])
    cost = np.array([[r.costs[m] for m in models] for r in test_recs])
    y_train = np.array([[r.scores[m] for m in models] for r in train_recs])
    single = M.random_mix_points(q_true, cost)
    c_min, c_max = float(single[:, 0].min()), float(single[:, 0].max())
    rows: dict[str, dict] = {}
    for j, m in enumerate(models):
        rows[m] = {"kind": "single", "cost": float(single[j, 0]), "quality": float(single[j, 1]),
                   "aiq": M.aiq(single[j : j + 1], c_min, c_max), "points": single[j : j + 1]}
    curves = {"random mix": single, "oracle": M.oracle_points(q_true, cost)}
    for k, f in feats.items():
        tr_texts, te_texts = [r.prompt for r in train_recs], [r.prompt for r in test_recs]
        x_tr, x_te = f.features(tr_texts), f.features(te_texts)
        dim = f.embed(te_texts[:1]).shape[1]
        curves[f"kNN-{KNN_K} ({k})"] = M.tradeoff_curve(knn_scores(x_tr[:, :dim], y_train, x_te[:, :dim]), q_true, cost)
        curves[f"ours ({k})"] = M.tradeoff_curve(ours_quality(train_recs, x_tr, x_te, models), q_true, cost)
    for name, pts in curves.items():
        best = pts[np.argmax(pts[:, 1])]
        rows[name] = {"kind": name, "cost": float(best[0]), "quality": float(best[1]),
                      "aiq": M.aiq(pts, c_min, c_max), "points": pts}
    rep = {"c_min": c_min, "c_max": c_max, "rows": rows}
    clean = {"n_train": len(train_recs), "n_test": len(test_recs), "c_min": c_min, "c_max": c_max,
             "rows": {k: {kk: vv for kk, vv in v.items() if kk != "points"} for k, v in rows.items()}}
    return clean, rep


def print_aiq(res: dict) -> None:
    log(f"\nAIQ on LLMRouter's 9-model test split ({res['n_test']} prompts; trained on {res['n_train']} train "
        "prompts not in the test split). Cost: $ per request (estimated from prices and prompt length)")
    log(f"{'router / model':<36}{'cost of best point':>20}{'quality':>9}{'AIQ':>8}")
    for name, r in sorted(res["rows"].items(), key=lambda kv: (kv[1]["kind"] != "single", -kv[1]["aiq"])):
        log(f"{name:<36}{r['cost']:>20.3e}{r['quality']:>9.3f}{r['aiq']:>8.3f}")


# ----------------------------------------------------------------------------- 2b. RouterDC


ROUTERDC_OOD = ("MATH_prealgebra", "mbpp", "ceval", "javascript")  # test-only tasks (no train file)


def routerdc_table(folder: Path, feats: dict[str, Featuriser]) -> dict:
    """RouterDC's 7 open 7B models (one a math specialist): train on its *train files, pick the model
    with the highest predicted quality for each test prompt, report the mean score per task.
    In-distribution tasks have a train file; the ROUTERDC_OOD tasks have none. Research data with no
    stated license: evaluated here, never shipped."""
    recs = conv.convert("routerdc", folder)
    task = {r.id: r.source.removeprefix("routerdc-") for r in recs}  # type: ignore[union-attr]
    is_train = [t.endswith(("_train", "-train")) for t in (task[r.id] for r in recs)]
    test = [r for r, tr in zip(recs, is_train, strict=True) if not tr]
    banned = {prompt_key(r.prompt) for r in test}
    train_recs = [r for r, tr in zip(recs, is_train, strict=True) if tr and prompt_key(r.prompt) not in banned]
    models = list(test[0].scores)
    names = [task[r.id].removesuffix("_test").removesuffix("-test") for r in test]
    tasks = list(dict.fromkeys(names))
    q = np.array([[r.scores[m] for m in models] for r in test])
    y_tr = np.array([[r.scores[m] for m in models] for r in train_recs])
    choices: dict[str, np.ndarray] = {}
    for j, m in enumerate(models):
        choices[m] = np.full(len(test), j)
    for k, f in feats.items():
        tr_texts, te_texts = [r.prompt for r in train_recs], [r.prompt for r in test]
        x_tr, x_te = f.features(tr_texts), f.features(te_texts)
        dim = f.embed(te_texts[:1]).shape[1]
        choices[f"kNN-{KNN_K} ({k})"] = knn_scores(x_tr[:, :dim], y_tr, x_te[:, :dim]).argmax(1)
        choices[f"ours ({k})"] = ours_quality(train_recs, x_tr, x_te, models).argmax(1)
    rows: dict[str, dict] = {}
    idx = {t: np.array([i for i, n in enumerate(names) if n == t]) for t in tasks}
    for name, pick in choices.items():
        got = q[np.arange(len(test)), pick]
        per = {t: float(got[ii].mean()) for t, ii in idx.items()}
        ind = [t for t in tasks if t not in ROUTERDC_OOD]
        ood = [t for t in tasks if t in ROUTERDC_OOD]
        rows[name] = {"kind": "single" if name in models else "router", "tasks": per,
                      "mean_in_dist": float(np.mean([per[t] for t in ind])),
                      "mean_ood": float(np.mean([per[t] for t in ood])) if ood else None,
                      "share": {m.split("/")[-1]: float(np.mean(pick == j)) for j, m in enumerate(models)}}
    best = q.max(1)
    per = {t: float(best[ii].mean()) for t, ii in idx.items()}
    ood = [t for t in tasks if t in ROUTERDC_OOD]
    rows["oracle"] = {"kind": "oracle", "tasks": per,
                      "mean_in_dist": float(np.mean([per[t] for t in tasks if t not in ROUTERDC_OOD])),
                      "mean_ood": float(np.mean([per[t] for t in ood])) if ood else None}
    return {"n_train": len(train_recs), "n_test": len(test), "tasks": tasks, "rows": rows}


def print_routerdc(res: dict) -> None:
    log(f"\nRouterDC 7 models: mean score of the chosen model per test task (trained on {res['n_train']} "
        f"*train prompts; {res['n_test']} test prompts; OOD = tasks with no train file)")
    short = {t: t.replace("MATH_prealgebra", "prealg").replace("arc_challenge", "arc-c").replace("arc_easy", "arc-e")
             .replace("humaneval", "h-eval").replace("javascript", "js")[:7] for t in res["tasks"]}
    log(f"{'router / model':<34}" + "".join(f"{short[t]:>8}" for t in res["tasks"]) + f"{'ID mean':>9}{'OOD mean':>9}")
    rows = sorted(res["rows"].items(), key=lambda kv: ({"single": 0, "router": 1, "oracle": 2}[kv[1]["kind"]],
                                                       kv[1]["mean_in_dist"]))
    for name, r in rows:
        log(f"{name.split('/')[-1][:33]:<34}" + "".join(f"{r['tasks'][t]:>8.3f}" for t in res["tasks"])
            + f"{r['mean_in_dist']:>9.3f}" + (f"{r['mean_ood']:>9.3f}" if r["mean_ood"] is not None else f"{'-':>9}"))
    for name, r in rows:
        if r["kind"] == "router":
            log(f"  {name} picks: " + ", ".join(f"{m} {v:.0%}" for m, v in r["share"].items() if v >= 0.01))


# ----------------------------------------------------------------------------- 3. category / difficulty


# Labelled sets the shipped artifact learns from: only their "test" half (labelled.split_of) is scored.
TRAINED_HALVES = ("arena-hard", "math")


def labelled_sets(data: Path, exclude: set[str]) -> dict[str, list[Outcome]]:
    """name -> labelled prompts the artifact never saw: the "test" half of the sets it trains on, the
    whole of the others; any prompt in `exclude` (its training prompts) dropped."""
    p = data / "prompts"
    files = {
        "arena-hard": ("arena-hard-v2 (test half)", p / "arena_hard_v2" / "question.jsonl"),
        "math": ("math levels 1-5 (test half)", p / "math" / "test.jsonl"),
        "humaneval": ("humaneval", p / "humaneval" / "HumanEval.jsonl.gz"),
        "gsm8k": ("gsm8k train (1 in 8)", p / "gsm8k" / "train.jsonl"),
        "wizardlm": ("wizardlm (difficulty 1-10)", p / "wizardlm" / "WizardLM_testset.jsonl"),
    }
    out: dict[str, list[Outcome]] = {}
    for source, (name, path) in files.items():
        recs = read_labelled(source, path)
        if source in TRAINED_HALVES:
            recs = half(recs, "test")
        if source == "gsm8k":
            recs = recs[::8]
        out[name] = [r for r in recs if prompt_key(r.prompt) not in exclude]
    return out


def category_table(arts: dict[str, Artifact], sets: dict[str, list[Outcome]]) -> dict:
    """Per set: category accuracy and Spearman(predicted difficulty, label) of each artifact, and of
    prompt length as the difficulty baseline."""
    from scipy.stats import spearmanr

    res: dict = {}
    for name, items in sets.items():
        row: dict = {"n": len(items), "n_labelled": sum(r.category is not None for r in items), "routers": {}}
        levels = [r.difficulty for r in items]
        with_level = [i for i, lv in enumerate(levels) if lv is not None]
        if len(with_level) > 10:
            rho = spearmanr([len(items[i].prompt) for i in with_level], [levels[i] for i in with_level]).statistic
            row["length_difficulty_spearman"] = float(rho)
        for label, art in arts.items():
            if not items:
                continue
            pred = Predictor(art)
            _, cat, dif = pred.forward_batch(pred.features_batch([r.prompt for r in items]))
            guess = [art.categories[i] for i in cat.argmax(1)]
            r: dict = {}
            labelled = [(g, it.category) for g, it in zip(guess, items, strict=True) if it.category is not None]
            if labelled:
                r["category_accuracy"] = float(np.mean([g == c for g, c in labelled]))
            if len(with_level) > 10:
                d = dif @ np.array([0.0, 0.5, 1.0])
                r["difficulty_spearman"] = float(spearmanr(d[with_level], [levels[i] for i in with_level]).statistic)
            counts = {c: guess.count(c) for c in CATEGORIES if guess.count(c)}
            r["predicted"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
            row["routers"][label] = r
        res[name] = row
    return res


def print_categories(res: dict) -> None:
    labels = list(next(iter(v["routers"] for v in res.values() if v["routers"])))
    log("\nCategory accuracy and Spearman(predicted difficulty, label) on labelled prompts the artifact never saw")
    head = f"{'set':<30}{'n':>5}" + "".join(f"{lab[:22]:>24}" for lab in labels) + f"{'length':>10}"
    log(head)
    log(f"{'':<35}" + "".join(f"{'acc.':>12}{'diff. rho':>12}" for _ in labels) + f"{'diff. rho':>10}")
    for name, row in res.items():
        if row["n"] == 0:
            log(f"{name:<30}{0:>5}  (every prompt of this set is in the training data)")
            continue
        line = f"{name:<30}{row['n']:>5}"
        for lab in labels:
            r = row["routers"][lab]
            acc = f"{r['category_accuracy']:.3f}" if "category_accuracy" in r else "-"
            rho = f"{r['difficulty_spearman']:.3f}" if "difficulty_spearman" in r else "-"
            line += f"{acc:>12}{rho:>12}"
        ln = row.get("length_difficulty_spearman")
        log(line + (f"{ln:>10.3f}" if ln is not None else f"{'-':>10}"))
    for lab in labels:
        log(f"  {lab}: predicted categories, arena-hard: "
            + ", ".join(f"{c} {n}" for c, n in list(next(iter(res.values()))["routers"][lab]["predicted"].items())[:4]))


# ----------------------------------------------------------------------------- 4. latency


PROMPT_200 = (
    "I am building a small web service in Python that stores customer orders in PostgreSQL and exposes them "
    "through a REST API. Orders have line items, a status that moves from pending to paid to shipped, and a "
    "total that must always equal the sum of the line items. Please explain how I should structure the "
    "database tables, which indexes I need for listing a customer's recent orders quickly, how to keep the "
    "total consistent when two requests update the same order at the same time, and how to write the "
    "endpoint that marks an order as shipped so that it is safe to retry. Show the SQL for the tables and a "
    "short example of the transaction in Python, and point out the mistakes people usually make here. We run "
    "two replicas of the service behind a load balancer, use SQLAlchemy 2.0 with asyncpg, and expect about "
    "fifty orders per second at peak, so please also say whether row-level locks or optimistic concurrency "
    "with a version column is the better fit, and how to test the race in CI."
)


def latency(art_dir: Path, iters: int) -> dict:
    from concilium.policy.schema import Policy
    from concilium.router.decide import decide
    from concilium.router.features import lexical_features
    from concilium.router.text import request_text

    t0 = time.perf_counter()
    art = Artifact.load(art_dir)
    d = Dispatcher(art, str(art_dir))
    load_s = time.perf_counter() - t0
    up = {"provider": "openai", "base_url": "https://up.example/v1"}
    pol = Policy.model_validate({
        "models": {
            "gpt-4": {**up, "model": "gpt-4-1106-preview", "price": {"input": 10, "output": 30}},
            "mixtral": {**up, "model": "mistralai/Mixtral-8x7B-Instruct-v0.1", "price": {"input": 0.6, "output": 0.6}},
            "qwen-7b": {**up, "model": "qwen/qwen2.5-7b-instruct", "price": {"input": 0.2, "output": 0.2}},
            "llama-8b": {**up, "model": "meta/llama-3.1-8b-instruct", "price": {"input": 0.2, "output": 0.2}},
            "coder": {**up, "model": "my-coder", "tier": "medium", "tags": ["code"], "price": {"input": 1, "output": 3}},
            "local": {"provider": "local", "model": "smollm2", "tags": ["local"]},
        },
        "routes": [{"name": "auto", "targets": ["gpt-4", "mixtral", "qwen-7b", "llama-8b", "coder", "local"]}],
    })
    body = {"model": "concilium/auto", "messages": [{"role": "user", "content": PROMPT_200}]}
    n_tokens = len(art.embedder.tokenizer.encode(PROMPT_200, add_special_tokens=False).ids)
    text, turns = request_text(body)

    def timeit(fn, n: int) -> dict:
        for _ in range(min(200, n)):
            fn()
        ts = np.empty(n)
        for i in range(n):
            t = time.perf_counter()
            fn()
            ts[i] = time.perf_counter() - t
        ts *= 1e3
        return {"p50_ms": float(np.percentile(ts, 50)), "p99_ms": float(np.percentile(ts, 99)),
                "mean_ms": float(ts.mean())}

    out = {
        "artifact_load_s": load_s,
        "prompt_tokens": n_tokens,
        "decide": timeit(lambda: decide(body, pol, dispatcher=d), iters),
        "parts": {
            "request_text": timeit(lambda: request_text(body), iters // 4),
            "embed (static)": timeit(lambda: art.embedder.encode(text), iters // 4),
            "lexical features": timeit(lambda: lexical_features(text, turns), iters // 4),
            "heads": timeit(lambda: d.predictor.forward(d.predictor.features(text, turns)), iters // 4),
            "predict": timeit(lambda: d.predict(body, pol), iters // 4),
        },
    }
    return out


def minilm_latency(iters: int) -> dict:
    import torch

    from concilium.router.embedder import MiniLMEmbedder

    torch.set_num_threads(1)
    m = MiniLMEmbedder()
    for _ in range(5):
        m.encode(PROMPT_200)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        m.encode(PROMPT_200)
        ts.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": float(np.percentile(ts, 50)), "p99_ms": float(np.percentile(ts, 99)), "threads": 1}


# ----------------------------------------------------------------------------- main

EMBEDDER = None  # the static embedder heads are trained with (set in main)


def main() -> int:
    global EMBEDDER
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    ap.add_argument("--artifact", default=str(DEFAULT_ARTIFACT))
    ap.add_argument("--minilm", action="store_true", help="also compare the full MiniLM transformer (slow)")
    ap.add_argument("--quick", action="store_true", help="2 folds and fewer latency iterations (a smoke run)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "router_quality.json"))
    args = ap.parse_args()
    data = Path(args.data)
    r = data / "routing"
    started = time.time()
    meta = {"benchmark": "router_quality", "commit": git_commit(), "machine": machine_info(),
            "versions": versions(["numpy", "scikit-learn", "tokenizers", "model2vec", "sentence-transformers",
                                  "torch"]),
            "settings": {"folds": FOLDS, "seed": SEED, "knn_k": KNN_K, "quick": args.quick,
                         "artifact": args.artifact}}
    art = Artifact.load(args.artifact)
    EMBEDDER = art.embedder
    feats = {"static": Featuriser("static", art.embedder.encode_batch)}
    if args.minilm:
        from concilium.router.embedder import MiniLMEmbedder

        mini = MiniLMEmbedder()
        feats["MiniLM"] = Featuriser("MiniLM", mini.encode_batch)

    log("loading RouteLLM and LLMRouter outcomes ...")
    gsm8k = conv.convert("routellm-gsm8k", r / "routellm" / "gsm8k_responses.csv")
    mmlu = conv.convert("routellm-mmlu", r / "routellm" / "mmlu")
    ref = routerdc_mean_scores(r / "routerdc")
    apgr = {"GSM8K": apgr_table("GSM8K", gsm8k, feats, args.quick, ref),
            "MMLU": apgr_table("MMLU", mmlu, feats, args.quick, ref)}
    print_apgr(apgr)

    llm_train = conv.convert("llmrouter", r / "llmrouter" / "dcrouter_train.json")
    llm_test = conv.convert("llmrouter", r / "llmrouter" / "dcrouter_test.json")
    aiq, aiq_rep = aiq_table(llm_train, llm_test, feats)
    print_aiq(aiq)

    rdc = routerdc_table(r / "routerdc", feats)
    print_routerdc(rdc)

    log("\ntraining an artifact without the labelled prompt sets, for comparison ...")
    recs_lab, aliases, _ = default_records(data, labelled=True)
    recs_nolab, _, _ = default_records(data, labelled=False)
    no_lab, _ = train(recs_nolab, EMBEDDER, TrainConfig(), aliases)
    seen = {prompt_key(x.prompt) for x in recs_lab}
    arts = {"shipped artifact": art, "same, no labelled sets": no_lab}
    cats = category_table(arts, labelled_sets(data, seen))
    print_categories(cats)

    iters = 400 if args.quick else 3000
    lat = latency(Path(args.artifact), iters)
    if args.minilm:
        lat["minilm_embed_only"] = minilm_latency(50 if args.quick else 300)
    log(f"\nLatency on this CPU (single request, {lat['prompt_tokens']}-token prompt, 6-model policy), "
        f"load average at start {meta['machine']['load_avg_at_start'][0]:.1f}:")
    log(f"  artifact load: {lat['artifact_load_s'] * 1e3:.0f} ms")
    log(f"  decide(): p50 {lat['decide']['p50_ms']:.3f} ms, p99 {lat['decide']['p99_ms']:.3f} ms "
        "(targets: p50 <= 1 ms, p99 <= 3 ms)")
    for k, v in lat["parts"].items():
        log(f"    {k:<18} p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms")
    if "minilm_embed_only" in lat:
        m = lat["minilm_embed_only"]
        log(f"  MiniLM transformer, embedding only (1 thread): p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms; "
            f"ratio to the static embedder p50: {m['p50_ms'] / lat['parts']['embed (static)']['p50_ms']:.0f}x")

    out = Path(args.out)
    result = {**meta, "apgr": apgr, "aiq": aiq, "routerdc": rdc, "categories": cats, "latency": lat,
              "wall_s": round(time.time() - started, 1)}
    write_json(out, result)
    stem = out.with_suffix("")
    for name, recs in (("gsm8k", gsm8k), ("mmlu", mmlu)):
        log(f"wrote {curve_png(name, recs, feats['static'], Path(f'{stem}_{name}.png'))}")
    log(f"wrote {plot(None, aiq_rep, Path(f'{stem}_llmrouter.png'), title='LLMRouter 9-model test split')}")
    log(f"wrote {out}")
    return 0


def curve_png(name: str, recs: list[Outcome], feat: Featuriser, path: Path) -> Path:
    """Quality vs strong share, pooled over the 5 folds' test parts (each prompt scored by a router
    that did not train on it)."""
    from sklearn.model_selection import KFold

    from concilium.router.evaluate import EvalData, two_model_report

    W, S = conv.ROUTELLM_WEAK, conv.ROUTELLM_STRONG
    texts = [r.prompt for r in recs]
    x = feat.features(texts)
    pred = np.zeros((len(recs), 2))
    for tr, te in KFold(FOLDS, shuffle=True, random_state=SEED).split(texts):
        pred[te] = ours_quality([recs[i] for i in tr], x[tr], x[te], [W, S])
    q = np.array([[r.scores[W], r.scores[S]] for r in recs])
    rep = two_model_report(pred, EvalData([W, S], q, None, texts))
    return plot(rep, None, path, title=f"RouteLLM {name}, 5-fold out-of-fold predictions")


if __name__ == "__main__":
    sys.exit(main())
