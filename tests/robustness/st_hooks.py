"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS): most generated chat bodies name a model the
test policy has, so the fuzzing reaches routing, the guard and the upstream call, not only the 404."""

from __future__ import annotations

import random

import schemathesis

MODELS = ["cheap", "private", "concilium/auto"]
_rng = random.Random(7)


@schemathesis.hook
def map_body(context, body):
    path = getattr(getattr(context, "operation", None), "path", "")
    if path in ("/v1/chat/completions", "/v1/route") and isinstance(body, dict) and _rng.random() < 0.8:
        body["model"] = _rng.choice(MODELS)
    return body
