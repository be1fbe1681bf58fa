"""`strategy: fusion` and `strategy: chain` through a real gateway, the openai SDK and the fault-
injecting fake upstream (which echoes the last user message, and records every request body)."""

from __future__ import annotations

import json

import httpx
import openai
import orjson
import pytest

from concilium.policy.loader import PolicyError, parse_policy
from concilium.testing.fake_upstream import _split
from tests.guard.support import make_key
from tests.support import wait_until

PRICE = {"a": (1.0, 2.0), "b": (2.0, 4.0), "c": (3.0, 6.0), "synth": (10.0, 20.0)}
Q = "Name three primary colours"


def policy(url: str, route: str, keys: str = "", learned: str = "false") -> str:
    models = "\n".join(f"  {m}: {{provider: openai, base_url: \"{url}\", model: {m}-up, "
                       f"price: {{input: {p[0]}, output: {p[1]}}}}}" for m, p in PRICE.items())
    return f"""
version: 1
models:
{models}
router: {{virtual_models: [concilium/auto], learned: {learned}}}
routes:
  - name: composed
    targets: [synth]
    rank: false
{route}
retry: {{attempts: 0}}
circuit_breaker: {{failures: 100}}  # the tests fail panelists on purpose; keep them on the panel
{keys}
"""


FUSION = """    strategy: fusion
    fusion: {panel: [a, b, c], quorum: 2, call_timeout_s: 1.5}"""


def echo(text: str) -> str:
    return "".join(_split(text.split(), 13))


def bodies(upstream, model: str) -> list[dict]:
    return [b for b in upstream.stats()["bodies"] if b.get("model") == f"{model}-up"]


def system_of(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "system")


def ask(gw, text: str = Q, **kw):
    return gw.client().chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    from tests.support import start_gateway

    g = start_gateway(policy(fake_upstream.url, FUSION), tmp_path_factory.mktemp("fusion") / "p.yaml")
    yield g
    g.stop()


def test_a_panel_answers_and_the_synthesiser_reads_every_answer(gw, upstream):
    raw = ask(gw, extra_headers={"x-concilium-explain": "true"})
    assert raw.headers["x-concilium-strategy"] == "fusion" and raw.headers["x-concilium-model"] == "synth"
    assert raw.parse().choices[0].message.content == echo(Q)
    for m in ("a", "b", "c"):  # each panelist got the client's request, as it was
        (b,) = bodies(upstream, m)
        assert b["messages"] == [{"role": "user", "content": Q}] and not b.get("stream")
    (s,) = bodies(upstream, "synth")
    assert s["messages"][-1] == {"role": "user", "content": Q}
    assert system_of(s).count(echo(Q)) == 3 and "[answer 3]" in system_of(s)
    steps = raw.http_response.json()["concilium"]["steps"]
    assert [(x["id"], x["model"], x["status"]) for x in steps] == [
        ("p1", "a", "ok"), ("p2", "b", "ok"), ("p3", "c", "ok"), ("synth", "synth", "planned")]
    n = len(Q.split())
    assert steps[1]["cost_usd"] == pytest.approx((n * 2.0 + 13 * 4.0) / 1e6)
    assert steps[3]["after"] == ["p1", "p2", "p3"]
    assert "p2 b ok" in raw.headers["x-concilium-steps"]


def test_the_route_endpoint_returns_the_dag(gw):
    code, plan = gw.post("/v1/route", {"model": "concilium/auto", "messages": [{"role": "user", "content": Q}]})
    assert code == 200 and plan["strategy"] == "fusion"
    assert [(s["role"], s["model"]) for s in plan["steps"]] == [
        ("panelist", "a"), ("panelist", "b"), ("panelist", "c"), ("synthesiser", "synth")]
    assert all(s["est_cost_usd"] > 0 for s in plan["steps"])
    assert plan["reasons"][0].startswith("fusion: 3 panel models, 3 calls, synthesised by synth")


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 429, "code": "insufficient_quota"}, {"garbage": True},
                                   {"delay_s": 3.0}])
def test_a_failing_garbled_or_slow_panelist_is_left_out(gw, upstream, fault):
    upstream.script("b-up", [fault])
    raw = ask(gw, extra_headers={"x-concilium-explain": "true"})
    assert raw.parse().choices[0].message.content == echo(Q)
    (s,) = bodies(upstream, "synth")
    assert system_of(s).count(echo(Q)) == 2 and "[answer 3]" not in system_of(s)
    p2 = raw.http_response.json()["concilium"]["steps"][1]
    assert p2["status"] == "failed" and p2["error"]
    assert "p2 b failed" in raw.headers["x-concilium-steps"]


def test_below_quorum_is_a_502_that_says_so(gw, upstream):
    upstream.script("a-up", [{"status": 500}])
    upstream.script("c-up", [{"status": 503}])
    with pytest.raises(openai.APIStatusError) as e:
        ask(gw)
    assert e.value.status_code == 502
    err = e.value.response.json()["error"]
    assert err["code"] == "composition_failed" and "fewer than quorum 2" in err["message"]
    assert bodies(upstream, "synth") == []  # no synthesis from one answer


def test_on_error_fail_fails_on_the_first_failure(fake_upstream, upstream, gateway_factory):
    g = gateway_factory(policy(fake_upstream.url, FUSION.replace("quorum: 2", "quorum: 1, on_error: fail")))
    upstream.script("c-up", [{"status": 500}])
    with pytest.raises(openai.APIStatusError) as e:
        ask(g)
    assert e.value.status_code == 502 and "on_error is fail" in e.value.response.json()["error"]["message"]


def test_streaming_reports_progress_then_streams_the_synthesis(gw, upstream):
    with httpx.stream("POST", gw.v1 + "/chat/completions", timeout=20, json={
            "model": "concilium/auto", "messages": [{"role": "user", "content": Q}], "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["x-concilium-strategy"] == "fusion"
    comments = [orjson.loads(line.split(" ", 2)[2]) for line in lines if line.startswith(": concilium.step")]
    assert lines[0].startswith(": concilium.plan ")
    assert {(c["id"], c["status"]) for c in comments} == {(f"p{i}", s) for i in (1, 2, 3) for s in ("started", "ok")}
    data = [line for line in lines if line.startswith("data: ")]
    first_data = lines.index(data[0])
    assert all(not line.startswith(": concilium.step") for line in lines[first_data:])  # progress, then answer
    assert data[-1] == "data: [DONE]"
    # the openai SDK skips the comments and reads an ordinary stream
    stream = gw.client().chat.completions.create(model="concilium/auto", stream=True,
                                                 messages=[{"role": "user", "content": Q}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == echo(Q)


def test_self_moa_samples_one_model_with_seeds_and_layers_read_the_previous_one(fake_upstream, upstream,
                                                                                 gateway_factory):
    g = gateway_factory(policy(fake_upstream.url, """    strategy: fusion
    fusion: {panel: [a], samples: 3, layers: 2}"""))
    raw = ask(g, seed=100)
    assert raw.parse().choices[0].message.content == echo(Q)
    calls = bodies(upstream, "a")
    assert len(calls) == 6
    first, second = calls[:3], calls[3:]
    assert sorted(b["seed"] for b in first) == [101, 102, 103] and sorted(b["seed"] for b in second) == [101, 102, 103]
    assert all(b["messages"] == [{"role": "user", "content": Q}] for b in first)
    assert all(system_of(b).count(echo(Q)) == 3 for b in second)  # layer 2 reads layer 1's three answers
    (s,) = bodies(upstream, "synth")
    assert system_of(s).count(echo(Q)) == 3


def test_tools_go_to_the_synthesiser_only(gw, upstream):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    upstream.script("synth-up", [{"tool_call": {"name": "lookup", "arguments": {"q": "colours"}}}])
    raw = ask(gw, tools=tools)
    msg = raw.parse().choices[0].message
    assert msg.tool_calls[0].function.name == "lookup"
    assert all("tools" not in b for m in ("a", "b", "c") for b in bodies(upstream, m))
    (s,) = bodies(upstream, "synth")
    assert s["tools"] == tools


def test_a_client_that_leaves_cancels_the_panel(gw, upstream):
    upstream.script("a-up", [{"delay_s": 1.5}])
    with pytest.raises(openai.APITimeoutError):
        gw.client(timeout=0.5, max_retries=0).chat.completions.create(
            model="concilium/auto", messages=[{"role": "user", "content": Q}])
    wait_until(lambda: upstream.stats()["completed"] >= 3, 10, "the slow panelist's upstream to finish")
    ask(gw)  # a later request through the same gateway: by now a synthesis would have been sent
    assert len(bodies(upstream, "synth")) == 1
    text = httpx.get(gw.base_url + "/metrics").text
    assert 'concilium_requests_total{model="synth",route="composed",status="cancelled"} 1.0' in text


def test_a_streaming_client_that_leaves_cancels_the_panel(gw, upstream):
    upstream.script("a-up", [{"delay_s": 1.5}])
    with httpx.stream("POST", gw.v1 + "/chat/completions", timeout=20, json={
            "model": "concilium/auto", "messages": [{"role": "user", "content": Q}], "stream": True}) as r:
        for line in r.iter_lines():
            if '"status":"ok"' in line:
                break  # one panelist answered, `a` still thinks: leave
    wait_until(lambda: upstream.stats()["completed"] >= 3, 10, "the slow panelist's upstream to finish")
    ask(gw)  # a later request through the same gateway: by now a synthesis would have been sent
    assert len(bodies(upstream, "synth")) == 1


def test_the_anthropic_sdk_gets_one_fused_answer(gw, upstream):
    import anthropic

    client = anthropic.Anthropic(base_url=gw.base_url, api_key="x", max_retries=0)
    msg = client.messages.create(model="concilium/auto", max_tokens=64, messages=[{"role": "user", "content": Q}])
    assert msg.content[0].text == echo(Q)
    assert all(len(bodies(upstream, m)) == 1 for m in ("a", "b", "c", "synth"))
    with client.messages.stream(model="concilium/auto", max_tokens=64,
                                messages=[{"role": "user", "content": Q}]) as stream:
        assert "".join(stream.text_stream) == echo(Q)  # the progress comments do not reach it


# ------------------------------------------------------------------------------------ money

def test_the_whole_fan_out_is_reserved_and_each_call_billed_once(fake_upstream, upstream, gateway_factory):
    key, h = make_key()
    n = len(Q.split())
    one = {m: (n * p[0] + 13 * p[1]) / 1e6 for m, p in PRICE.items()}
    keys = f"keys:\n  - name: k\n    hash: {h}\n    budget: {{usd_per_day: 1.0}}\n"
    g = gateway_factory(policy(fake_upstream.url, FUSION, keys=keys))
    client = g.client(api_key=key)

    def spent() -> float:
        r = httpx.get(g.base_url + "/v1/usage", headers={"authorization": f"Bearer {key}"})
        return r.json()["scopes"][0]["spent_usd"]["day"]

    client.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": Q}])
    # the synthesiser's prompt holds the answers; the fake counts the words of every message
    (s,) = bodies(upstream, "synth")
    synth_in = sum(len(m["content"].split()) for m in s["messages"])
    synth = (synth_in * PRICE["synth"][0] + 13 * PRICE["synth"][1]) / 1e6
    assert spent() == pytest.approx(one["a"] + one["b"] + one["c"] + synth)
    upstream.script("b-up", [{"status": 500}])
    upstream.script("synth-up", [{"status": 500}])
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": Q}])
    assert spent() == pytest.approx(2 * (one["a"] + one["c"]) + one["b"] + synth)  # the panel was paid


@pytest.mark.parametrize("on_budget", ["refuse", "single"])
def test_a_budget_that_cannot_cover_the_fan_out(fake_upstream, upstream, gateway_factory, on_budget):
    key, h = make_key()
    # max_tokens 1000 on `synth` costs at most ~$0.02; the panel adds ~$0.011: a $0.025 budget fits one, not both
    keys = f"keys:\n  - name: k\n    hash: {h}\n    budget: {{usd_per_day: 0.025}}\n"
    route = FUSION.replace("quorum: 2", f"quorum: 2, on_budget: {on_budget}")
    g = gateway_factory(policy(fake_upstream.url, route, keys=keys))
    client = g.client(api_key=key)
    call = dict(model="concilium/auto", messages=[{"role": "user", "content": Q}], max_tokens=1000)
    if on_budget == "refuse":
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(**call)
        assert "budget" in e.value.response.json()["error"]["code"]
        assert upstream.stats()["requests"] == 0
        return
    raw = client.chat.completions.with_raw_response.create(**call)
    assert raw.headers["x-concilium-model"] == "synth" and "x-concilium-strategy" not in raw.headers
    assert "fusion: the key's budget cannot cover the fusion's 3 calls: answered as single" in \
        raw.headers["x-concilium-reason"]
    assert dict(upstream.stats()["by_model"]) == {"synth-up": 1}


# ------------------------------------------------------------------------------------ chains

CHAIN = """    strategy: chain
    chain: {{planner: {planner}, specialists: {{code: a, math: b, default: c}}, max_steps: 3}}"""


def test_a_rules_chain_sends_each_part_to_its_specialist(fake_upstream, upstream, gateway_factory):
    g = gateway_factory(policy(fake_upstream.url, CHAIN.format(planner="rules"), learned="true"))
    text = ("Help me with two things:\n1. Write a Python function that reverses a linked list.\n"
            "2. What is 17 times 23? Show the arithmetic.")
    code, plan = g.post("/v1/route", {"model": "concilium/auto", "messages": [{"role": "user", "content": text}]})
    assert code == 200 and plan["strategy"] == "chain"
    steps = [s for s in plan["steps"] if s["role"] == "specialist"]
    assert [s["task"].splitlines()[-1] for s in steps] == [
        "Write a Python function that reverses a linked list.", "What is 17 times 23? Show the arithmetic."]
    mapping = {"code": "a", "math": "b"}
    for s in steps:  # the router's category picks the specialist
        assert s["model"] == mapping.get(s["category"], "c"), s
    raw = ask(g, text, extra_headers={"x-concilium-explain": "true"})
    assert raw.headers["x-concilium-strategy"] == "chain"
    for s in steps:
        (b,) = [b for b in bodies(upstream, s["model"]) if s["task"] in b["messages"][-1]["content"]]
        assert s["task"] in b["messages"][0]["content"]  # its part, and the whole request for context
    (synth,) = bodies(upstream, "synth")
    assert "step s1" in system_of(synth) and "step s2" in system_of(synth)


def plan_json(steps: list[dict]) -> str:
    """A plan with spaces between its tokens: the fake repeats a reply of fewer than 13 words."""
    return json.dumps({"steps": steps})


def test_a_model_planned_chain_runs_its_dag(fake_upstream, upstream, gateway_factory):
    g = gateway_factory(policy(fake_upstream.url, CHAIN.format(planner="c")))
    # the fake planner echoes the user's message: this message is the plan it returns
    plan = plan_json([{"id": "s1", "task": "compute the sum", "category": "math"},
                      {"id": "s2", "task": "write code for it", "category": "code", "after": ["s1"]}])
    raw = ask(g, plan, extra_headers={"x-concilium-explain": "true"})
    steps = raw.http_response.json()["concilium"]["steps"]
    assert [(s["id"], s["role"], s["model"], s["status"]) for s in steps] == [
        ("plan", "planner", "c", "ok"), ("s1", "specialist", "b", "ok"), ("s2", "specialist", "a", "ok"),
        ("synth", "synthesiser", "synth", "planned")]
    (planner,) = bodies(upstream, "c")
    assert "JSON" in planner["messages"][0]["content"] and planner["temperature"] == 0
    (s1,) = bodies(upstream, "b")
    (s2,) = bodies(upstream, "a")
    assert s1["messages"][-1]["content"] == "compute the sum"
    assert s2["messages"][-1]["content"].startswith("write code for it\n\nResults of earlier steps")
    assert echo("compute the sum") in s2["messages"][-1]["content"]  # s2 reads s1's result


@pytest.mark.parametrize("reply,why", [
    ("this is not a plan", "not JSON"),
    (plan_json([{"task": f"part {i}"} for i in range(5)]), "more than max_steps (3)"),
    (plan_json([{"id": "s1", "task": "a task that waits for a step nobody planned", "after": ["s9"]}]),
     "may only name earlier steps"),
])
def test_an_invalid_plan_falls_back_to_single_and_says_so(fake_upstream, upstream, gateway_factory, reply, why):
    g = gateway_factory(policy(fake_upstream.url, CHAIN.format(planner="c")))
    raw = ask(g, reply)
    assert raw.headers["x-concilium-strategy"] == "single" and why in raw.headers["x-concilium-steps"]
    assert raw.parse().choices[0].message.content == echo(reply)
    (synth,) = bodies(upstream, "synth")
    assert synth["messages"] == [{"role": "user", "content": reply}]  # the synthesiser answered alone
    assert set(upstream.stats()["by_model"]) == {"c-up", "synth-up"}


def test_a_rules_plan_with_too_many_parts_is_single(fake_upstream, upstream, gateway_factory):
    g = gateway_factory(policy(fake_upstream.url, CHAIN.format(planner="rules")))
    text = "\n".join(f"{i}. part number {i}" for i in range(1, 6))
    code, plan = g.post("/v1/route", {"model": "concilium/auto", "messages": [{"role": "user", "content": text}]})
    assert plan["strategy"] == "single" and plan["steps"] == []
    assert any("5 parts, more than max_steps (3): answered as single" in r for r in plan["reasons"])


# ------------------------------------------------------------------------------------ policy

@pytest.mark.parametrize("route,where,what", [
    ("strategy: fusion\n    fusion: {panel: [a, nope]}", "routes[0].fusion.panel[1]", "unknown model 'nope'"),
    ("strategy: fusion\n    fusion: {panel: [a, b], quorum: 3}", "routes[0].fusion.quorum", "more than the 2"),
    ("strategy: fusion", "routes[0].fusion", "needs a `fusion:` section"),
    ("strategy: fusion\n    fusion: {panel: [a], prompt: 'no slot'}", "routes[0].fusion.prompt", "{answers}"),
    ("strategy: chain\n    chain: {specialists: {poetry: a}}", "routes[0].chain.specialists.poetry",
     "unknown category 'poetry'"),
    ("strategy: chain\n    chain: {planner: ghost}", "routes[0].chain.planner", "unknown model 'ghost'"),
])
def test_bad_composition_policies_name_the_key(route, where, what):
    text = policy("http://127.0.0.1:9/v1", "    " + route)
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    msg = str(e.value)
    assert "p.yaml" in msg and where in msg and what in msg, msg
