"""Hostile policy and key files are refused with a clear message: at `policy check`, at start-up and
on hot reload (where the running policy stays in force)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from concilium.policy.loader import PolicyError, load_key_file, load_policy
from tests.guard.support import make_key, upstream_policy
from tests.support import ROOT, start_gateway


def billion_laughs(levels: int = 9) -> str:
    out = 'l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels + 1):
        out += f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n"
    return out


GOOD = upstream_policy("http://127.0.0.1:9/v1")
HOSTILE = {
    "billion laughs in a field": (
        "anchors:\n" + "".join("  " + line + "\n" for line in billion_laughs().splitlines())
        + GOOD.replace("model: cheap,", "model: *l9,"), "", "aliases expand to more than"),
    "billion laughs in keys": (GOOD + "x-lol:\n" + "".join("  " + x + "\n" for x in billion_laughs().splitlines())
                               + "keys: *l9\n", "", "aliases expand"),
    "deep nesting": (GOOD + "jobs: " + "[" * 3000 + "]" * 3000 + "\n", "", "nested too deeply"),
    "huge file": (GOOD + "# " + "x" * (1 << 20) + "\n", "", "larger than"),
    "wrong type": (GOOD.replace("output: 1000", "output: lots"), "models.cheap.price.output", "valid number"),
    "unknown key": (GOOD.replace("retry:", "retries:"), "retries", "unknown key"),
    "not a mapping": ("- just\n- a list\n", "", "expected a mapping"),
    "binary": ("\x00\x01\x02 not yaml", "", "not valid YAML"),
    "key with a plain key": (GOOD + "keys:\n  - {name: a, hash: ck-123}\n", "keys[0].hash", "sha256"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_refused_with_path_and_reason(tmp_path, name):
    text, path, words = HOSTILE[name]
    f = tmp_path / "p.yaml"
    f.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(PolicyError) as e:
        load_policy(f)
    assert time.monotonic() - t0 < 5  # refused quickly, not after expanding anything
    problems = dict(e.value.problems)
    assert path in problems and words in problems[path], problems
    assert str(e.value).startswith(f"{f}: invalid policy")


def test_cli_and_serve_refuse(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(HOSTILE["billion laughs in a field"][0])
    check = subprocess.run([sys.executable, "-m", "concilium.cli", "policy", "check", str(f)], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "aliases expand" in check.stdout
    serve = subprocess.run([sys.executable, "-m", "concilium.cli", "serve", "--policy", str(f), "--port", "1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert serve.returncode == 2 and "aliases expand" in serve.stdout + serve.stderr


def test_hot_reload_keeps_the_running_policy(upstream, tmp_path):
    gw = start_gateway(upstream_policy(upstream.url), tmp_path / "p.yaml")
    try:
        for n, name in enumerate(("billion laughs in a field", "huge file", "wrong type")):
            gw.policy_path.write_text(HOSTILE[name][0])
            gw.sighup()
            deadline = time.monotonic() + 20
            while gw.log.read_text().count("refused") <= n:
                assert time.monotonic() < deadline, "no refusal logged"
            r = gw.client().chat.completions.create(model="cheap", max_tokens=1,
                                                    messages=[{"role": "user", "content": "still here?"}])
            assert r.choices[0].message.content
    finally:
        gw.stop()
    assert "invalid policy" in gw.log.read_text()


def test_hostile_key_file(upstream, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(billion_laughs() + "keys: *l9\n")
    with pytest.raises(PolicyError, match="aliases expand"):
        load_key_file(keys)
    # at start-up: refused, naming the file
    (tmp_path / "p.yaml").write_text(upstream_policy(upstream.url))
    out = subprocess.run([sys.executable, "-m", "concilium.cli", "serve", "--policy", str(tmp_path / "p.yaml"),
                          "--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "CONCILIUM_KEYS_FILE": str(keys)})
    assert out.returncode != 0 and str(keys) in out.stdout + out.stderr and "aliases expand" in out.stdout + out.stderr
    # at run time: the previous keys stay in force
    good, good_h = make_key()
    keys.write_text(f"keys:\n  - name: ok\n    hash: {good_h}\n")
    gw = start_gateway(upstream_policy(upstream.url), tmp_path / "p2.yaml", env={"CONCILIUM_KEYS_FILE": str(keys)})
    try:
        client = gw.client(api_key=good)
        assert client.models.list().data
        keys.write_text(billion_laughs() + "keys: *l9\n")
        deadline = time.monotonic() + 20
        while "key file refused" not in gw.log.read_text():
            assert time.monotonic() < deadline, "the broken key file was not noticed"
            assert client.models.list().data  # the key stays accepted throughout
    finally:
        gw.stop()
