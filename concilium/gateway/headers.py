"""The x-concilium-* response headers of a planned request."""

from __future__ import annotations

from concilium.core.plan import RoutePlan


def header_value(text: str) -> str:
    """`text` as an HTTP header value: printable ASCII stays as it is, every other character and '%'
    itself become percent-encoded UTF-8 (RFC 3986), so `urllib.parse.unquote` gives `text` back.
    Header values are bytes on the wire: a name such as 'défaut-🚀' cannot go out raw."""
    if text.isascii() and text.isprintable() and "%" not in text:
        return text  # every name in a typical policy: no copy
    return "".join(ch if " " <= ch <= "~" and ch != "%" else
                   "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")) for ch in text)


def reason(plan: RoutePlan, model: str | None = None) -> str:
    """The plan's summary; when `model` answered after the candidates ahead of it failed (or were
    skipped), it says so first: the header names the model that actually answered."""
    cands = plan.candidates
    if model is None or not cands or cands[0].model == model:
        return plan.summary
    before = []
    for c in cands:
        if c.model == model:
            return f"answered by {model} after {', '.join(before)} failed; {plan.summary}"[:500]
        before.append(c.model)
    return plan.summary  # a model outside the plan (a cascade's draft has its own header)


def plan_headers(plan: RoutePlan, model: str | None = None) -> dict[str, str]:
    """The x-concilium-* headers of a planned request; names are encoded with `header_value`."""
    out = {
        "x-request-id": plan.request_id,
        "x-concilium-model": header_value(model or (plan.candidates[0].model if plan.candidates else "")),
        "x-concilium-route": header_value(plan.route),
        "x-concilium-reason": header_value(reason(plan, model)),
    }
    if plan.decision is not None:  # router.learning: which router decided
        out["x-concilium-router"] = header_value(plan.decision.version
                                                 + (" (explored)" if plan.decision.explored else ""))
    return out
