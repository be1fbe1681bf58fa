"""Policy loading: valid files load; every error names the file, the key path and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from concilium.policy.loader import PolicyError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]

BASE = """
version: 1
models:
  a: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: a}
  b: {provider: local, model: smollm2-135m-instruct}
routes:
  - name: first
    targets: [a]
  - name: second
    targets: [b]
  - name: third
    targets: [a]
    fallbacks: [b]
"""


@pytest.mark.parametrize("path", sorted((ROOT / "policies").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policies_are_valid(path):
    pol = load_policy(path)
    assert pol.models and pol.routes


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "my-policy.yaml")
    return e.value


def test_unknown_fallback_names_the_key_path():
    err = _error(BASE.replace("fallbacks: [b]", "fallbacks: [nope]"))
    assert err.problems[0][0] == "routes[2].fallbacks[0]"
    assert "unknown model 'nope'" in err.problems[0][1]
    assert str(err).startswith("my-policy.yaml: invalid policy")


def test_wrong_type_and_unknown_key():
    err = _error(BASE.replace("model: a}", "model: a, price: {input: cheap}, colour: red}"))
    paths = dict(err.problems)
    assert "models.a.price.input" in paths and "number" in paths["models.a.price.input"]
    assert "models.a.colour" in paths and "unknown key" in paths["models.a.colour"]


def test_bad_provider_kind_lists_expected_values():
    err = _error(BASE.replace("provider: local", "provider: magic"))
    path, msg = err.problems[0]
    assert path == "models.b.provider"
    assert "'local'" in msg and "'openai'" in msg and "magic" in msg


def test_openai_provider_needs_base_url():
    err = _error(BASE.replace('base_url: "http://127.0.0.1:1/v1", ', ""))
    assert err.problems[0][0] == "models.a"
    assert "base_url" in err.problems[0][1]


def test_invalid_yaml_reports_line():
    err = _error("version: 1\nmodels: [\n")
    assert "line" in err.problems[0][0] and "not valid YAML" in err.problems[0][1]


def test_duplicate_route_and_empty_sections():
    err = _error(BASE.replace("name: second", "name: first"))
    assert err.problems[0][0] == "routes[1].name"
    err = _error("version: 1\nmodels: {}\nroutes: []\n")
    assert {p for p, _ in err.problems} == {"models", "routes"}


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(e.value) and "file not found" in str(e.value)


def test_policy_check_cli(tmp_path):
    good = tmp_path / "good.yaml"
    bad = tmp_path / "bad.yaml"
    good.write_text(BASE)
    bad.write_text(BASE.replace("targets: [b]", "targets: [zzz]"))
    ok = subprocess.run([sys.executable, "-m", "concilium.cli", "policy", "check", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok (2 models, 3 routes" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "concilium.cli", "policy", "check", str(bad)],
                        capture_output=True, text=True)
    assert ko.returncode == 1
    assert f"{bad}: invalid policy" in ko.stdout and "routes[1].targets[0]: unknown model 'zzz'" in ko.stdout


def test_section_checks_name_the_key_path():
    err = _error(BASE + "jobs:\n  chat_wait_s: soon\n")
    assert err.problems[0][0] == "jobs.chat_wait_s" and "number" in err.problems[0][1]
