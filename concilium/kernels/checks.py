"""Argument checks shared by the launchers: a bad call fails here with a message, not in a kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from concilium.kernels._triton import HAS_TRITON, interpreting

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: fp32 stays exact on the GPU (no TF32), half types use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_launch(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and one Triton can launch on. Returns that device."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: Triton is not installed; use the torch reference")
    devices = {name: t.device for name, t in tensors.items()}
    device = next(iter(devices.values()))
    if any(d != device for d in devices.values()):
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: tensors must share one device; got {listed}")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            f"{op}: Triton runs CPU tensors only in its interpreter; set TRITON_INTERPRET=1 before "
            "triton is imported, or call the torch reference"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: unsupported device {device}")
    return device


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{op}: {name} must be {names}; got {str(t.dtype).removeprefix('torch.')}")


def check_shape(op: str, name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """`expected` lists sizes; None matches any size."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape, strict=True))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}; got {list(t.shape)}")


def check_inner_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    """The last dimension must be contiguous (stride 1) so that kernels load whole rows at once."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dimension; got strides {t.stride()}")


def check_block(op: str, name: str, value: int, minimum: int = 1, maximum: int = 1 << 16) -> None:
    if not isinstance(value, int) or value < minimum or value > maximum or value & (value - 1):
        raise ValueError(f"{op}: {name} must be a power of two in [{minimum}, {maximum}]; got {value!r}")


def check_out(
    op: str, name: str, out: torch.Tensor, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> None:
    """A caller-provided output: right shape, dtype and device, contiguous last dimension."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{op}: {name} must be a {str(dtype).removeprefix('torch.')} tensor of shape {list(shape)} on "
            f"{device}; got {str(out.dtype).removeprefix('torch.')} {list(out.shape)} on {out.device}"
        )
    check_inner_contiguous(op, name, out)
