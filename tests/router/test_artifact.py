"""Training on outcome records, the artifact round trip, and refusing broken artifacts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from concilium.router.artifact import Artifact, ArtifactError
from concilium.router.evaluate import eval_matrix, predicted_quality, two_model_report
from concilium.router.outcomes import Outcome, OutcomeError, read_outcomes
from concilium.router.predictor import Predictor
from concilium.router.train import TrainConfig, fit_multiclass_head, load_embedder, train


def test_round_trip_gives_identical_predictions(small_artifact, synth_files, tmp_path):
    art = Artifact.load(small_artifact)
    copy = art.save(tmp_path / "copy")
    again = Artifact.load(copy)
    texts = [r.prompt for r in read_outcomes(synth_files[1])[:50]]
    a, b = Predictor(art), Predictor(again)
    for x, y in zip(a.forward_batch(a.features_batch(texts)), b.forward_batch(b.features_batch(texts)), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
    # single and batch paths agree
    one = a.forward(a.features(texts[0]))
    np.testing.assert_allclose(one.quality, a.forward_batch(a.features_batch(texts[:1]))[0][0], atol=1e-5)
    # no pickles anywhere: JSON, safetensors and the tokenizer only
    assert sorted(p.suffix for p in copy.iterdir()) == [".json", ".json", ".json", ".safetensors", ".safetensors"]
    cfg = json.loads((copy / "router.json").read_text())
    assert [m["name"] for m in cfg["models"]] == ["weak", "strong"]
    assert cfg["models"][0]["aliases"] == ["vendor/weak-7b"]


def test_trained_router_beats_random_on_held_out_data(small_artifact, synth_files):
    art = Artifact.load(small_artifact)
    data = eval_matrix(read_outcomes(synth_files[1]))
    rep = two_model_report(predicted_quality(art, data), data)
    assert rep["strong"] == "strong"
    assert rep["rows"]["random"]["apgr"] == pytest.approx(0.5)
    # The oracle reaches ~0.75 here (most prompts gain nothing from the strong model); random 0.5.
    assert rep["rows"]["router"]["apgr"] > 0.65  # the synthetic structure is learnable
    assert rep["rows"]["router"]["apgr"] < rep["rows"]["oracle"]["apgr"]


def test_category_and_difficulty_heads_learn(small_artifact):
    art = Artifact.load(small_artifact)
    p = Predictor(art)
    cats = art.categories
    hi = p.forward(p.features("hello Ana, how are you today?"))
    code = p.forward(p.features("Write a Rust function to parse a CSV file, with tests."))
    assert cats[int(np.argmax(hi.category))] == "chat"
    assert cats[int(np.argmax(code.category))] == "code"
    assert code.difficulty_value > hi.difficulty_value
    # categories absent from the training data are never predicted
    assert hi.category[cats.index("creative")] < 1e-6


def test_training_errors():
    emb = load_embedder(None)
    with pytest.raises(OutcomeError, match="no training records"):
        train([], emb)
    few = [Outcome(prompt=f"p{i}", scores={"m": 1.0}) for i in range(3)]
    with pytest.raises(OutcomeError, match="at least 20 scored records"):
        train(few, emb, TrainConfig(min_records_per_model=20))


def test_two_class_and_one_class_heads():
    z = np.random.default_rng(0).normal(size=(40, 3))
    y = (z[:, 0] > 0).astype(int) * 2  # classes 0 and 2 of 3
    w, b = fit_multiclass_head(z, y, np.ones(40), 3, 1.0, 500)
    logits = z @ w + b
    assert (np.argmax(logits, 1) == y).mean() > 0.9 and b[1] < -10
    w, b = fit_multiclass_head(z, np.ones(40, dtype=int), np.ones(40), 3, 1.0, 500)
    assert np.argmax(b) == 1 and not w.any()


@pytest.mark.parametrize("damage", ["no_config", "bad_json", "version", "shapes", "no_weights", "features"])
def test_broken_artifacts_are_refused(small_artifact, tmp_path, damage):
    d = tmp_path / "broken"
    shutil.copytree(small_artifact, d)
    cfg_path = d / "router.json"
    cfg = json.loads(cfg_path.read_text())
    if damage == "no_config":
        cfg_path.unlink()
    elif damage == "bad_json":
        cfg_path.write_text("{")
    elif damage == "version":
        cfg["version"] = 99
        cfg_path.write_text(json.dumps(cfg))
    elif damage == "shapes":
        cfg["models"].append({"name": "ghost"})
        cfg_path.write_text(json.dumps(cfg))
    elif damage == "no_weights":
        (d / "heads.safetensors").unlink()
    else:
        cfg["features"]["lexical"] = ["other"]
        cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError):
        Artifact.load(d)


def test_cli_default_regularisation_matches_training():
    from concilium.router.cli import TrainDefaults

    assert TrainDefaults.c_quality == TrainConfig().c_quality
