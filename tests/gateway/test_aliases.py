"""Aliases through a real gateway: a request for an alias is a request for its target (chat and
messages alike), and /v1/models lists the aliases."""

from __future__ import annotations

import anthropic

from tests.gateway.policies import two_models


def test_aliases_answer_as_their_targets_and_are_listed(upstream, gateway_factory):
    gw = gateway_factory(two_models(upstream.url) + "aliases: {gpt-4: primary, best: concilium/auto}\n")
    r = gw.client().chat.completions.with_raw_response.create(
        model="gpt-4", messages=[{"role": "user", "content": "hello"}], max_tokens=1)
    assert r.headers["x-concilium-model"] == "primary" and r.headers["x-concilium-route"] == "pinned"
    assert upstream.stats()["by_model"] == {"primary": 1}
    r = gw.client().chat.completions.with_raw_response.create(
        model="best", messages=[{"role": "user", "content": "hello"}], max_tokens=1)
    assert r.headers["x-concilium-route"] == "main"
    msg = anthropic.Anthropic(base_url=gw.base_url, api_key="x", max_retries=0).messages.create(
        model="gpt-4", max_tokens=1, messages=[{"role": "user", "content": "hello"}])
    assert msg.content[0].text == "hello" and upstream.stats()["by_model"]["primary"] == 3

    status, listed = gw.get("/v1/models")
    cards = {m["id"]: m for m in listed["data"]}
    assert cards["gpt-4"]["alias_for"] == "primary" and cards["gpt-4"]["owned_by"] == "openai"
    assert cards["best"]["alias_for"] == "concilium/auto" and "alias_for" not in cards["primary"]
    status, card = gw.get("/v1/models/gpt-4")
    assert status == 200 and card == cards["gpt-4"]
