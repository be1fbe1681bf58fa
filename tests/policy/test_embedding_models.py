"""`kind: embedding` models: they answer /v1/embeddings by name only, never a route or a chat request."""

from __future__ import annotations

import pytest

from concilium.policy.loader import PolicyError, parse_policy
from concilium.router.decide import DecisionError, decide, decide_embeddings

BASE = """
version: 1
models:
  chat: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: chat}
  emb: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: emb, kind: embedding, timeout_s: 3}
  minilm: {provider: local, model: all-minilm-l6-v2, kind: embedding}
routes:
  - name: main
    targets: [chat]
router: {learned: false}
aliases: {ada: emb}
"""


@pytest.mark.parametrize("change,path,words", [
    (("targets: [chat]", "targets: [chat, emb]"), "routes[0].targets[1]", "'emb' is an embedding model"),
    (("targets: [chat]", "targets: [chat]\n    fallbacks: [minilm]"), "routes[0].fallbacks[0]", "embedding model"),
    (("kind: embedding, timeout_s: 3}", "kind: embedding, fallbacks: [minilm]}"), "models.emb.fallbacks",
     "takes no fallbacks"),
    (("kind: embedding}", "kind: vectors}"), "models.minilm.kind", "'embedding'"),
])
def test_policy_check_keeps_embedding_models_out_of_chat(change, path, words):
    with pytest.raises(PolicyError) as e:
        parse_policy(BASE.replace(*change), "p.yaml")
    assert any(p == path and words in m for p, m in e.value.problems), e.value.problems


def test_an_embeddings_plan_names_one_model():
    pol = parse_policy(BASE, "p.yaml")
    plan = decide_embeddings({"model": "ada", "input": "x"}, pol, request_id="r1")
    assert plan.requested_model == "emb" and [c.model for c in plan.candidates] == ["emb"]
    assert plan.candidates[0].timeout_s == 3 and plan.route == "pinned" and plan.reasons[1] == "alias ada -> emb"
    down = decide_embeddings({"model": "emb", "input": "x"}, pol, availability=lambda m: "no key")
    assert down.candidates == [] and down.skipped[0].reason == "no key"
    for model, status in (("chat", 400), ("concilium/auto", 400), ("nope", 404)):
        with pytest.raises(DecisionError) as e:
            decide_embeddings({"model": model, "input": "x"}, pol)
        assert e.value.status == status and "emb, minilm" in e.value.message
    with pytest.raises(DecisionError) as e:
        decide({"model": "emb", "messages": [{"role": "user", "content": "hi"}]}, pol)
    assert e.value.status == 400 and "/v1/embeddings" in e.value.message
