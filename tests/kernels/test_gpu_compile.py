"""Every kernel, at every configuration in the tables, compiles for real GPUs (no GPU needed).

The interpreter accepts code that Triton's GPU compiler rejects, so on a machine without a GPU
this is the check that the kernels are valid GPU programs: each launch the launchers make is
compiled to a cubin for sm_90 (H100) with the ptxas shipped in Triton and held to the
architecture's shared-memory limit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from concilium.kernels.aot import SHARED_LIMIT


@pytest.mark.slow
def test_every_configuration_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "concilium.kernels.aot", "--arch", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "sm_90: all compiled" in proc.stdout
    assert proc.stdout.count("_gate_up_kernel") >= 3  # the launches really were recorded and compiled


def test_the_check_refuses_to_run_interpreted():
    proc = subprocess.run(
        [sys.executable, "-m", "concilium.kernels.aot", "--arch", "90", "--ops", "rmsnorm"],
        env=os.environ | {"TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr
    assert SHARED_LIMIT[90] > SHARED_LIMIT[80] > SHARED_LIMIT[89]
