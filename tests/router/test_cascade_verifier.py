"""The trained verifier: training on a small synthetic set, storage, loading errors, the train CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from concilium.cli import main
from concilium.router.cascade import Verifier, VerifierConfig, VerifierError, build_scorer, load_verifier
from concilium.router.cascade.features import ANSWER_FEATURES, answer_features, hashed_features
from concilium.router.cascade.verifier import train_verifier, verifier_examples
from concilium.router.outcomes import Outcome, read_outcomes
from tests.router.cascade_synth import solution, write_cascade_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("verifier")
    return (read_outcomes(write_cascade_synthetic(d / "train.jsonl", 400, seed=11)),
            read_outcomes(write_cascade_synthetic(d / "test.jsonl", 200, seed=12)), d)


def _auc(p: np.ndarray, y: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_answer_features_see_the_mistakes():
    prompt = "Ana has 10 apples, gets 5 more and gives away 3. How many apples does Ana have now?"
    names = list(ANSWER_FEATURES)
    good = dict(zip(names, answer_features(prompt, solution(10, 5, 3, None)[0]), strict=True))
    wrong = dict(zip(names, answer_features(prompt, solution(10, 5, 3, "arithmetic")[0]), strict=True))
    frac = dict(zip(names, answer_features(prompt, solution(10, 5, 4, "fraction")[0]), strict=True))
    nofinal = dict(zip(names, answer_features(prompt, solution(10, 5, 3, "no_final")[0]), strict=True))
    assert good["final_marker"] == 1 and good["any_wrong"] == 0 and good["prompt_numbers_used"] == 1
    assert good["final_is_last_result"] == 1
    assert wrong["any_wrong"] == 1 and wrong["wrong_annotation"] == 1
    assert frac["final_non_integer"] == 1
    assert nofinal["final_marker"] == 0 and nofinal["hedges"] > 0


def test_hashed_features_are_stable_and_normalised():
    a = hashed_features("How many apples?", "#### 12", 64)
    assert np.allclose(a, hashed_features("How many apples?", "#### 12", 64))
    assert np.linalg.norm(a) == pytest.approx(1.0)
    assert not np.allclose(a, hashed_features("How many pears?", "#### 12", 64))


def test_verifier_learns_to_tell_good_drafts_from_bad(data):
    train, test, _ = data
    ver = train_verifier(train, VerifierConfig(), models=["weak"])
    ex = verifier_examples(test, ["weak"])
    p = np.array([ver.probability(q, a) for q, a in zip(ex.prompts, ex.answers, strict=True)])
    assert ((p >= 0) & (p <= 1)).all()
    assert _auc(p, ex.labels) > 0.8
    assert p[ex.labels == 1].mean() > p[ex.labels == 0].mean() + 0.3
    assert ver.meta["training"]["examples"] == 400
    assert ver.describe() == {"scorer": "verifier", "blocks": list(VerifierConfig().blocks), "trained_on": 400}
    assert str(ver.meta["training"]["c"]) in ver.meta["training"]["cv_log_loss"]


def test_verifier_round_trips_through_its_files(data, tmp_path):
    train, test, _ = data
    cfg = VerifierConfig(blocks=("answer", "prompt_lexical", "hashed"), hash_dim=128, c=0.1)
    ver = train_verifier(train, cfg, models=["weak"])
    ver.save(tmp_path / "v")
    assert {p.name for p in (tmp_path / "v").iterdir()} == {"verifier.json", "verifier.safetensors"}
    back = load_verifier(tmp_path / "v")
    for r in test[:20]:
        assert back.probability(r.prompt, r.responses["weak"]) == pytest.approx(
            ver.probability(r.prompt, r.responses["weak"]), abs=1e-5)
    assert build_scorer({"name": "verifier", "artifact": str(tmp_path / "v")}).config.hash_dim == 128


def test_verifier_load_errors(data, tmp_path):
    with pytest.raises(VerifierError, match="no trained verifier"):
        load_verifier(tmp_path)
    ver = train_verifier(data[0], VerifierConfig(c=0.1), models=["weak"])
    ver.save(tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "verifier.json").read_text())
    (tmp_path / "v" / "verifier.json").write_text(json.dumps({**cfg, "dense_features": ["other"]}))
    with pytest.raises(VerifierError, match="other answer features"):
        load_verifier(tmp_path / "v")
    (tmp_path / "v" / "verifier.json").write_text(json.dumps({**cfg, "version": 99}))
    with pytest.raises(VerifierError, match="version"):
        load_verifier(tmp_path / "v")


def test_training_needs_responses_of_both_kinds():
    good = [Outcome(prompt=f"p{i}", scores={"m": 1.0}, responses={"m": "#### 1"}) for i in range(30)]
    with pytest.raises(VerifierError, match="both good and bad"):
        train_verifier(good)
    with pytest.raises(VerifierError, match="at least"):
        train_verifier(good[:5])
    with pytest.raises(VerifierError, match="unknown feature block"):
        VerifierConfig(blocks=("answer", "vibes"))


def test_router_train_also_trains_the_verifier_when_records_carry_responses(data, capsys):
    _, _, d = data
    out = d / "router"
    rc = main(["router", "train", "--outcomes", str(d / "train.jsonl"), "--out", str(out), "--quiet",
               "--verifier-models", "weak"])
    assert rc == 0
    assert "answer verifier: 400 responses of weak (400)" in capsys.readouterr().out
    ver = load_verifier(out)
    assert isinstance(ver, Verifier)
    assert (out / "router.json").is_file()  # the router itself is there too
    rc = main(["router", "train", "--outcomes", str(d / "train.jsonl"), "--out", str(d / "r2"), "--quiet",
               "--no-verifier"])
    assert rc == 0 and not (d / "r2" / "verifier.json").exists()


def test_the_shipped_verifier_loads_and_reads_gsm8k_style_answers():
    ver = load_verifier()
    prompt = "Janet's ducks lay 16 eggs per day. She eats 3 and bakes with 4. She sells the rest at $2. How much?"
    good = "16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n9 * 2 = $<<9*2=18>>18.\n#### 18"
    bad = "16 - 3 - 4 = <<16-3-4=8>>8 eggs.\n8 * 2 = $<<8*2=15>>15.5.\n#### 15.5"
    assert ver.probability(prompt, good) > ver.probability(prompt, bad)
    assert ver.meta["data"]["licenses"].startswith("RouteLLM Apache-2.0")
