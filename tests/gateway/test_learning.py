"""The online router through real gateways: decisions are logged, feedback teaches the learner in
shadow, `concilium router promote` makes it route without a restart, `rollback` undoes it, and two
gateways sharing a Redis learn as one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.guard.support import RedisServer
from tests.support import ROOT, wait_until

MATH = "Solve for x: 3x + 7 = 22. Show each algebra step."


def policy(url: str, explore: float = 0.0) -> str:
    return f"""
version: 1
models:
  cheap: {{provider: openai, base_url: "{url}", model: cheap-up, tier: small, price: {{input: 0.1, output: 0.2}}}}
  strong: {{provider: openai, base_url: "{url}", model: strong-up, tier: large, price: {{input: 5, output: 10}}}}
router:
  virtual_models: [concilium/auto]
  objective: {{kind: min_cost, quality_ratio: 0.6}}
  learning: {{enabled: true, explore: {explore}}}
routes:
  - name: main
    targets: [cheap, strong]
retry: {{attempts: 0}}
"""


def ask(gw, text: str = MATH) -> httpx.Response:
    r = httpx.post(gw.v1 + "/chat/completions", timeout=20,
                   json={"model": "concilium/auto", "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r


def plan(gw, text: str = MATH) -> dict:
    code, body = gw.post("/v1/route", {"model": "concilium/auto", "messages": [{"role": "user", "content": text}]})
    assert code == 200
    return body


def feedback(gw, rid: str, score: float) -> dict:
    r = httpx.post(gw.v1 + "/feedback", json={"request_id": rid, "score": score}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def router_cli(gw, *args: str) -> str:
    env = {**gw.env, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "concilium.cli", "router", *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def teach(gw, n: int = 12) -> None:
    """`cheap` answers badly, every time: scores of 0."""
    for _ in range(n):
        r = ask(gw)
        assert r.headers["x-concilium-model"] == "cheap"
        assert feedback(gw, r.headers["x-request-id"], 0.0)["learned"] is True


def test_shadow_learning_then_promotion_and_rollback(fake_upstream, upstream, gateway_factory):
    gw = gateway_factory(policy(fake_upstream.url))
    first = plan(gw)
    assert first["candidates"][0]["model"] == "cheap" and first["decision"]["live"] == "static"
    assert first["decision"]["choices"] == {"static": "cheap", "learner": "cheap"}  # no evidence: same pick
    r = ask(gw)
    assert r.headers["x-concilium-router"].startswith("static (20")  # the trained artifact's date
    teach(gw)
    status = httpx.get(gw.v1 + "/router/learning").json()
    assert status["live"] == "static" and status["models"] == {"cheap": 12}
    after = plan(gw)
    assert after["candidates"][0]["model"] == "cheap"  # in shadow: the trained router still routes
    assert after["decision"]["choices"]["learner"] == "strong"
    assert any("the learner in shadow would pick strong" in x for x in after["reasons"])

    # the decision log: one line per routed request, with its context, choice and propensity
    log = [json.loads(x) for x in Path(gw.env["CONCILIUM_DATA_DIR"], "decisions.jsonl").read_text().splitlines()]
    assert len(log) == 13 and all(d["chosen"] == "cheap" and d["propensity"] == 1.0 for d in log)
    assert len(log[0]["x"]) == 9 and log[0]["status"] == 200 and log[0]["answered_by"] == "cheap"
    assert "messages" not in log[0] and MATH not in json.dumps(log[0])  # never the prompt
    out = router_cli(gw, "evaluate-offline")
    assert "12 rewarded decisions of 13 logged" in out

    assert "learner router live" in router_cli(gw, "promote", "--reason", "test")
    wait_until(lambda: ask(gw).headers["x-concilium-model"] == "strong", 15, "the learner to route")
    r = ask(gw)
    assert r.headers["x-concilium-router"].startswith("learner (12 events)")
    assert httpx.get(gw.v1 + "/router/learning").json()["live"] == "learner"
    assert "concilium_router_learner_live 1.0" in httpx.get(gw.base_url + "/metrics").text

    router_cli(gw, "rollback")
    wait_until(lambda: ask(gw).headers["x-concilium-model"] == "cheap", 15, "the trained router to route again")
    versions = router_cli(gw, "versions")
    assert "static router live" in versions and "learner live: test" in versions and "static live: manual rollback" in versions


def test_exploration_has_known_propensities(fake_upstream, upstream, gateway_factory):
    gw = gateway_factory(policy(fake_upstream.url, explore=0.2))
    seen = {}
    for _ in range(100):
        d = plan(gw)["decision"]
        seen[(d["chosen"], d["explored"])] = d["propensity"]
    assert seen.get(("cheap", False)) == pytest.approx(0.8 + 0.1)
    assert seen.get(("strong", True)) == pytest.approx(0.1)  # 100 draws: P(never) = 0.9 ** 100 < 3e-5


def test_two_gateways_sharing_redis_learn_as_one(fake_upstream, upstream, gateway_factory, tmp_path):
    srv = RedisServer.start(tmp_path / "redis")
    try:
        env = {"CONCILIUM_REDIS_URL": srv.url}
        a, b = gateway_factory(policy(fake_upstream.url), env=env), gateway_factory(policy(fake_upstream.url), env=env)
        teach(a)
        wait_until(lambda: httpx.get(b.v1 + "/router/learning").json()["events"] == 12, 15,
                   "the other gateway to read the shared sums")
        assert plan(b)["decision"]["choices"]["learner"] == "strong"
        router_cli(a, "promote")
        wait_until(lambda: ask(b).headers["x-concilium-model"] == "strong", 15, "the other gateway to follow")
    finally:
        srv.kill()


def test_automatic_promotion_and_rollback(fake_upstream, upstream, gateway_factory):
    text = policy(fake_upstream.url).replace("learning: {enabled: true, explore: 0.0}",
                                             "learning: {enabled: true, explore: 0.0, promote: auto, min_events: 10}")
    gw = gateway_factory(text)
    teach(gw, 10)  # the learner, in shadow, expects `strong` to do better than the 0s `cheap` earns
    status = httpx.get(gw.v1 + "/router/learning").json()
    assert status["live"] == "learner", status
    assert ask(gw).headers["x-concilium-model"] == "strong"
    for _ in range(30):  # now everything scores 0: the live learner is no better than the static router
        r = ask(gw)
        feedback(gw, r.headers["x-request-id"], 0.0)
        if httpx.get(gw.v1 + "/router/learning").json()["live"] == "static":
            break
    assert httpx.get(gw.v1 + "/router/learning").json()["live"] == "static"
    history = router_cli(gw, "versions")
    assert "learner live: auto: learner DR lower bound" in history and "static live: auto rollback" in history
