"""Build a scorer from its description in a policy (a name, or a mapping with options).

    "verifier"                                      the trained verifier shipped with the default artifact
    {"name": "verifier", "artifact": "DIR"}         a verifier trained by `concilium router train`
    "verifier-rules"                                 the untrained rules (`RulesVerifier`)
    {"name": "logprobs", "how": "quantile", "q": 0.1, "missing": 0.0}
    {"name": "agreement", "kind": "number", "alone": 0.5}
    {"name": "checks", "checks": ["response_format", "tool_calls", "python"]}
    {"combine": "min" | "mean" | "max" | "product" | "weighted", "of": [SPEC, ...], "weights": [...]}

Errors are `ScorerSpecError` with the path inside the spec (e.g. `of[1].how`), so a policy
checker can report where the problem is. Loaded verifiers are cached per folder.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from concilium.router.cascade.agreement import AgreementScorer
from concilium.router.cascade.base import COMBINE_MODES, Combined, Scorer
from concilium.router.cascade.checks import ChecksScorer
from concilium.router.cascade.logprobs import LogprobScorer
from concilium.router.cascade.verifier import RulesVerifier, Verifier, VerifierError, load_verifier

SCORERS = ("verifier", "verifier-rules", "logprobs", "agreement", "checks")
_OPTIONS = {
    "verifier": ("artifact",),
    "verifier-rules": ("base", "wrong_arithmetic", "non_integer", "no_final", "truncated"),
    "logprobs": ("how", "q", "missing", "skip_whitespace"),
    "agreement": ("kind", "alone"),
    "checks": ("checks",),
}
_cache: dict[str, Verifier] = {}
_lock = threading.Lock()


class ScorerSpecError(ValueError):
    def __init__(self, path: str, msg: str) -> None:
        super().__init__(f"{path}: {msg}" if path else msg)
        self.path, self.msg = path, msg


def cached_verifier(artifact: str | Path | None = None) -> Verifier:
    key = str(Path(artifact).expanduser().resolve()) if artifact else ""
    with _lock:
        v = _cache.get(key)
        if v is None:
            v = load_verifier(Path(key) if key else None)
            _cache[key] = v
        return v


def build_scorer(spec: Any, path: str = "") -> Scorer:
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise ScorerSpecError(path, f"expected a scorer name or mapping, got {type(spec).__name__}")
    if "combine" in spec:
        how = spec["combine"]
        if how not in COMBINE_MODES:
            raise ScorerSpecError(f"{path}.combine" if path else "combine",
                                  f"unknown combine mode {how!r}; known: {', '.join(COMBINE_MODES)}")
        parts = spec.get("of")
        if not isinstance(parts, list) or not parts:
            raise ScorerSpecError(f"{path}.of" if path else "of", "combine needs a non-empty list `of` scorers")
        unknown = set(spec) - {"combine", "of", "weights"}
        if unknown:
            raise ScorerSpecError(path, f"unknown key {sorted(unknown)[0]!r} in combine")
        scorers = [build_scorer(s, f"{path}.of[{i}]" if path else f"of[{i}]") for i, s in enumerate(parts)]
        try:
            return Combined(scorers, how, spec.get("weights"))
        except (ValueError, TypeError) as e:
            raise ScorerSpecError(f"{path}.weights" if path else "weights", str(e)) from None
    name = spec.get("name")
    if name not in SCORERS:
        raise ScorerSpecError(f"{path}.name" if path else "name",
                              f"unknown scorer {name!r}; known: {', '.join(SCORERS)} (or combine)")
    opts = {k: v for k, v in spec.items() if k != "name"}
    for k in opts:
        if k not in _OPTIONS[name]:
            known = ", ".join(_OPTIONS[name]) or "none"
            raise ScorerSpecError(f"{path}.{k}" if path else k, f"unknown option of {name}; known: {known}")
    try:
        if name == "verifier":
            return cached_verifier(opts.get("artifact"))
        if name == "verifier-rules":
            return RulesVerifier(**opts)
        if name == "logprobs":
            return LogprobScorer(**opts)
        if name == "agreement":
            return AgreementScorer(**opts)
        return ChecksScorer(opts.get("checks", ("response_format", "tool_calls", "python")))
    except VerifierError as e:
        raise ScorerSpecError(f"{path}.artifact" if path else "artifact", str(e)) from None
    except (ValueError, TypeError) as e:
        raise ScorerSpecError(path, f"{name}: {e}") from None  # the scorer at `path` refused its options
