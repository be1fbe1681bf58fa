"""Shared fixtures: real processes on loopback (gateway under uvicorn, fake upstream)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run in the interpreter on machines without a GPU; this must be set before triton is
# first imported anywhere in the test session.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.support import FakeUpstream, GatewayProcess, start_gateway  # noqa: E402


@pytest.fixture(scope="session")
def fake_upstream():
    up = FakeUpstream.start()
    yield up
    up.stop()


@pytest.fixture
def upstream(fake_upstream):
    """The session's fake upstream, with faults and stats reset for this test."""
    fake_upstream.reset()
    return fake_upstream


@pytest.fixture
def gateway_factory(tmp_path):
    started: list[GatewayProcess] = []

    def make(policy: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> GatewayProcess:
        gw = start_gateway(policy, tmp_path / f"policy{len(started)}.yaml", env=env, timeout=timeout)
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def local_gateway(tmp_path_factory):
    """The gateway on policies/default.yaml (SmolLM2 in-process), shared by the tests that need it."""
    path = tmp_path_factory.mktemp("default") / "default.yaml"
    text = open(os.path.join(os.path.dirname(__file__), "..", "policies", "default.yaml")).read()
    env = {"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": ""}
    gw = start_gateway(text, path, env=env, timeout=240.0)
    yield gw
    gw.stop()
