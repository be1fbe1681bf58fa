"""The learned dispatcher as the gateway uses it: `load_dispatcher`, `Dispatcher.predict`, `.rank`.

`predict` reads the request text, predicts the category, difficulty and answer length, and gives
every model in the policy a predicted quality: from the artifact's trained heads when it knows the
model (matched by policy name, `options.router_model` or the upstream model id), otherwise a prior
from the model's declared tier, price and tags (`priors.py`). `rank` orders candidates by the
policy's objective (`objective.py`) with a cost estimate for each.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from concilium.core.plan import Prediction
from concilium.policy.pricing import estimate_usd, prompt_tokens
from concilium.policy.schema import Policy, RouterConfig
from concilium.router.artifact import DIFFICULTY_LABELS, Artifact, ArtifactError
from concilium.router.objective import apply_objective, requested_output_tokens
from concilium.router.predictor import Predictor
from concilium.router.priors import prior_quality
from concilium.router.text import prompt_chars, request_text

log = logging.getLogger(__name__)

DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "default"


def normalise_model_name(name: str) -> str:
    return name.strip().lower()


def _name_keys(name: str) -> list[str]:
    """`openai/GPT-4o` -> ['openai/gpt-4o', 'gpt-4o']."""
    n = normalise_model_name(name)
    tail = n.rsplit("/", 1)[-1]
    return [n] if tail == n else [n, tail]


class Dispatcher:
    def __init__(self, artifact: Artifact, source: str = "") -> None:
        self.artifact = artifact
        self.source = source
        self.predictor = Predictor(artifact)
        self._index: dict[str, int] = {}
        for i, entry in enumerate(artifact.models):
            for alias in [entry.name, *entry.aliases]:
                for key in _name_keys(alias):
                    self._index.setdefault(key, i)
        cats = artifact.categories
        self._out_tokens = np.array([artifact.output_tokens.get(c, 256.0) for c in cats], dtype=np.float32)
        self._maps: dict[int, tuple[Policy, dict[str, int | None]]] = {}
        self._lock = threading.Lock()

    # --- model matching -------------------------------------------------------------------------
    def match(self, name: str, policy: Policy) -> int | None:
        """Index of the artifact model standing for the policy model `name`, or None."""
        spec = policy.models.get(name)
        tries = [name]
        if spec is not None:
            alias = spec.options.get("router_model")
            if isinstance(alias, str):
                tries.insert(0, alias)
            tries.append(spec.model)
        for t in tries:
            for key in _name_keys(t):
                if key in self._index:
                    return self._index[key]
        return None

    def model_map(self, policy: Policy) -> dict[str, int | None]:
        cached = self._maps.get(id(policy))
        if cached is not None and cached[0] is policy:
            return cached[1]
        mapping = {name: self.match(name, policy) for name in policy.models}
        with self._lock:
            if len(self._maps) > 8:
                self._maps.clear()
            self._maps[id(policy)] = (policy, mapping)
        return mapping

    # --- prediction -----------------------------------------------------------------------------
    def predict(self, body: dict[str, Any], policy: Policy) -> Prediction:
        text, turns = request_text(body)
        out = self.predictor.forward(self.predictor.features(text, max(turns, 1)))
        cats = self.artifact.categories
        cat_probs = {c: round(float(p), 4) for c, p in zip(cats, out.category, strict=True)}
        difficulty = out.difficulty_value
        quality: dict[str, float] = {}
        for name, idx in self.model_map(policy).items():
            if idx is not None:
                quality[name] = round(float(out.quality[idx]), 4)
            else:
                quality[name] = round(prior_quality(policy.models[name], cat_probs, difficulty), 4)
        return Prediction(
            category=cats[int(np.argmax(out.category))],
            category_probs=cat_probs,
            difficulty=round(difficulty, 4),
            difficulty_label=DIFFICULTY_LABELS[int(np.argmax(out.difficulty))],
            difficulty_probs={k: round(float(p), 4) for k, p in zip(DIFFICULTY_LABELS, out.difficulty, strict=True)},
            quality=quality,
            output_tokens=round(float(out.category @ self._out_tokens), 1),
        )

    # --- ranking --------------------------------------------------------------------------------
    def output_tokens(self, body: dict[str, Any], prediction: Prediction, policy: Policy) -> float:
        n = requested_output_tokens(body)
        if n is not None:
            return float(n)
        if prediction.output_tokens is not None:
            return float(prediction.output_tokens)
        return float(policy.router.default_output_tokens)

    def rank(
        self, candidates: list[str], prediction: Prediction, policy: Policy, body: dict[str, Any]
    ) -> tuple[list[tuple[str, float, float, str]], float | None, str]:
        messages = body.get("messages")
        n_in = prompt_tokens(prompt_chars(body), len(messages) if isinstance(messages, list) else 1)
        n_out = self.output_tokens(body, prediction, policy)
        items = []
        for name in candidates:
            spec = policy.models[name]
            q = prediction.quality.get(name)
            if q is None:
                q = prior_quality(spec, prediction.category_probs, prediction.difficulty or 0.5)
            items.append((name, float(q), round(estimate_usd(spec, n_in, n_out), 10)))
        return apply_objective(items, policy.router.objective)


def load_dispatcher(cfg: RouterConfig, policy: Policy) -> Dispatcher | None:
    """The dispatcher for a policy, or None (with the reason logged) when it is off or unloadable."""
    if not cfg.learned:
        log.info("learned router disabled by the policy (router.learned: false)")
        return None
    path = Path(cfg.artifact).expanduser() if cfg.artifact else DEFAULT_ARTIFACT
    t0 = time.perf_counter()
    try:
        artifact = Artifact.load(path)
    except ArtifactError as e:
        log.warning("learned router off: %s", e)
        return None
    except OSError as e:
        log.warning("learned router off: cannot read %s (%s)", path, e)
        return None
    d = Dispatcher(artifact, str(path))
    mapping = d.model_map(policy)
    known = [f"{n}={artifact.models[i].name}" for n, i in mapping.items() if i is not None]
    priors = [n for n, i in mapping.items() if i is None]
    log.info(
        "learned router loaded from %s in %.0f ms; trained predictors: %s; priors from tier/price/tags: %s",
        path,
        (time.perf_counter() - t0) * 1e3,
        ", ".join(known) or "none",
        ", ".join(priors) or "none",
    )
    return d
