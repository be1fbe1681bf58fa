from __future__ import annotations

import pytest

from concilium.router.outcomes import read_outcomes
from concilium.router.train import TrainConfig, load_embedder, train
from tests.router.synth import write_synthetic


@pytest.fixture(scope="session")
def synth_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return write_synthetic(d / "train.jsonl", 500, seed=1), write_synthetic(d / "test.jsonl", 300, seed=2)


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory, synth_files):
    """A router trained on synthetic outcomes with the shipped embedder, saved to disk."""
    records = read_outcomes(synth_files[0])
    artifact, _ = train(records, load_embedder(None), TrainConfig(), aliases={"weak": ["vendor/weak-7b"]})
    return artifact.save(tmp_path_factory.mktemp("art") / "router")
