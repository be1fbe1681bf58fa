"""Kernel tests run on CUDA when the machine has a GPU, else in Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test module of
this folder imports the kernels. On a GPU machine it stays unset and the same tests run the
compiled kernels on the device (set TRITON_INTERPRET=1 yourself to run them interpreted there).
"""

from __future__ import annotations

import os
import sys

import torch

if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from concilium.kernels._triton import interpreting  # noqa: E402


@pytest.fixture(scope="session")
def device() -> str:
    """Where the kernels under test run: "cuda" (compiled) or "cpu" (interpreter)."""
    if interpreting():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.fail(
        "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
        "run `TRITON_INTERPRET=1 pytest tests/kernels` or set it in tests/conftest.py"
    )


@pytest.fixture(autouse=True)
def _default_kernels_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from the default dispatch, whatever the caller's environment says."""
    monkeypatch.delenv("CONCILIUM_KERNELS", raising=False)
    torch.manual_seed(0)
