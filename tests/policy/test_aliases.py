"""Aliases in the policy: another name for a model or virtual model, checked at load and by
`policy check`, resolved by the router (pinned stays pinned, a virtual model stays routed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from concilium.policy.loader import PolicyError, parse_policy
from concilium.router.decide import DecisionError, decide

BASE = """
version: 1
models:
  gpt-4o: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: gpt-4o, fallbacks: [mini]}
  mini: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: mini}
routes:
  - name: main
    targets: [mini, gpt-4o]
router: {virtual_models: [concilium/auto], learned: false}
"""
ALIASES = "aliases: {gpt-4: gpt-4o, auto: concilium/auto}\n"


def body(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def test_an_alias_for_a_model_is_pinned_to_that_model():
    pol = parse_policy(BASE + ALIASES, "p.yaml")
    plan = decide(body("gpt-4"), pol)
    assert plan.route == "pinned" and plan.requested_model == "gpt-4o"
    assert [c.model for c in plan.candidates] == ["gpt-4o", "mini"]  # the target's own fallbacks
    assert "alias gpt-4 -> gpt-4o" in plan.reasons
    assert plan.model_dump() == {**decide(body("gpt-4o"), pol).model_dump(), "request_id": plan.request_id,
                                 "reasons": plan.reasons}


def test_an_alias_for_a_virtual_model_is_routed_and_aliases_work_as_fallbacks():
    pol = parse_policy(BASE + ALIASES, "p.yaml")
    plan = decide(body("auto"), pol)
    assert plan.route == "main" and plan.requested_model == "concilium/auto"
    plan = decide(body("mini", fallbacks=["gpt-4"]), pol)
    assert [c.model for c in plan.candidates] == ["mini", "gpt-4o"]
    with pytest.raises(DecisionError) as e:
        decide(body("gpt-5"), pol)
    assert e.value.status == 404 and "gpt-4" in e.value.message  # the error lists the aliases too


@pytest.mark.parametrize("aliases,words", [
    ("{mini: gpt-4o}", "alias 'mini' shadows a model"),
    ("{concilium/auto: gpt-4o}", "shadows a virtual model"),
    ("{gpt-4: gpt-5}", "points to 'gpt-5', which is neither a model nor a virtual model"),
    ("{gpt-4: gpt-4o, old: gpt-4}", "an alias names a model, not another alias"),
])
def test_policy_check_refuses_a_shadowing_or_dangling_alias(aliases, words, tmp_path):
    with pytest.raises(PolicyError) as e:
        parse_policy(BASE + f"aliases: {aliases}\n", "p.yaml")
    assert any(path.startswith("aliases") and words in msg for path, msg in e.value.problems), e.value.problems
    f = tmp_path / "p.yaml"
    f.write_text(BASE + f"aliases: {aliases}\n")
    run = subprocess.run([sys.executable, "-m", "concilium.cli", "policy", "check", str(f)],
                         capture_output=True, text=True)
    assert run.returncode == 1 and words in run.stdout
