"""Triton, when it is installed, and whether kernels run in its CPU interpreter.

Torch-only installs (CPU serving) have no Triton: the op modules still import, their torch
references still run, and only calling a `*_triton` launcher raises. Kernel signatures use
`tl.constexpr` in annotations, so the stand-in provides that name.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    HAS_TRITON = False

    class _Unavailable:
        """Stands in for a `@triton.jit` kernel when Triton is not installed."""

        def __init__(self, fn: Any) -> None:
            self.__name__ = getattr(fn, "__name__", "kernel")

        def __getitem__(self, grid: Any) -> Any:
            raise RuntimeError(f"{self.__name__}: Triton is not installed (pip install triton)")

    class _TritonStandIn:
        def jit(self, fn: Any = None, **_: Any) -> Any:
            return _Unavailable(fn) if fn is not None else _Unavailable

    class _LanguageStandIn:
        constexpr = object

    triton = _TritonStandIn()  # type: ignore[assignment]
    tl = _LanguageStandIn()  # type: ignore[assignment]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1).

    Triton reads the variable when it is imported: setting it later leaves its standard library
    (tl.max, tl.sum, ...) compiled for the GPU, and CPU launches then fail.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


__all__ = ["HAS_TRITON", "interpreting", "tl", "triton"]
