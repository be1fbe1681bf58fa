"""The keys: and privacy: sections: valid ones load, every error names the file and the key path."""

from __future__ import annotations

import subprocess
import sys

import pytest

from concilium.guard.keys import KeyTable, hash_key, merge, new_key
from concilium.policy.loader import PolicyError, load_key_file, parse_policy
from tests.support import ROOT

H = hash_key("ck-test")
BASE = f"""
version: 1
models:
  a: {{provider: openai, base_url: "http://127.0.0.1:1/v1", model: a, tags: [local]}}
  b: {{provider: openai, base_url: "http://127.0.0.1:1/v1", model: b}}
routes:
  - name: default
    targets: [a]
keys:
  - name: alice
    hash: {H}
    team: research
    models: [concilium/auto, a]
    routes: [default]
    budget: {{usd_per_day: 5, usd_per_month: 50}}
    rate: {{requests_per_min: 60, tokens_per_min: 10000}}
    model_limits: {{b: {{budget: {{usd_per_day: 1}}}}}}
  - team: research
    budget: {{usd_per_month: 500}}
  - model: b
    rate: {{requests_per_min: 100}}
privacy:
  on_pii: {{allow_tags: [local]}}
"""


def _problems(text: str) -> dict[str, str]:
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert str(e.value).startswith("p.yaml: invalid policy")
    return dict(e.value.problems)


def test_valid_section_builds_scopes():
    pol = parse_policy(BASE, "p.yaml")
    table = KeyTable(pol.keys)
    key = table.lookup("ck-test")
    assert key is not None and key.name == "alice"
    assert [s.name for s in key.scopes] == ["key:alice", "team:research"]
    assert [s.name for s in key.model_scopes["b"]] == ["model:b", "key-model:alice/b"]
    assert table.lookup("ck-wrong") is None


@pytest.mark.parametrize("change,path,words", [
    ("usd_per_day: 5,", "keys[0].budget.usd_per_day", "number"),
    ("requests_per_min: 60", "keys[0].rate.requests_per_min", "greater than 0"),
    ("team: research\n", "keys[0].team", "letters, digits"),
    ("routes: [default]", "keys[0].routes[0]", "unknown route"),
    ("models: [concilium/auto, a]", "keys[0].models[1]", "unknown model"),
    ("- model: b", "keys[2].model", "unknown model"),
])
def test_errors_name_the_key_path(change, path, words):
    bad = {"usd_per_day: 5,": "usd_per_day: five,", "requests_per_min: 60": "requests_per_min: 0",
           "team: research\n": "team: 'research team'\n", "routes: [default]": "routes: [nope]",
           "models: [concilium/auto, a]": "models: [concilium/auto, zz]", "- model: b": "- model: zz"}[change]
    problems = _problems(BASE.replace(change, bad, 1))
    assert path in problems, problems
    assert words in problems[path]


def test_unknown_key_and_plain_key_and_bad_entry():
    problems = _problems(BASE.replace("team: research\n", "team: research\n    colour: red\n", 1))
    assert "unknown key" in problems["keys[0].colour"]
    problems = _problems(BASE.replace(f"hash: {H}", "hash: ck-plaintext-key", 1))
    assert "never put the key itself" in problems["keys[0].hash"]
    problems = _problems(BASE.replace("  - team: research\n", "  - budget: {usd_per_day: 1}\n", 1))
    assert "needs `name` and `hash`" in problems["keys[1]"]
    problems = _problems(BASE.replace("  - team: research\n", f"  - name: alice\n    hash: {H}\n", 1))
    assert "duplicate key name" in problems["keys[1].name"]


def test_privacy_errors():
    problems = _problems(BASE.replace("allow_tags: [local]", "allow_tags: [local], allow_providers: [cloud]"))
    assert "local', 'openai' or 'litellm" in problems["privacy.on_pii.allow_providers[0]"]
    problems = _problems(BASE.replace("on_pii:", "on_pi:"))
    assert "unknown key" in problems["privacy.on_pi"]


def test_key_file_and_merge(tmp_path):
    k = new_key()
    f = tmp_path / "keys.yaml"
    f.write_text(f"keys:\n  - name: bob\n    hash: {hash_key(k)}\n    budget: {{usd_per_day: 2}}\n")
    merged = merge(parse_policy(BASE, "p.yaml").keys, load_key_file(f), str(f))
    table = KeyTable(merged)
    assert table.lookup(k).name == "bob" and table.lookup("ck-test").name == "alice"
    f.write_text(f"keys:\n  - name: alice\n    hash: {hash_key(k)}\n")
    with pytest.raises(PolicyError, match="duplicate key name 'alice'"):
        merge(parse_policy(BASE, "p.yaml").keys, load_key_file(f), str(f))
    f.write_text("keys: {name: x}\n")
    with pytest.raises(PolicyError, match="expected a list"):
        load_key_file(f)
    f.write_text("users: []\n")
    with pytest.raises(PolicyError, match="one key, `keys:`"):
        load_key_file(f)


def test_policy_check_cli_reports_key_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(BASE.replace("usd_per_day: 5,", "usd_per_day: -1,"))
    out = subprocess.run([sys.executable, "-m", "concilium.cli", "policy", "check", str(p)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "keys[0].budget.usd_per_day" in out.stdout and "greater than or equal to 0" in out.stdout
