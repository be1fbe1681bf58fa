from __future__ import annotations

import pytest
import torch

from concilium.kernels.rmsnorm import add_rmsnorm_torch, add_rmsnorm_triton, rmsnorm_torch, rmsnorm_triton
from tests.kernels.helpers import assert_close, guarded_copy, guarded_empty

EPS = 1e-6


def definition(x: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    xd = x.double().cpu()
    return xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * w.double().cpu()


SHAPES = [
    ((1, 64), torch.float32),
    ((33, 72), torch.float16),
    ((5, 96), torch.bfloat16),
    ((3, 4, 5, 40), torch.float32),
]


@pytest.mark.parametrize(("shape", "dtype"), SHAPES)
def test_rmsnorm(device, shape, dtype):
    x = torch.randn(shape).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype).to(device)
    src, out = guarded_copy(x), guarded_empty(shape, dtype, device)
    got = rmsnorm_triton(src.view, w, EPS, out=out.view, config={"BLOCK_ROWS": 2})
    assert out.intact(), "kernel wrote outside its output"
    assert got.dtype == dtype
    expected = definition(x, w)
    assert_close(got, expected, dtype)
    assert_close(rmsnorm_torch(x, w, EPS), expected, dtype)


@pytest.mark.parametrize(("shape", "dtype"), SHAPES)
def test_add_rmsnorm(device, shape, dtype):
    x, r = (torch.randn(shape).to(dtype).to(device) for _ in range(2))
    w = torch.randn(shape[-1]).to(dtype).to(device)
    xs, rs = guarded_copy(x), guarded_copy(r)
    y_out, s_out = guarded_empty(shape, dtype, device), guarded_empty(shape, dtype, device)
    y, summed = add_rmsnorm_triton(xs.view, rs.view, w, EPS, out=(y_out.view, s_out.view))
    assert y_out.intact() and s_out.intact(), "kernel wrote outside its outputs"
    assert_close(summed, x.double() + r.double(), dtype)
    expected = definition(summed, w)  # the norm of the rounded sum, as the unfused layers compute it
    assert_close(y, expected, dtype)
    ref_y, ref_sum = add_rmsnorm_torch(x, r, w, EPS)
    assert torch.equal(ref_sum, (x.float() + r.float()).to(dtype))
    assert_close(ref_y, definition(ref_sum, w), dtype)


def test_per_head_norm_on_a_strided_view(device):
    """Qwen3's q/k norm: heads of a fused qkv output, normalised over head_dim."""
    T, heads, D = 6, 4, 32
    qkv = torch.randn(T, 3 * heads * D, device=device)
    q = qkv[:, : heads * D].view(T, heads, D)
    k = qkv[:, heads * D : 2 * heads * D].view(T, heads, D)
    w = torch.randn(D, device=device)
    for t in (q, k):
        assert not t.is_contiguous()
        assert_close(rmsnorm_triton(t, w, EPS), definition(t, w), torch.float32)
        assert_close(rmsnorm_torch(t, w, EPS), definition(t, w), torch.float32)
    # Writing the result back into the same strided layout.
    out = torch.empty_like(qkv)[:, : heads * D].view(T, heads, D)
    rmsnorm_triton(q, w, EPS, out=out)
    assert_close(out, definition(q, w), torch.float32)


def test_bad_arguments(device):
    x = torch.randn(3, 16, device=device)
    with pytest.raises(ValueError, match="weight must have shape"):
        rmsnorm_triton(x, torch.ones(8, device=device), EPS)
    with pytest.raises(ValueError, match="residual must match"):
        add_rmsnorm_triton(x, x.half(), torch.ones(16, device=device), EPS)
    with pytest.raises(ValueError, match="eps"):
        rmsnorm_torch(x, torch.ones(16, device=device), -1.0)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rmsnorm_triton(x.t().contiguous().t(), torch.ones(16, device=device).expand(16), EPS)
    with pytest.raises(ValueError, match="out must be"):
        rmsnorm_triton(x, torch.ones(16, device=device), EPS, out=torch.empty(3, 15, device=device))
