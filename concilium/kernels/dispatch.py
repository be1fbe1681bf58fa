"""Which implementation an op runs: the Triton kernel or the torch reference.

`CONCILIUM_KERNELS` (read at every call, so tests and operators can flip it):
  auto   (default) Triton on CUDA tensors when Triton is installed, torch otherwise.
  torch  always the torch reference, e.g. to rule the kernels out while debugging.
  triton always Triton; CPU tensors then need the interpreter (TRITON_INTERPRET=1), which is
         how the runtime's own tests can drive every kernel on a machine without a GPU.
"""

from __future__ import annotations

import os

import torch

from concilium.kernels._triton import HAS_TRITON, interpreting

ENV_VAR = "CONCILIUM_KERNELS"
MODES = ("auto", "torch", "triton")


def kernels_mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op on `tensor` should run its Triton kernel."""
    mode = kernels_mode()
    if mode == "torch":
        return False
    if mode == "auto":
        return HAS_TRITON and tensor.is_cuda
    if not HAS_TRITON:
        raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed")
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            f"{ENV_VAR}=triton on {tensor.device.type} tensors needs the Triton interpreter: "
            "set TRITON_INTERPRET=1 before triton is imported"
        )
    return True
