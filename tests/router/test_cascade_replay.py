"""Replay evaluation: the replay upstream over real HTTP (openai SDK), a replay through the real
gateway, the offline cascade metrics, and `concilium eval replay` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import openai
import pytest

from concilium.cli import main
from concilium.router.cascade.evaluate import cascade_data, cost_apgr, cost_points, row_metrics
from concilium.router.cascade.replay import gateway_replay
from concilium.router.outcomes import read_outcomes
from tests.router.cascade_synth import write_cascade_synthetic
from tests.support import ROOT, _env, free_port, http_json, start_gateway, wait_until


@pytest.fixture(scope="module")
def records_file(tmp_path_factory):
    return write_cascade_synthetic(tmp_path_factory.mktemp("replay") / "outcomes.jsonl", 240, seed=21)


@pytest.fixture(scope="module")
def replay(records_file, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("replay-log") / "upstream.log"
    proc = subprocess.Popen([sys.executable, "-m", "concilium.testing.replay_upstream", "--outcomes",
                             str(records_file), "--port", str(port), "--chunks", "4"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(None), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_json("GET", url + "/_control/stats")[0] == 200, 30, "replay upstream", proc, log)
    yield url
    proc.terminate()
    proc.wait(10)


def test_replay_upstream_answers_the_recorded_response(replay, records_file):
    rec = read_outcomes(records_file)[0]
    client = openai.OpenAI(base_url=replay + "/v1", api_key="x", max_retries=0)
    for model in ("weak", "strong"):
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": rec.prompt}])
        assert out.choices[0].message.content == rec.responses[model]
        assert out.model == model and out.usage.completion_tokens > 0
    # Prompts match whatever the whitespace and case; earlier turns and the system prompt do not matter.
    out = client.chat.completions.create(model="weak", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "  " + rec.prompt.upper() + "\n"}])
    assert out.choices[0].message.content == rec.responses["weak"]


def test_replay_upstream_streams_the_same_answer(replay, records_file):
    rec = read_outcomes(records_file)[1]
    client = openai.OpenAI(base_url=replay + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="weak", messages=[{"role": "user", "content": rec.prompt}],
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == rec.responses["weak"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_replay_upstream_never_invents_an_answer(replay):
    client = openai.OpenAI(base_url=replay + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="weak", messages=[{"role": "user", "content": "an unrecorded prompt"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    stats = http_json("GET", replay + "/_control/stats")[1]
    assert stats["missing"] >= 2


def test_replay_through_the_gateway_scores_the_answer_the_client_got(replay, records_file, tmp_path):
    policy = f"""
version: 1
models:
  draft-model: {{provider: openai, base_url: "{replay}/v1", model: weak, price: {{input: 0.1, output: 0.1}}}}
routes:
  - name: default
    targets: [draft-model]
    rank: false
retry: {{attempts: 0, backoff_s: 0.01, backoff_max_s: 0.05}}
"""
    gw = start_gateway(policy, tmp_path / "policy.yaml")
    try:
        records = read_outcomes(records_file)[:30]
        res = gateway_replay(gw.base_url, records, model="draft-model")
        assert res["failed"] == 0 and res["requests"] == 30
        assert res["quality"] == pytest.approx(np.mean([r.scores["weak"] for r in records]))
        assert res["answered_by"] == {"draft-model": 30}
        streamed = gateway_replay(gw.base_url, records[:5], model="draft-model", stream=True)
        assert streamed["quality"] == pytest.approx(np.mean([r.scores["weak"] for r in records[:5]]))
    finally:
        gw.proc.terminate()
        gw.proc.wait(10)


def test_cost_aware_apgr_on_a_hand_computed_case():
    # Two prompts; the weak model fails the first. Costs: weak 1, strong 9 per prompt.
    weak, strong = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    cw, cs = np.array([1.0, 1.0]), np.array([9.0, 9.0])
    cost, pgr = cost_points(np.array([1.0, 0.0]), weak, strong, cw, cs, cascade=True)
    # Escalating prompt 1 (the cascade pays 9 more on it) reaches PGR 1 at cost 9/2 / 8 = 0.5625.
    assert cost.tolist() == pytest.approx([0.0, 0.5625, 1.125])
    assert pgr.tolist() == pytest.approx([0.0, 1.0, 1.0])
    # Area: linear rise to 1 at 0.5625, then flat: 0.5625 / 2 + (1 - 0.5625).
    assert cost_apgr(cost, pgr) == pytest.approx(0.5625 / 2 + 0.4375, abs=1e-3)
    # A router (not a cascade) replaces the weak call: the same escalation costs 8/2/8 = 0.5.
    cost_r, _ = cost_points(np.array([1.0, 0.0]), weak, strong, cw, cs, cascade=False)
    assert cost_r[1] == pytest.approx(0.5)


def test_cascade_rows_on_synthetic_records(records_file):
    data = cascade_data(read_outcomes(records_file), "weak", "strong", "scores",
                        prices={"weak": (0.1, 0.1), "strong": (10.0, 30.0)})
    perfect = row_metrics(-data.weak, data)
    rand = row_metrics(np.zeros(len(data.weak)), data)
    assert perfect["apgr"] > rand["apgr"]
    assert rand["apgr"] == pytest.approx(0.5)
    numeric = cascade_data(read_outcomes(records_file), "weak", "strong", "numeric")
    assert np.array_equal(numeric.weak, data.weak)  # synthetic scores are exactly the numeric grades


POLICY = """
version: 1
models:
  cheap: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: weak, price: {input: 0.6, output: 0.6}}
  big: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: strong, price: {input: 10, output: 30}}
routes:
  - name: math
    targets: [big]
    strategy: cascade
    cascade: {drafts: [cheap], scorer: verifier, threshold: 0.5}
"""


def test_eval_replay_end_to_end(records_file, tmp_path, capsys):
    (tmp_path / "policy.yaml").write_text(POLICY)
    rc = main(["eval", "replay", "--policy", str(tmp_path / "policy.yaml"), "--outcomes", str(records_file),
               "--out", str(tmp_path / "out"), "--folds", "3", "--seeds", "0", "--grading", "scores"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "verifier + router" in printed and "policy point (verifier >= 0.5)" in printed
    out = json.loads((tmp_path / "out" / "replay.json").read_text())
    assert out["draft"] == "weak" and out["strong"] == "strong"
    assert out["prices_per_m"] == {"weak": [0.6, 0.6], "strong": [10.0, 30.0]}
    rows = out["gradings"]["scores"]["rows"]
    assert set(rows) == {"random", "prompt router", "rules", "verifier", "verifier + router", "perfect verifier",
                         "oracle"}
    # The synthetic mistakes are mostly visible in the answer: reading it beats not reading it.
    assert rows["verifier"]["apgr"] > rows["prompt router"]["apgr"]
    assert all(rows["oracle"]["apgr"] >= r["apgr"] - 1e-9 for r in rows.values())  # the oracle is optimal
    point = out["gradings"]["scores"]["policy_point"]
    assert 0 < point["escalated"] < 1 and point["quality_weak"] <= point["quality"]
    assert (tmp_path / "out" / "replay.png").stat().st_size > 1000


def test_eval_replay_errors(records_file, tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(POLICY.replace("model: strong", "model: nobody"))
    rc = main(["eval", "replay", "--policy", str(tmp_path / "p.yaml"), "--outcomes", str(records_file)])
    assert rc == 2 and "model 'big' has no records" in capsys.readouterr().err
    (tmp_path / "q.yaml").write_text(POLICY)
    rc = main(["eval", "replay", "--policy", str(tmp_path / "q.yaml"), "--outcomes", str(records_file),
               "--grading", "vibes"])
    assert rc == 2 and "unknown grading" in capsys.readouterr().err


def test_the_gateway_makes_the_same_cascade_decision_as_the_offline_replay(records_file, tmp_path):
    from concilium.router.cascade.evaluate import folds
    from concilium.router.cascade.replay import gateway_kfold_scores
    from concilium.router.cascade.verifier import VerifierConfig, featurise, fit_features

    data = cascade_data(read_outcomes(records_file)[:60], "weak", "strong", "scores")
    cfg = VerifierConfig(blocks=("answer",), hash_dim=0, c=0.3)
    got = gateway_kfold_scores(data, cfg, k=2, seed=0, workdir=tmp_path)
    assert got["failed"] == 0 and got["requests"] == 60
    x = featurise(data.prompts, data.answers, cfg)
    offline = np.zeros(60)
    for tr, te in folds(60, 2, 0):
        offline[te] = fit_features(x[tr], data.weak[tr], None, cfg).probabilities(x[te])
    assert np.abs(got["scores"] - offline).max() < 1e-3  # the gateway reports scores to 4 decimals
