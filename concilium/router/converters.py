"""Converters from the public routing data sets to outcome records (see `outcomes.py`).

Each converter reads the files exactly as published and returns `Outcome`s with the upstream
model names unchanged; the labelled prompt sets (category / difficulty labels, no outcomes) are read
by `labelled.py` under the same `convert`. `concilium router convert SOURCE PATH --out FILE` writes
them as JSONL.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from concilium.policy.pricing import CHARS_PER_TOKEN
from concilium.router import categories as cat
from concilium.router.labelled import LABELLED_SOURCES, read_labelled
from concilium.router.outcomes import Outcome, OutcomeError, drop_prompts, iter_jsonl, prompt_key

# Output tokens assumed for cost estimates when a data set has no responses.
ASSUMED_OUTPUT_TOKENS = 256

ROUTELLM_WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
ROUTELLM_STRONG = "gpt-4-1106-preview"


def _bool(v: str) -> float:
    if v in ("True", "true", "1"):
        return 1.0
    if v in ("False", "false", "0"):
        return 0.0
    raise OutcomeError(f"expected True/False, got {v!r}")


def _tokens(text: str) -> float:
    return round(len(text) / CHARS_PER_TOKEN, 1)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def routellm_csv(path: str | Path, source: str, category: str) -> list[Outcome]:
    """A RouteLLM responses CSV: `prompt`, one True/False column per model, optional `<model>_response`."""
    p = Path(path)
    rows = _csv_rows(p)
    if not rows:
        raise OutcomeError(f"{p}: empty CSV")
    models = [c for c in rows[0] if c != "prompt" and not c.endswith("_response")]
    out = []
    for i, row in enumerate(rows):
        scores = {m: _bool(row[m]) for m in models}
        lengths = {m: _tokens(row[f"{m}_response"]) for m in models if row.get(f"{m}_response")}
        responses = {m: row[f"{m}_response"] for m in models if row.get(f"{m}_response")}
        out.append(
            Outcome(
                prompt=row["prompt"],
                scores=scores,
                id=f"{source}-{i}",
                category=category,
                source=source,
                output_tokens=lengths,
                responses=responses,
            )
        )
    return out


def gsm8k_references(path: str | Path) -> dict[str, str]:
    """GSM8K's `test.jsonl` (openai/grade-school-math) -> {prompt key: the final answer after `####`}."""
    return {prompt_key(row["question"]): row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
            for row in iter_jsonl(path)}


def routellm_gsm8k(path: str | Path, reference: str | Path | None = None) -> list[Outcome]:
    """`routellm/gsm8k_responses.csv`, with both models' responses; with `reference` (GSM8K's
    `prompts/gsm8k/test.jsonl`) each record also gets the reference final answer, for numeric grading."""
    recs = routellm_csv(path, "routellm-gsm8k", "math")
    if reference is not None:
        refs = gsm8k_references(reference)
        for r in recs:
            r.reference = refs.get(prompt_key(r.prompt))
    return recs


def routellm_mmlu(folder: str | Path) -> list[Outcome]:
    """`routellm/mmlu/` (one `mmlu_<subject>.csv` per subject)."""
    files = sorted(Path(folder).glob("mmlu_*.csv"))
    if not files:
        raise OutcomeError(f"{folder}: no mmlu_*.csv files")
    out = []
    for f in files:
        subject = f.stem.removeprefix("mmlu_")
        out += routellm_csv(f, f"routellm-mmlu-{subject}", cat.mmlu_subject(subject))
    return out


def routellm_mt_bench(folder: str | Path) -> list[Outcome]:
    """`routellm/mt_bench/`: first-turn GPT-4 judge scores (1-10, scaled to 0-1) of both models."""
    folder = Path(folder)
    questions = {q["question_id"]: q for q in iter_jsonl(folder / "question.jsonl")}
    scores: dict[int, dict[str, float]] = defaultdict(dict)
    for j in iter_jsonl(folder / "judgements.jsonl"):
        if j.get("turn") == 1 and j.get("score", -1) >= 0:
            scores[j["question_id"]][j["model"]] = min(max(float(j["score"]) / 10.0, 0.0), 1.0)
    out = []
    for qid, q in sorted(questions.items()):
        if qid in scores:
            out.append(
                Outcome(
                    prompt=q["turns"][0],
                    scores=scores[qid],
                    id=f"mt-bench-{qid}",
                    category=cat.MT_BENCH.get(q.get("category", "")),
                    source="routellm-mt-bench",
                )
            )
    return out


def routellm_contaminated(paths: list[str | Path]) -> list[str]:
    """Prompts RouteLLM lists as overlapping its training data (their `eval_prompt`)."""
    return [row["eval_prompt"] for p in paths for row in iter_jsonl(p)]


def llmrouter_prices(path: str | Path) -> dict[str, tuple[float, float]]:
    """`llm_candidates.json` -> {name: (input $/M, output $/M)}."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {name: (float(v["input_price"]), float(v["output_price"])) for name, v in data.items()}


def llmrouter_aliases(path: str | Path) -> dict[str, str]:
    """`llm_candidates.json` -> {short name: provider model id} (e.g. `qwen/qwen2.5-7b-instruct`)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {name: str(v.get("model", name)) for name, v in data.items()}


def llmrouter(scores_file: str | Path, queries_file: str | Path | None = None,
              candidates_file: str | Path | None = None) -> list[Outcome]:
    """`llmrouter/dcrouter_{train,test}.json` joined by prompt text to `query_{train,test}.jsonl`
    (task type -> category) and priced with `llm_candidates.json`.

    Costs are estimates: price x (prompt characters / 4 + 256 assumed output tokens), because the
    data set has no token counts.
    """
    scores_file = Path(scores_file)
    rows = json.loads(scores_file.read_text(encoding="utf-8"))
    tasks: dict[str, str] = {}
    if queries_file is not None:
        tasks = {prompt_key(q["query"]): q["task_name"] for q in iter_jsonl(queries_file)}
    prices = llmrouter_prices(candidates_file) if candidates_file is not None else {}
    out = []
    for i, row in enumerate(rows):
        prompt = row["question"]
        task = tasks.get(prompt_key(prompt))
        n_in = len(prompt) / CHARS_PER_TOKEN
        costs = {
            m: round((prices[m][0] * n_in + prices[m][1] * ASSUMED_OUTPUT_TOKENS) / 1e6, 10)
            for m in row["scores"]
            if m in prices
        }
        out.append(
            Outcome(
                prompt=prompt,
                scores={m: float(v) for m, v in row["scores"].items()},
                costs=costs,
                id=f"llmrouter-{scores_file.stem}-{i}",
                category=cat.LLMROUTER_TASKS.get(task or ""),
                source=f"llmrouter-{task}" if task else "llmrouter",
            )
        )
    return out


def routerdc(folder: str | Path) -> list[Outcome]:
    """`routerdc/*.json` (evaluation only: the data set states no license)."""
    files = sorted(Path(folder).glob("*.json"))
    if not files:
        raise OutcomeError(f"{folder}: no .json files")
    out = []
    for f in files:
        for i, row in enumerate(json.loads(f.read_text(encoding="utf-8"))):
            out.append(
                Outcome(
                    prompt=row["question"],
                    scores={m: min(max(float(v), 0.0), 1.0) for m, v in row["scores"].items()},
                    id=f"routerdc-{f.stem}-{i}",
                    category=cat.routerdc_file(f.stem),
                    source=f"routerdc-{f.stem}",
                )
            )
    return out


def convert(source: str, path: str | Path, drop_contaminated: bool = True,
            reference: str | Path | None = None) -> list[Outcome]:
    """Convert one published file or folder, by source name (see SOURCES). `reference`: GSM8K's
    test.jsonl, to attach reference answers to `routellm-gsm8k` records."""
    p = Path(path)
    if source not in SOURCES:
        raise OutcomeError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    if source == "routellm-gsm8k":
        recs = routellm_gsm8k(p, reference)
        bad = p.parent / "gsm8k_contaminated_prompts.jsonl"
    elif source == "routellm-mmlu":
        recs = routellm_mmlu(p)
        bad = p.parent / "mmlu_contaminated_prompts.jsonl"
    elif source == "routellm-mt-bench":
        recs = routellm_mt_bench(p)
        bad = p / "contaminated_prompts.jsonl"
    elif source == "llmrouter":
        split = "test" if p.stem.endswith("test") else "train"
        q = p.parent / f"query_{split}.jsonl"
        c = p.parent / "llm_candidates.json"
        return llmrouter(p, q if q.is_file() else None, c if c.is_file() else None)
    elif source in LABELLED_SOURCES:
        return read_labelled(source, p)
    else:
        return routerdc(p)
    if drop_contaminated and bad.is_file():
        recs = drop_prompts(recs, routellm_contaminated([bad]))
    return recs


SOURCES = ("routellm-gsm8k", "routellm-mmlu", "routellm-mt-bench", "llmrouter", "routerdc", *LABELLED_SOURCES)
