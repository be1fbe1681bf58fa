"""Rebuild the shipped default artifact from the permissively licensed public data.

Training data: RouteLLM (Apache-2.0) GSM8K, MMLU and MT-Bench outcomes of Mixtral-8x7B and GPT-4;
LLMRouter (MIT) outcomes of nine open models (train and test files), priced with its candidate
list; and the project's own seed prompts (`seed/seed_prompts.jsonl`, category labels only). RouterDC
(no license stated) is never used here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from concilium.router import converters as conv
from concilium.router.labelled import half, read_labelled
from concilium.router.outcomes import Outcome, file_sha256, read_outcomes
from concilium.router.train import TrainConfig, load_embedder, train

log = logging.getLogger(__name__)
SEED = Path(__file__).resolve().parent / "seed" / "seed_prompts.jsonl"
SEED_WEIGHT = 3.0
# Labelled prompt sets: (source, path under data/prompts, training weight). Real user prompts count
# like the seed prompts; MATH levels are the only explicit difficulty labels.
LABELLED = (("arena-hard", "arena_hard_v2/question.jsonl", 3.0), ("math", "math/test.jsonl", 3.0))


def default_records(data: Path, labelled: bool = True) -> tuple[list[Outcome], dict[str, list[str]], list[Path]]:
    r = data / "routing"
    files = [
        r / "routellm" / "gsm8k_responses.csv",
        r / "llmrouter" / "dcrouter_train.json",
        r / "llmrouter" / "dcrouter_test.json",
        r / "llmrouter" / "query_train.jsonl",
        r / "llmrouter" / "query_test.jsonl",
        r / "llmrouter" / "llm_candidates.json",
        r / "routellm" / "mt_bench" / "judgements.jsonl",
        SEED,
    ]
    if labelled:
        files += [data / "prompts" / rel for _, rel, _ in LABELLED]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not (r / "routellm" / "mmlu").is_dir():
        raise ValueError(f"public data not found under {data}: missing {', '.join(missing) or 'routellm/mmlu'}")
    records = conv.convert("routellm-gsm8k", files[0])
    records += conv.convert("routellm-mmlu", r / "routellm" / "mmlu")
    records += conv.convert("routellm-mt-bench", r / "routellm" / "mt_bench")
    records += conv.convert("llmrouter", files[1])
    records += conv.convert("llmrouter", files[2])
    seed = read_outcomes(SEED)
    for rec in seed:  # a few hundred hand-written, chat-style prompts beside ~21k benchmark prompts
        rec.weight = SEED_WEIGHT
    records += seed
    if labelled:
        for source, rel, weight in LABELLED:
            recs = half(read_labelled(source, data / "prompts" / rel), "train")
            for rec in recs:
                rec.weight = weight
            records += recs
    aliases = {m: [a] for m, a in conv.llmrouter_aliases(files[5]).items() if a != m}
    files += sorted((r / "routellm" / "mmlu").glob("*.csv"))
    return records, aliases, files


def build_default(data: Path, out: Path, distill: bool = False, clusters: int = 4096,
                  embedder_dir: str | None = None) -> Path:
    records, aliases, files = default_records(data)
    if distill:
        from concilium.router.distill import distill_static

        embedder = distill_static(None, clusters or None)
    else:
        embedder = load_embedder(embedder_dir)
    meta = {
        "data": {
            "licenses": "RouteLLM Apache-2.0, LLMRouter MIT, Arena-Hard v2 Apache-2.0 (train half), "
                        "MATH MIT (train half), project seed prompts",
            "files": file_sha256(files),
            "n_records": len(records),
        },
    }
    artifact, report = train(records, embedder, TrainConfig(), aliases, meta, progress=True)
    log.info("default artifact: %d records, heads for %s", report.n_records, ", ".join(report.models))
    artifact.save(out)
    build_default_verifier(data, out)
    return out


def build_default_verifier(data: Path, out: Path) -> Path:
    """Train the shipped answer verifier into `out` (beside the router's files, which it leaves alone).

    Examples: both models' responses in RouteLLM's GSM8K file (Apache-2.0), contaminated prompts
    dropped, graded numerically against GSM8K's reference answers (MIT) where the file's own
    last-digits grading would mark answers such as "$18.00" wrong.
    """
    from concilium.router.cascade.grading import numeric_grade
    from concilium.router.cascade.verifier import train_verifier

    csv_path = data / "routing" / "routellm" / "gsm8k_responses.csv"
    ref_path = data / "prompts" / "gsm8k" / "test.jsonl"
    missing = [str(p) for p in (csv_path, ref_path) if not p.is_file()]
    if missing:
        raise ValueError(f"public data not found under {data}: missing {', '.join(missing)}")
    records = conv.convert("routellm-gsm8k", csv_path, reference=ref_path)
    for r in records:
        if r.reference is not None:
            r.scores = {m: numeric_grade(text, r.reference) for m, text in r.responses.items()}
    meta = {"data": {"licenses": "RouteLLM Apache-2.0 (responses, contaminated prompts dropped), GSM8K MIT "
                                 "(reference answers)",
                     "files": file_sha256([csv_path, ref_path]), "n_records": len(records),
                     "labels": "numeric grading against GSM8K's reference answers"}}
    ver = train_verifier(records, meta=meta)
    log.info("default verifier: %s", ver.meta["training"])
    return ver.save(out)
