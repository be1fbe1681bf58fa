"""Privacy routing: the PII verdict the policy routes on, and keeping PII away from models it forbids.

Detection runs only when the policy asks for it (a route that matches on `pii`, or `privacy.on_pii`),
so a policy without privacy rules pays one dictionary lookup per request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from concilium.core.plan import RoutePlan, Skipped
from concilium.guard import logs
from concilium.guard.pii import findings, prompt_text, redact
from concilium.guard.schema import Privacy, parse_privacy
from concilium.policy.schema import Policy
from concilium.settings import get_settings

log = logging.getLogger("concilium.privacy")


@dataclass(frozen=True)
class PrivacyRules:
    config: Privacy
    detect: bool  # does any rule need the verdict?
    allowed: frozenset[str]  # models that may see PII (when on_pii is set)
    log_prompts: bool  # privacy.log_prompts or CONCILIUM_LOG_PROMPTS


_cache: dict[int, tuple[Policy, PrivacyRules]] = {}


def rules(policy: Policy, file: str = "policy") -> PrivacyRules:
    hit = _cache.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    cfg = parse_privacy(policy.privacy, file)
    allowed: set[str] = set()
    if cfg.on_pii is not None:
        for name, spec in policy.models.items():
            if set(spec.tags) & set(cfg.on_pii.allow_tags) or spec.provider in cfg.on_pii.allow_providers:
                allowed.add(name)
    detect = cfg.on_pii is not None or any(r.match.pii is not None for r in policy.routes)
    out = PrivacyRules(cfg, detect, frozenset(allowed), cfg.log_prompts or get_settings().log_prompts)
    if len(_cache) > 16:
        _cache.clear()
    _cache[id(policy)] = (policy, out)
    logs.configure(cfg.redact_logs)
    return out


def verdict(body: dict[str, Any], policy: Policy, rid: str = "") -> bool | None:
    """True/False when the policy routes on PII, else None (nothing was scanned)."""
    r = rules(policy)
    if r.log_prompts:
        text = prompt_text(body)
        log.info("prompt %s: %s", rid, redact(text) if r.config.redact_logs else text)
    if not r.detect:
        return None
    return bool(findings(prompt_text(body), r.config.detect, first_only=True))


def restrict(plan: RoutePlan, policy: Policy, pii: bool | None) -> RoutePlan:
    """With `privacy.on_pii`, a prompt with PII may only reach the allowed models (fallbacks too)."""
    r = rules(policy)
    if not pii or r.config.on_pii is None:
        return plan
    keep = [c for c in plan.candidates if c.model in r.allowed]
    if len(keep) == len(plan.candidates):
        return plan
    why = "the prompt contains PII and privacy.on_pii keeps it on " + _allowed_words(r)
    dropped = [Skipped(model=c.model, reason=why) for c in plan.candidates if c.model not in r.allowed]
    reasons = list(plan.reasons)
    if keep:
        reasons[0] = f"chose {keep[0].model}" if reasons and reasons[0].startswith("chose ") else reasons[0]
    reasons.append("privacy: dropped " + ", ".join(s.model for s in dropped))
    return plan.model_copy(update={"candidates": keep, "skipped": plan.skipped + dropped, "reasons": reasons})


def _allowed_words(r: PrivacyRules) -> str:
    on = r.config.on_pii
    parts = []
    if on and on.allow_tags:
        parts.append("models tagged " + "/".join(on.allow_tags))
    if on and on.allow_providers:
        parts.append("providers " + "/".join(on.allow_providers))
    return " or ".join(parts) or "no model"
