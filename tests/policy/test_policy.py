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
    match: {category: [code]}
    targets: [a]
  - name: second
    match: {difficulty: {min: 0.5}}
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


# Each case: (change to BASE, key path, words the message holds). All must be refused by `policy check`.
REFUSED = {
    "duplicate key": (("model: a}", "model: a, model: b}"), "models.a.model", "given twice"),
    "duplicate section": (("version: 1", "version: 1\nretry: {attempts: 1}\nretry: {attempts: 3}"),
                          "retry", "given twice"),
    "unknown category": (("category: [code]", "category: [cod]"), "routes[0].match.category[0]", "'code'"),
    "difficulty above 1": (("{min: 0.5}", "{min: 2, max: -1}"), "routes[1].match.difficulty.min", "between 0 and 1"),
    "difficulty below 0": (("{min: 0.5}", "{min: 0.2, max: -1}"), "routes[1].match.difficulty.max",
                           "between 0 and 1"),
    "empty difficulty range": (("{min: 0.5}", "{min: 0.8, max: 0.2}"), "routes[1].match.difficulty",
                               "min 0.8 is above max 0.2"),
    "route after a catch-all": (("    match: {category: [code]}\n", ""), "routes[1]",
                                "unreachable: route 'first' (routes[0]) matches every request"),
    "local model path missing": (("model: smollm2-135m-instruct", "model: /nonexistent/model.gguf"),
                                 "models.b.model", "does not exist"),
    "base_url not a url": (('"http://127.0.0.1:1/v1"', '"not a url"'), "models.a.base_url", "http:// or https://"),
    "base_url without host": (('"http://127.0.0.1:1/v1"', '"http://"'), "models.a.base_url", "host"),
    "backoff above its cap": (("version: 1", "version: 1\nretry: {backoff_s: 10, backoff_max_s: 5}"),
                              "retry.backoff_s", "above backoff_max_s (5)"),
    "infinite timeout": (("fallbacks: [b]", "fallbacks: [b]\n    timeout_s: .inf"), "routes[2].timeout_s",
                         "finite"),
    "nan price": (("model: a}", "model: a, price: {input: .nan}}"), "models.a.price.input", "finite"),
    "infinite job timeout": (("version: 1", "version: 1\njobs: {hard_timeout_s: .inf}"), "jobs.hard_timeout_s",
                             "finite"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_named_cases_are_refused(name):
    (old, new), path, words = REFUSED[name]
    assert old in BASE
    problems = dict(_error(BASE.replace(old, new, 1)).problems)
    assert path in problems and words in problems[path], problems


def test_existing_local_model_path_and_builtin_name_load(tmp_path):
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"GGUF")
    assert parse_policy(BASE.replace("smollm2-135m-instruct", str(weights)))
    assert parse_policy(BASE).models["b"].model == "smollm2-135m-instruct"


def test_builtin_local_models_match_the_runtime():
    from concilium.policy.local_models import BUILTIN_LOCAL_MODELS, local_model_path
    from concilium.specialists.runtime.loader import BUILTIN_MODELS, resolve_model_path

    assert BUILTIN_LOCAL_MODELS == BUILTIN_MODELS
    for name in BUILTIN_MODELS:
        assert local_model_path(name) == resolve_model_path(name)


def test_all_problems_are_reported_at_once():
    text = BASE.replace("model: a}", "model: a, model: a2, price: {input: cheap}}")  # duplicate + type
    text = text.replace("targets: [b]", "targets: [nope]")  # a reference
    text = text.replace("model: smollm2-135m-instruct", "model: /nonexistent/model.gguf")  # a file
    text += "jobs:\n  chat_wait_s: soon\nkeys:\n  - {name: a, hash: ck-123}\n"  # sections
    problems = dict(_error(text).problems)
    assert set(problems) >= {"models.a.model", "models.a.price.input", "routes[1].targets[0]", "models.b.model",
                             "jobs.chat_wait_s", "keys[0].hash"}, problems


def test_every_reference_problem_is_reported():
    text = BASE.replace("targets: [b]", "targets: [x]").replace("fallbacks: [b]", "fallbacks: [y]")
    problems = dict(_error(text).problems)
    assert "unknown model 'x'" in problems["routes[1].targets[0]"]
    assert "unknown model 'y'" in problems["routes[2].fallbacks[0]"]


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(PolicyError) as e:
        load_policy(tmp_path)
    assert str(tmp_path) in str(e.value) and "is a directory" in str(e.value)
    out = subprocess.run([sys.executable, "-m", "concilium.cli", "policy", "check", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "is a directory" in out.stdout and "Traceback" not in out.stderr


def test_model_defaults_schema():
    pol = parse_policy(BASE.replace("model: a}", "model: a, defaults: {temperature: 0.2, top_p: 0.9}}"))
    d = pol.models["a"].defaults
    assert d.fill({"messages": []}) == {"messages": [], "temperature": 0.2, "top_p": 0.9}
    assert d.fill({"temperature": 0, "top_p": None}) == {"temperature": 0, "top_p": 0.9}
    plain = {"messages": []}
    assert pol.models["b"].defaults.fill(plain) is plain  # no defaults: the request as it came
    problems = dict(_error(BASE.replace("model: a}", "model: a, defaults: {temperature: 3, colour: 1}}")).problems)
    assert "less than or equal to 2" in problems["models.a.defaults.temperature"]
    assert "unknown key" in problems["models.a.defaults.colour"]


def test_default_policy_samples_smollm2_at_a_low_temperature():
    spec = load_policy(ROOT / "policies" / "default.yaml").models["smollm2"]
    assert (spec.defaults.temperature, spec.defaults.top_p) == (0.2, 0.5)


def test_a_bad_router_section_keeps_its_virtual_models_for_the_other_checks():
    text = BASE.replace("match: {category: [code]}", "match: {model: [team/auto]}")
    text += "router: {virtual_models: [concilium/auto, team/auto], objective: {kind: cheapest}}\n"
    problems = dict(_error(text).problems)
    assert list(problems) == ["router.objective.kind"], problems
