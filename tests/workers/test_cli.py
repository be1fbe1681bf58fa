"""`concilium worker` refuses to start on what it cannot serve, and says why."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT, _env


def _worker(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "concilium.cli", "worker", *args], capture_output=True, text=True,
                          env=_env(env), cwd=ROOT, timeout=60)


def test_worker_needs_redis():
    out = _worker(["--policy", "policies/default.yaml"], {"CONCILIUM_REDIS_URL": ""})
    assert out.returncode == 2 and "CONCILIUM_REDIS_URL is not set" in out.stderr


def test_worker_refuses_unknown_queues_and_bad_jobs_sections(tmp_path):
    env = {"CONCILIUM_REDIS_URL": "redis://127.0.0.1:6379/9"}
    out = _worker(["--policy", "policies/default.yaml", "-Q", "high,bulk"], env)
    assert out.returncode == 2 and "unknown queue(s) ['bulk']" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "policies/default.yaml").read_text() + "\njobs: {soft_timeout_s: 50, hard_timeout_s: 10}\n")
    out = _worker(["--policy", str(bad)], env)
    assert out.returncode == 2 and "jobs.soft_timeout_s: must be below hard_timeout_s (10)" in out.stderr
