"""Privacy routing: the PII verdict the policy routes on, and keeping PII away from models it forbids.

Detection runs only when the policy asks for it (a route that matches on `pii`, or `privacy.on_pii`),
so a policy without privacy rules pays one attribute lookup per request.
"""

from __future__ import annotations

import logging
from typing import Any

from concilium.core.plan import RoutePlan, Skipped
from concilium.guard import logs
from concilium.guard.pii import findings, prompt_text, redact
from concilium.pipeline.compose import downgraded
from concilium.policy.privacy import Privacy
from concilium.policy.schema import Policy

log = logging.getLogger("concilium.privacy")
_process = {"log_prompts": False}  # CONCILIUM_LOG_PROMPTS, set once by `configure`


def configure(log_prompts: bool) -> None:
    """The process's settings: log every prompt whatever the policy says (CONCILIUM_LOG_PROMPTS)."""
    _process["log_prompts"] = log_prompts


def verdict(body: dict[str, Any], policy: Policy, rid: str = "") -> bool | None:
    """True/False when the policy routes on PII, else None (nothing was scanned)."""
    cfg = policy.privacy
    if logs.redacting() != cfg.redact_logs:  # a reloaded policy switched redaction
        logs.configure(cfg.redact_logs)
    if cfg.log_prompts or _process["log_prompts"]:
        text = prompt_text(body)
        log.info("prompt %s: %s", rid, redact(text) if cfg.redact_logs else text)
    if not policy.routes_on_pii:
        return None
    return bool(findings(prompt_text(body), cfg.detect, first_only=True))


def restrict(plan: RoutePlan, policy: Policy, pii: bool | None) -> RoutePlan:
    """With `privacy.on_pii`, a prompt with PII may only reach the allowed models (fallbacks too)."""
    cfg = policy.privacy
    if not pii or cfg.on_pii is None:
        return plan
    def may(model: str) -> bool:
        spec = policy.models.get(model)
        return spec is not None and cfg.may_see_pii(spec)

    why = "the prompt contains PII and privacy.on_pii keeps it on " + _allowed_words(cfg)
    if plan.strategy in ("fusion", "chain") and not all(may(m) for m in
                                                         [*(s.model for s in plan.steps), *plan.pending_models]):
        plan = downgraded(plan, "a step's model may not see this prompt (" + why + ")")
    if any(s.action != "skip" and not may(s.model) for s in plan.cascade):
        cascade = [s if s.action == "skip" or may(s.model) else s.model_copy(update={"action": "skip", "reason": why})
                   for s in plan.cascade]
        live = any(s.action != "skip" for s in cascade)
        plan = plan.model_copy(update={"cascade": cascade, "strategy": "cascade" if live else "single"})
    allowed = {c.model for c in plan.candidates if may(c.model)}
    keep = [c for c in plan.candidates if c.model in allowed]
    if len(keep) == len(plan.candidates):
        return plan
    dropped = [Skipped(model=c.model, reason=why) for c in plan.candidates if c.model not in allowed]
    reasons = list(plan.reasons)
    if keep:
        reasons[0] = f"chose {keep[0].model}" if reasons and reasons[0].startswith("chose ") else reasons[0]
    reasons.append("privacy: dropped " + ", ".join(s.model for s in dropped))
    return plan.model_copy(update={"candidates": keep, "skipped": plan.skipped + dropped, "reasons": reasons})


def _allowed_words(cfg: Privacy) -> str:
    on = cfg.on_pii
    parts = []
    if on and on.allow_tags:
        parts.append("models tagged " + "/".join(on.allow_tags))
    if on and on.allow_providers:
        parts.append("providers " + "/".join(on.allow_providers))
    return " or ".join(parts) or "no model"
