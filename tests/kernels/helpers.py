"""Guard regions and tolerances for the kernel tests.

A guarded tensor is a view inside a larger buffer whose other elements hold a marker (NaN for
floats, a sentinel for integers): a kernel that reads outside its input pulls NaN into its
result, and one that writes outside its output changes the marker. Views also get padded rows,
so every launcher is run with strides that are not the contiguous ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

INT_SENTINEL = -777_777


class Guarded:
    def __init__(self, shape: Sequence[int], dtype: torch.dtype, device: str, pad: int = 5, row_pad: int = 3):
        self.marker = float("nan") if dtype.is_floating_point else INT_SENTINEL
        shape = tuple(shape)
        width = shape[-1] + row_pad if shape else 1
        rows = math.prod(shape[:-1]) if shape else 1
        self.storage = torch.full((pad + rows * width + pad,), self.marker, dtype=dtype, device=device)
        inside = torch.zeros(self.storage.shape, dtype=torch.bool, device=device)
        self.view = self._carve(self.storage, shape, width, pad)
        self._carve(inside, shape, width, pad).fill_(True)
        self.outside = ~inside

    @staticmethod
    def _carve(flat: torch.Tensor, shape: tuple[int, ...], width: int, pad: int) -> torch.Tensor:
        if not shape:
            return flat[pad : pad + 1].view(())
        body = flat[pad : flat.numel() - pad].view(*shape[:-1], width)
        return body[..., : shape[-1]]

    def intact(self) -> bool:
        guard = self.storage[self.outside]
        if self.storage.dtype.is_floating_point:
            return bool(torch.isnan(guard).all())
        return bool((guard == INT_SENTINEL).all())


def guarded_copy(values: torch.Tensor) -> Guarded:
    g = Guarded(values.shape, values.dtype, str(values.device))
    g.view.copy_(values)
    return g


def guarded_empty(shape: Sequence[int], dtype: torch.dtype, device: str) -> Guarded:
    """An output buffer: the view itself is filled with the marker too, so unwritten places show."""
    return Guarded(shape, dtype, device)


TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
    # bf16 has 8 mantissa bits; the interpreter also truncates instead of rounding when storing.
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale
    )
