"""`concilium router ...` end to end on small synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from concilium.cli import main
from tests.router.synth import write_synthetic


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    train_file = write_synthetic(d / "train.jsonl", 500, seed=3)
    test_file = write_synthetic(d / "test.jsonl", 250, seed=4)
    out = d / "router"
    rc = main(["router", "train", "--outcomes", str(train_file), "--out", str(out), "--holdout", "0.2", "--quiet",
               "--alias", "weak=vendor/weak-7b"])
    assert rc == 0
    return d, train_file, test_file, out


def test_train_writes_an_artifact_with_data_hashes(trained, capsys):
    d, train_file, _, out = trained
    cfg = json.loads((out / "router.json").read_text())
    assert cfg["data"]["files"]["train.jsonl"] and len(cfg["data"]["files"]["train.jsonl"]) == 64
    assert cfg["data"]["n_records"] == 400 and cfg["data"]["holdout"] == 100
    assert 0.5 < cfg["metrics"]["holdout"]["apgr"] <= 1.2
    assert "aiq" in cfg["metrics"]["holdout"]


def test_eval_prints_tables_and_writes_json_and_png(trained, capsys):
    d, _, test_file, out = trained
    rc = main(["router", "eval", "--outcomes", str(test_file), "--model", str(out), "--json", str(d / "eval.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "APGR" in text and "CPT(50%)" in text and "AIQ" in text and "oracle" in text and "random mix" in text
    res = json.loads((d / "eval.json").read_text())
    two = res["two_model"]
    assert two["random"]["apgr"] == pytest.approx(0.5)
    assert two["random"]["apgr"] < two["router"]["apgr"] < two["oracle"]["apgr"]
    assert two["router"]["cpt50"] <= two["router"]["cpt80"]
    many = res["n_model"]
    assert many["router"]["aiq"] > max(many["weak"]["aiq"], many["strong"]["aiq"])
    assert (d / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrate_prints_a_policy_snippet(trained, capsys, tmp_path):
    d, _, test_file, out = trained
    pol = {
        "models": {
            "cheap": {"provider": "openai", "base_url": "https://u/v1", "model": "vendor/weak-7b",
                      "price": {"input": 0.2, "output": 0.2}},
            "dear": {"provider": "openai", "base_url": "https://u/v1", "model": "strong",
                     "price": {"input": 5, "output": 15}},
        },
        "routes": [{"name": "auto", "targets": ["cheap", "dear"]}],
        "router": {"artifact": str(out)},
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(pol))
    rc = main(["router", "calibrate", "--policy", str(path), "--prompts", str(test_file), "--target", "dear",
               "--share", "0.3"])
    assert rc == 0
    text = capsys.readouterr().out
    snippet = yaml.safe_load(text.split("put this in the policy:\n", 1)[1])
    assert 0 < snippet["router"]["objective"]["quality_ratio"] < 1
    assert "route auto: 250 reference prompts" in text


def test_convert_and_errors(tmp_path, capsys):
    csv = tmp_path / "gsm8k_responses.csv"
    csv.write_text("prompt,w,s\n\"Q1\",True,False\n\"Q2\",False,True\n")
    assert main(["router", "convert", "routellm-gsm8k", str(csv), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    assert main(["router", "eval", "--outcomes", str(tmp_path / "o.jsonl"), "--model", str(tmp_path / "none")]) == 2
    assert "not a router artifact" in capsys.readouterr().err
    assert main(["router", "train", "--out", str(tmp_path / "x")]) == 2
    assert main(["router", "train", "--outcomes", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2


def test_train_folds_in_feedback(tmp_path, capsys):
    train_file = write_synthetic(tmp_path / "t.jsonl", 200, seed=5)
    fb = tmp_path / "feedback.jsonl"
    rows = [{"id": f"fb-{i}", "request_id": f"r{i}", "score": 1.0 if i % 2 else 0.0, "created": 0.0,
             "model": "newcomer", "prompt": f"hello number {i}"} for i in range(30)]
    rows += [{"id": "fb-x", "request_id": "joined", "score": 1.0, "created": 0.0}]
    rows += [{"id": "fb-y", "request_id": "orphan", "score": 0.5, "created": 0.0}]
    fb.write_text("".join(json.dumps(r) + "\n" for r in rows))
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text(json.dumps({"request_id": "joined", "candidates": [{"model": "newcomer"}],
                                     "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "r"
    rc = main(["router", "train", "--outcomes", str(train_file), "--feedback", str(fb), "--decisions", str(decisions),
               "--out", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "feedback: 31 outcome records, 1 records without a model and prompt skipped" in text
    cfg = json.loads((out / "router.json").read_text())
    assert {m["name"]: m["n_train"] for m in cfg["models"]}["newcomer"] == 31


def test_the_installed_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "concilium.cli", "router", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "calibrate" in r.stdout and "build-default" in r.stdout


def test_calibrate_turns_an_escalation_share_into_a_cascade_threshold(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text("""
version: 1
models:
  cheap: {provider: openai, base_url: "http://127.0.0.1:9/v1", model: cheap}
  strong: {provider: openai, base_url: "http://127.0.0.1:9/v1", model: strong}
router: {virtual_models: [concilium/auto], learned: false}
routes:
  - name: math
    targets: [strong]
    strategy: cascade
    cascade: {drafts: [cheap], scorer: verifier-rules}
""")
    good, bad = "2 + 2 = 4 so #### 4", "2 + 2 = 5 so #### 5"  # the rules score 0.8 and 0.16
    rows = [{"prompt": f"q{i}", "scores": {"cheap": 1, "strong": 1},
             "responses": {"cheap": bad if i % 4 == 0 else good}} for i in range(40)]
    outcomes = tmp_path / "o.jsonl"
    outcomes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["router", "calibrate", "--policy", str(policy), "--route", "math", "--prompts", str(outcomes),
               "--share", "0.25"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "threshold 0.8000 escalates 25.0% of them (wanted 25.0%)" in out
    assert main(["router", "calibrate", "--policy", str(policy), "--route", "math", "--prompts", str(outcomes),
                 "--share", "1.5"]) == 2
