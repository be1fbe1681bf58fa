"""The policy's jobs section and the routing rule that makes a request a background job."""

from __future__ import annotations

import pytest

from concilium.core.plan import Prediction
from concilium.policy.loader import PolicyError, parse_policy
from concilium.router.decide import decide

BASE = """
version: 1
models:
  a: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: a}
  b: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: b}
router: {virtual_models: [concilium/auto], learned: false}
routes:
  - name: batch
    match: {metadata: {lane: batch}}
    targets: [b]
    mode: background
    queue: low
    soft_timeout_s: 30
    hard_timeout_s: 60
  - name: main
    targets: [a, b]
"""


def policy(jobs: str = "", routes_extra: str = ""):
    return parse_policy(BASE + routes_extra + (f"jobs:\n{jobs}" if jobs else ""), "p.yaml")


def problems(jobs: str, routes_extra: str = "") -> list[tuple[str, str]]:
    with pytest.raises(PolicyError) as e:
        policy(jobs, routes_extra)
    assert e.value.file == "p.yaml"
    return e.value.problems


def test_defaults_and_route_timeouts():
    cfg = policy().jobs
    assert cfg.queues == ["high", "default", "low"] and cfg.chat_wait_s == 10
    pol = policy()
    assert cfg.timeouts(pol.routes[0]) == (30, 60)
    assert cfg.timeouts(pol.routes[1]) == (600, 900)
    assert cfg.timeouts(None) == (600, 900)
    short = policy("  soft_timeout_s: 100\n  hard_timeout_s: 200\n").jobs
    assert short.timeouts(pol.routes[0]) == (30, 60)
    hard_only = pol.routes[0].model_copy(update={"soft_timeout_s": None, "hard_timeout_s": 50})
    assert short.timeouts(hard_only) == (None, 50)  # the soft timeout would come after the hard one


def test_queue_choice():
    cfg = policy().jobs
    assert cfg.queue_for("low") == "low"
    assert cfg.queue_for(None) == "default"
    assert cfg.queue_for(None, "priority") == "high" and cfg.queue_for(None, "flex") == "low"


def test_caps_per_key():
    cfg = policy("  max_active_per_key: 4\n  per_key: {batch-team: 100}\n").jobs
    assert cfg.cap_for("batch-team") == 100 and cfg.cap_for("anyone") == 4


@pytest.mark.parametrize("jobs, where, says", [
    ("  queues: [high, high]\n", "jobs.queues[1]", "listed twice"),
    ("  queues: ['bad name']\n", "jobs.queues[0]", "letters, digits"),
    ("  default_queue: nope\n", "jobs.default_queue", "not one of queues"),
    ("  soft_timeout_s: 900\n  hard_timeout_s: 100\n", "jobs.soft_timeout_s", "below hard_timeout_s"),
    ("  chat_wait: 3\n", "jobs.chat_wait", "unknown key"),
    ("  max_active_per_key: 0\n", "jobs.max_active_per_key", "greater than or equal to 1"),
    ("  divert: {min_difficulty: 2}\n", "jobs.divert.min_difficulty", "less than or equal to 1"),
    ("  per_key: {x: 0}\n", "jobs.per_key.x", "at least 1"),
    ("  queues: [high, default]\n", "routes[0].queue", "unknown queue 'low'"),
])
def test_errors_name_the_key_path(jobs, where, says):
    found = problems(jobs)
    assert any(path == where and says in msg for path, msg in found), found


def test_route_soft_timeout_must_come_before_its_hard_timeout():
    bad = """  - name: odd
    match: {metadata: {lane: odd}}
    targets: [a]
    soft_timeout_s: 10
    hard_timeout_s: 5
"""
    found = problems("  chat_wait_s: 1\n", bad)
    assert ("routes[2].soft_timeout_s", "must be below hard_timeout_s (5)") in found


def test_a_policy_never_holds_an_invalid_section():
    import yaml
    from pydantic import ValidationError

    from concilium.policy.schema import Policy

    # The section is typed: a Policy object (which the hot path reads as is) cannot be built with it.
    with pytest.raises(ValidationError):
        Policy.model_validate(yaml.safe_load(BASE + "jobs:\n  queues: [x, x]\n"))
    with pytest.raises(PolicyError):
        policy("  queues: [x, x]\n")


class _Predicts:
    """A dispatcher that predicts fixed numbers (the router's learned part is tested elsewhere)."""

    def __init__(self, difficulty=None, output_tokens=None):
        self.p = Prediction(difficulty=difficulty, output_tokens=output_tokens)

    def predict(self, body, policy):
        return self.p.model_copy()

    def rank(self, candidates, prediction, policy, body):
        return [], None, "none"


def _mode(body, pol=None, dispatcher=None):
    plan = decide({"model": "concilium/auto", "messages": [{"role": "user", "content": "hi"}], **body},
                  pol or policy(), dispatcher=dispatcher)
    return plan.mode, plan.reasons


@pytest.mark.parametrize("body, why", [
    ({"background": True}, "the client asked for background"),
    ({"reasoning_effort": "high"}, "reasoning_effort=high"),
    ({"reasoning": {"effort": "high"}}, "reasoning_effort=high"),
    ({"metadata": {"lane": "batch"}}, "route batch runs in the background"),
])
def test_what_becomes_a_job(body, why):
    mode, reasons = _mode(body)
    assert mode == "background" and f"background: {why}" in reasons


def test_interactive_by_default_and_when_the_policy_says_so():
    assert _mode({})[0] == "interactive"
    assert _mode({"reasoning_effort": "medium"})[0] == "interactive"
    off = policy("  divert: {background: false, reasoning_effort: []}\n")
    assert _mode({"background": True}, off)[0] == "interactive"
    assert _mode({"reasoning_effort": "high"}, off)[0] == "interactive"


def test_predicted_difficulty_and_length_thresholds():
    pol = policy("  divert: {min_difficulty: 0.8, min_output_tokens: 2000}\n")
    mode, reasons = _mode({}, pol, _Predicts(difficulty=0.85))
    assert mode == "background" and any("predicted difficulty 0.85 >= 0.8" in r for r in reasons)
    assert _mode({}, pol, _Predicts(difficulty=0.5))[0] == "interactive"
    mode, reasons = _mode({}, pol, _Predicts(difficulty=0.1, output_tokens=2500))
    assert mode == "background" and any("predicted output 2500 tokens" in r for r in reasons)
    assert _mode({}, policy(), _Predicts(difficulty=0.99, output_tokens=1e6))[0] == "interactive"


def test_pinned_model_follows_its_route():
    plan = decide({"model": "b", "messages": [{"role": "user", "content": "x"}]}, policy())
    assert plan.mode == "background" and plan.queue == "low"
