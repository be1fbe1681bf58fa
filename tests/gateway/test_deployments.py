"""One model in front of three replicas (three fake upstreams): requests balance by in-flight count,
a failing replica is taken out (and skipped within the request, before any other model is tried),
a slow one gets less of the load, and the model survives a replica dying."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from concilium.policy.loader import PolicyError, parse_policy
from concilium.policy.schema import Deployment, DeploymentHealth
from concilium.specialists.deployments import Balancer
from tests.support import FakeUpstream

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def replicas():
    ups = [FakeUpstream.start() for _ in range(3)]
    yield ups
    for u in ups:
        u.stop()


def policy(fast: str, failing: str, slow: str, backup: str) -> str:
    return f"""
version: 1
models:
  svc:
    provider: openai
    model: svc
    deployments:
      - {{base_url: "{fast}"}}
      - {{base_url: "{failing}"}}
      - {{base_url: "{slow}", model: svc-slow}}
    deployment_health: {{failures: 1, cooldown_s: 600, check_s: 60}}
    fallbacks: [backup]
  backup: {{provider: openai, base_url: "{backup}", model: backup}}
routes:
  - name: main
    targets: [svc]
retry: {{attempts: 0}}
"""


def test_three_replicas_one_failing_one_slow_one_dying(replicas, upstream, gateway_factory):
    fast, failing, slow = replicas
    failing.default("svc", {"status": 500})
    slow.default("svc-slow", {"delay_s": 1.5})
    gw = gateway_factory(policy(fast.url, failing.url, slow.url, upstream.url))
    client = gw.client()

    def ask(_):
        r = client.chat.completions.with_raw_response.create(model="svc", messages=MSG, max_tokens=1)
        return r.headers["x-concilium-model"]

    with ThreadPoolExecutor(6) as pool:
        answered = list(pool.map(ask, range(30)))
    assert answered == ["svc"] * 30  # every request answered by the model itself
    assert upstream.stats()["requests"] == 0  # the failing replica was skipped, not the model: no fallback
    n_fast, n_failing, n_slow = (u.stats()["by_model"] for u in replicas)
    assert 1 <= sum(n_failing.values()) <= 6  # one failure takes it out (failures: 1); only the first wave saw it
    assert n_slow.get("svc-slow", 0) < n_fast["svc"]  # the slow replica holds its requests longer
    assert n_slow.get("svc-slow", 0) >= 1

    fast.stop()  # a replica dies: connection refused, taken out, the slow one carries the load
    answered = [ask(i) for i in range(3)]
    assert answered == ["svc"] * 3 and upstream.stats()["requests"] == 0
    with client.chat.completions.create(model="svc", messages=MSG, max_tokens=1, stream=True) as s:
        assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "hello"

    slow.default("svc-slow", {"status": 503})  # the last replica fails too: now the model's fallback answers
    r = client.chat.completions.with_raw_response.create(model="svc", messages=MSG, max_tokens=1)
    assert r.headers["x-concilium-model"] == "backup"


def test_deployments_in_the_policy_are_checked():
    base = """
version: 1
models:
  m: {provider: PROVIDER, model: m, DEPLOY}
routes: [{name: r, targets: [m]}]
"""
    ok = base.replace("PROVIDER", "openai").replace("DEPLOY", 'deployments: [{base_url: "http://a:1/v1", weight: 3}]')
    assert parse_policy(ok, "p.yaml").models["m"].deployments[0].weight == 3
    for provider, deploy, words in (
        ("openai", 'deployments: [{base_url: "ftp://a"}]', "http"),
        ("openai", 'base_url: "http://a:1/v1", deployments: [{base_url: "http://b:1/v1"}]', "not both"),
        ("litellm", 'deployments: [{base_url: "http://b:1/v1"}]', "provider 'openai' only"),
        ("openai", 'deployments: [{base_url: "http://b:1/v1", weight: 0}]', "greater than or equal to 1"),
        ("openai", "tags: []", "base_url"),
    ):
        with pytest.raises(PolicyError) as e:
            parse_policy(base.replace("PROVIDER", provider).replace("DEPLOY", deploy), "p.yaml")
        assert words in str(e.value), str(e.value)


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_balancer_picks_least_loaded_per_weight_and_honours_circuits():
    clock = Clock()
    b = Balancer([Deployment(base_url="http://a/v1"), Deployment(base_url="http://b/v1", weight=2)],
                 DeploymentHealth(failures=2, cooldown_s=10, check_s=None), None, clock)
    a, bb = b.replicas
    picks = []
    for _ in range(3):
        r = b.pick()
        b.started(r)
        picks.append(r.index)
    assert sorted(picks) == [0, 1, 1]  # weight 2 takes two of three concurrent requests
    for r in list(b.replicas) + [bb]:
        b.finished(r, True)
    b.started(a)
    b.finished(a, False, "boom")
    assert b.pick(exclude={bb}) is a  # one failure of two: still in
    b.started(a)
    b.finished(a, False, "boom")
    assert b.pick(exclude={bb}) is None and "circuit open" in b.unavailable()
    clock.t = 11  # cooldown over: one trial call at a time
    assert b.pick(exclude={bb}) is a and b.pick(exclude={bb}) is None
    b.started(a)
    b.finished(a, True)
    assert b.pick(exclude={bb}) is a and a.open_until == 0
    a.healthy = False  # a failed health probe takes it out too
    assert b.pick() is bb and "health check failed" in b.unavailable()


def test_health_probes_take_a_dead_replica_out_and_bring_it_back(fake_upstream):
    import asyncio

    import aiohttp

    from tests.support import free_port

    async def run():
        dead = f"http://127.0.0.1:{free_port()}/v1"
        b = Balancer([Deployment(base_url=fake_upstream.url), Deployment(base_url=dead)],
                     DeploymentHealth(check_s=None), None)
        async with aiohttp.ClientSession() as session:
            await b.probe(session)
            live, gone = b.replicas
            assert live.healthy and not gone.healthy
            assert {b.pick().index for _ in range(4)} == {0}
            gone.spec = Deployment(base_url=fake_upstream.url)  # the replica is back
            await b.probe(session)
            assert gone.healthy and {b.pick().index for _ in range(4)} == {0, 1}

    asyncio.run(run())
