"""Property-based fuzzing of the gateway's OpenAPI: no generated request may cause a server error."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.guard.support import make_key, upstream_policy
from tests.support import ROOT, start_gateway

KEY, KEY_H = make_key()
EXTRA = f"""
keys:
  - name: fuzz
    hash: {KEY_H}
    budget: {{usd_per_day: 1000000}}
    rate: {{requests_per_min: 1000000, tokens_per_min: 1000000000}}
privacy: {{on_pii: {{allow_tags: [local]}}}}
"""
ROUTES = """
routes:
  - name: private
    match: {pii: true}
    targets: [private]
  - name: default
    targets: [cheap]
    fallbacks: [private]
"""


@pytest.mark.parametrize("with_keys", [True, False], ids=["keys", "open"])
def test_no_server_errors(upstream, tmp_path, with_keys):
    gw = start_gateway(upstream_policy(upstream.url, EXTRA if with_keys else "", ROUTES), tmp_path / "p.yaml")
    st = Path(sys.executable).with_name("schemathesis")
    cmd = [str(st), "run", f"{gw.base_url}/openapi.json", "--checks", "not_a_server_error", "-n", "40",
           "--seed", "7", "--workers", "1", "--no-color", "--request-timeout", "30"]
    if with_keys:
        cmd += ["-H", f"Authorization: Bearer {KEY}"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.robustness.st_hooks", "PYTHONPATH": str(ROOT)}
    try:
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    finally:
        gw.stop()
    report = out.stdout[-6000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    generated = re.search(r"(\d+) generated, (\d+) passed", out.stdout)
    assert generated and int(generated.group(1)) >= 300 and generated.group(1) == generated.group(2), report
    assert "unhandled error" not in gw.log.read_text()
    stats = upstream.stats()
    print("upstream calls:", stats["requests"])
    assert stats["requests"] > 0  # the fuzzing reached real model calls, not only validation errors
