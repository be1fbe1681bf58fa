"""`strategy: cascade` through a real gateway and the openai SDK: a cheap draft first, scored by the
untrained rules verifier; the strong model only when the draft is rejected, fails or is too slow."""

from __future__ import annotations

import httpx
import openai
import pytest

from concilium.pipeline.cascade import check_strategies
from concilium.policy.loader import PolicyError, parse_policy
from concilium.testing.fake_upstream import _split
from tests.guard.support import make_key
from tests.support import wait_until

GOOD = "Add them: 2 + 2 = 4 so the answer is #### 4"  # the rules verifier scores its echo 0.8
BAD = "Add them: 2 + 2 = 5 so the answer is #### 5"  # wrong arithmetic: 0.16
CHEAP = (1.0, 2.0)  # USD per million tokens, input / output
STRONG = (10.0, 20.0)


def policy(url: str, cascade: str = "", keys: str = "", scorer: str = "verifier-rules") -> str:
    return f"""
version: 1
models:
  cheap: {{provider: openai, base_url: "{url}", model: cheap-up, price: {{input: {CHEAP[0]}, output: {CHEAP[1]}}}}}
  strong: {{provider: openai, base_url: "{url}", model: strong-up, price: {{input: {STRONG[0]}, output: {STRONG[1]}}}}}
router: {{virtual_models: [concilium/auto], learned: false}}
routes:
  - name: math
    targets: [strong]
    rank: false
    strategy: cascade
    cascade: {{drafts: [cheap], scorer: {scorer}, threshold: 0.5{cascade}}}
retry: {{attempts: 0}}
{keys}
"""


def echo(text: str) -> str:
    return "".join(_split(text.split(), 13))


def cost(price: tuple[float, float], text: str) -> float:
    return (len(text.split()) * price[0] + 13 * price[1]) / 1e6  # the fake upstream's usage


@pytest.fixture(scope="module")
def gw(fake_upstream, tmp_path_factory):
    from tests.support import start_gateway

    g = start_gateway(policy(fake_upstream.url), tmp_path_factory.mktemp("cascade") / "p.yaml")
    yield g
    g.stop()


def ask(gw, text: str, **kw):
    return gw.client().chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": text}], **kw)


def test_an_accepted_draft_answers_alone(gw, upstream):
    raw = ask(gw, GOOD, extra_headers={"x-concilium-explain": "true"})
    assert raw.headers["x-concilium-model"] == "cheap" and raw.headers["x-concilium-strategy"] == "cascade"
    assert "cheap score 0.80 >= 0.5 accepted" in raw.headers["x-concilium-cascade"]
    body = raw.http_response.json()
    assert body["choices"][0]["message"]["content"] == echo(GOOD)
    assert body["usage"]["completion_tokens"] == 13  # the answering model's usage
    step = body["concilium"]["cascade"][0]
    assert (step["model"], step["accepted"], step["score"]) == ("cheap", True, 0.8)
    assert step["cost_usd"] == pytest.approx(cost(CHEAP, GOOD))
    assert dict(upstream.stats()["by_model"]) == {"cheap-up": 1}


def test_a_rejected_draft_escalates(gw, upstream):
    raw = ask(gw, BAD)
    assert raw.headers["x-concilium-model"] == "strong"
    assert "cheap score 0.16 < 0.5 escalated; answered by strong" in raw.headers["x-concilium-cascade"]
    assert raw.parse().choices[0].message.content == echo(BAD)
    assert "concilium" not in raw.http_response.json()  # the explanation only when asked
    assert dict(upstream.stats()["by_model"]) == {"cheap-up": 1, "strong-up": 1}


@pytest.mark.parametrize("text,model", [(GOOD, "cheap"), (BAD, "strong")])
def test_streaming_holds_the_draft_until_its_verdict(gw, upstream, text, model):
    raw = ask(gw, text, stream=True, stream_options={"include_usage": True})
    assert raw.headers["x-concilium-model"] == model
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == echo(text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 13


def test_a_failing_draft_escalates(gw, upstream):
    upstream.script("cheap-up", [{"status": 500}])
    raw = ask(gw, GOOD)
    assert raw.headers["x-concilium-model"] == "strong"
    assert "cheap failed" in raw.headers["x-concilium-cascade"]


def test_route_explains_the_cascade(gw):
    status, plan = gw.post("/v1/route", {"model": "concilium/auto", "messages": [{"role": "user", "content": BAD}]})
    assert status == 200 and plan["strategy"] == "cascade"
    assert [(s["model"], s["action"], s["threshold"]) for s in plan["cascade"]] == [("cheap", "score", 0.5)]
    assert [c["model"] for c in plan["candidates"]] == ["strong"]
    assert plan["scorer"] == {"spec": "verifier-rules"}


def test_metrics_count_escalations_and_scores(gw, upstream):
    ask(gw, BAD)
    text = httpx.get(gw.base_url + "/metrics").text
    assert 'concilium_cascade_drafts_total{model="cheap",outcome="escalated",route="math"}' in text
    assert 'concilium_cascade_score_bucket{le="0.2",model="cheap",route="math"}' in text


def test_every_call_is_billed_once(fake_upstream, upstream, gateway_factory):
    key, h = make_key()
    keys = f"keys:\n  - name: k\n    hash: {h}\n    budget: {{usd_per_day: 1.0}}\n"
    g = gateway_factory(policy(fake_upstream.url, keys=keys))
    client = g.client(api_key=key)

    def spent() -> float:
        r = httpx.get(g.base_url + "/v1/usage", headers={"authorization": f"Bearer {key}"})
        return r.json()["scopes"][0]["spent_usd"]["day"]

    client.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": GOOD}])
    assert spent() == pytest.approx(cost(CHEAP, GOOD))
    client.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": BAD}])
    both = cost(CHEAP, GOOD) + cost(CHEAP, BAD) + cost(STRONG, BAD)
    assert spent() == pytest.approx(both)
    stream = client.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": BAD}],
                                            stream=True, stream_options={"include_usage": True})
    list(stream)
    assert spent() == pytest.approx(both + cost(CHEAP, BAD) + cost(STRONG, BAD))
    upstream.script("strong-up", [{"status": 500}])
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": BAD}])
    assert spent() == pytest.approx(both + cost(CHEAP, BAD) * 2 + cost(STRONG, BAD))  # the draft was paid


def test_a_slow_draft_is_hedged(fake_upstream, upstream, gateway_factory):
    g = gateway_factory(policy(fake_upstream.url, cascade=", hedge_after_ms: 100"))
    upstream.script("cheap-up", [{"delay_s": 5}])
    raw = g.client().chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": GOOD}],
        extra_headers={"x-concilium-explain": "1"})
    assert raw.headers["x-concilium-model"] == "strong"
    assert "cheap failed" in raw.headers["x-concilium-cascade"]
    step = raw.http_response.json()["concilium"]["cascade"][0]
    assert step["error"].startswith("cancelled: the final stage answered first")
    assert upstream.stats()["by_model"]["strong-up"] == 1


@pytest.mark.parametrize("scorer,cascade,where", [
    ("verifier-rules", "", None),
    ("{name: logprobs, how: sideways}", "", "routes[0].cascade.scorer"),
    ("{name: nope}", "", "routes[0].cascade.scorer.name"),
    ("{combine: min, of: [checks, {name: agreement, colour: red}]}", "", "routes[0].cascade.scorer.of[1].colour"),
    ("verifier-rules", ", skip_below: 0.9, trust_above: 0.1", "routes[0].cascade.skip_below"),
])
def test_bad_cascade_policies_name_the_key(scorer, cascade, where):
    text = policy("http://127.0.0.1:9/v1", cascade=cascade, scorer=scorer)
    if where is None:
        check_strategies(parse_policy(text, "p.yaml"), "p.yaml")
        return
    with pytest.raises(PolicyError) as e:
        check_strategies(parse_policy(text, "p.yaml"), "p.yaml")
    assert [path for path, _ in e.value.problems] == [where], e.value.problems


def test_a_draft_that_is_a_model_the_policy_lacks():
    text = policy("http://127.0.0.1:9/v1").replace("drafts: [cheap]", "drafts: [nope]")
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert any(p == "routes[0].cascade.drafts[0]" for p, _ in e.value.problems)
    missing = policy("http://127.0.0.1:9/v1").replace("    strategy: cascade\n", "")
    with pytest.raises(PolicyError) as e:
        parse_policy(missing, "p.yaml")
    assert any("strategy" in p for p, _ in e.value.problems)


def test_a_background_job_runs_the_cascade_and_bills_every_call(fake_upstream, upstream, tmp_path):
    from tests.workers.support import Stack
    from tests.workers.test_redis_jobs import finished

    stack = Stack.start(tmp_path, policy(fake_upstream.url), workers=1)
    try:
        c = stack.gateway.client()
        for text, model in ((GOOD, "cheap"), (BAD, "strong")):
            job = c.responses.create(model="concilium/auto", input=text, background=True)
            final = finished(c, job.id)
            assert final.status == "completed" and final.output_text == echo(text)
            (bill,) = stack.bills(job.id)
            assert bill["model"] == model
            drafts = [call["model"] for call in bill.get("calls", [])]
            assert drafts == ([] if model == "cheap" else ["cheap"])
            expected = cost(CHEAP, text) + (cost(STRONG, text) if model == "strong" else 0.0)
            assert bill["cost_usd"] == pytest.approx(expected)
    finally:
        stack.stop()


def test_agreement_compares_a_draft_with_the_drafts_before_it(fake_upstream, upstream, gateway_factory):
    text = policy(fake_upstream.url, scorer="agreement").replace(
        "drafts: [cheap]", "drafts: [cheap, twin]").replace("threshold: 0.5", "threshold: 0.75").replace(
        "\nrouter:", f"\n  twin: {{provider: openai, base_url: \"{fake_upstream.url}\", model: twin-up}}\nrouter:")
    g = gateway_factory(text)
    agree = g.client().chat.completions.with_raw_response.create(
        model="concilium/auto", messages=[{"role": "user", "content": GOOD}])
    assert agree.headers["x-concilium-model"] == "twin"  # the first draft alone: 0.5; the twin agrees: 1.0
    assert "cheap score 0.50 < 0.75 escalated; twin score 1.00 >= 0.75 accepted" in agree.headers["x-concilium-cascade"]


def test_a_logprobs_scorer_asks_the_drafts_for_logprobs(fake_upstream, upstream, gateway_factory):
    # the fake sends no log-probs; `missing: 1.0` accepts such a draft, so the draft's is the last call
    g = gateway_factory(policy(fake_upstream.url, scorer="{name: logprobs, how: mean, missing: 1.0}"))
    g.client().chat.completions.create(model="concilium/auto", messages=[{"role": "user", "content": BAD}])
    last = upstream.stats()["last_body"]
    assert last["model"] == "cheap-up" and last["logprobs"] is True


def test_a_client_that_leaves_cancels_the_cascade(gw, upstream):
    """Gone while the draft thinks: the draft's call is dropped and nothing escalates; gone while the
    escalation streams: the strong model's stream is closed."""
    upstream.script("cheap-up", [{"delay_s": 2.0}])
    with pytest.raises(openai.APITimeoutError):
        gw.client(timeout=0.5).chat.completions.create(
            model="concilium/auto", messages=[{"role": "user", "content": BAD}])
    wait_until(lambda: upstream.stats()["completed"] >= 1, 10, "the draft's upstream to finish its answer")
    ask(gw, GOOD)  # a later request through the same gateway: by now an escalation would have been sent
    assert upstream.stats()["by_model"].get("strong-up", 0) == 0

    upstream.reset()
    upstream.default("strong-up", {"chunk_delay_s": 0.3})
    with httpx.stream("POST", gw.v1 + "/chat/completions", timeout=10,
                      json={"model": "concilium/auto", "messages": [{"role": "user", "content": BAD}],
                            "stream": True}) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the escalation's first token: leave
    wait_until(lambda: upstream.stats()["disconnected"] == 1, 10, "the strong model's stream to be closed")
