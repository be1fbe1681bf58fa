"""RMSNorm over the last dimension, alone or fused with the residual add before it.

    rmsnorm(x, w, eps)              y = x * rsqrt(mean(x^2) + eps) * w
    add_rmsnorm(x, r, w, eps)       s = x + r (rounded to the input dtype);  (rmsnorm(s), s)

Norm math in fp32, each output rounded once to the input dtype. The per-head q/k norm of Qwen3 is
`rmsnorm` of a [T, heads, head_dim] tensor with a [head_dim] weight; such tensors may be strided
views (e.g. slices of a fused qkv projection): rows may have any stride as long as the last
dimension is contiguous and the leading dimensions fit in two strides.
"""

from __future__ import annotations

import torch

from concilium.kernels import configs
from concilium.kernels._triton import tl, triton
from concilium.kernels.checks import (
    FLOAT_DTYPES,
    check_block,
    check_dtype,
    check_inner_contiguous,
    check_launch,
    check_out,
    check_shape,
    next_pow2,
)
from concilium.kernels.dispatch import use_triton

OP = "rmsnorm"
MAX_HIDDEN = 1 << 16


def _check_args(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> None:
    check_dtype(OP, "x", x, FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension")
    check_shape(OP, "weight", weight, (x.shape[-1],))
    check_dtype(OP, "weight", weight, FLOAT_DTYPES)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"{OP}: residual must match x ({x.dtype} {list(x.shape)}); got {residual.dtype} {list(residual.shape)}"
            )
    if not isinstance(eps, float | int) or eps < 0:
        raise ValueError(f"{OP}: eps must be a non-negative number; got {eps!r}")


def rmsnorm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference."""
    _check_args(x, weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def add_rmsnorm_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (rmsnorm(x + residual), x + residual)."""
    _check_args(x, weight, eps, residual)
    summed = (x.float() + residual.float()).to(x.dtype)
    return rmsnorm_torch(summed, weight, eps), summed


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    sum_ptr,
    n_rows,
    H,
    inner,
    eps,
    sx_outer,
    sx_inner,
    sr_outer,
    sr_inner,
    sy_outer,
    sy_inner,
    ss_outer,
    ss_inner,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    outer, within = rows // inner, rows % inner
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < H)[None, :]
    x = tl.load(x_ptr + (outer * sx_outer + within * sx_inner)[:, None] + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(
            res_ptr + (outer * sr_outer + within * sr_inner)[:, None] + cols[None, :], mask=mask, other=0.0
        )
        s = (x + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + (outer * ss_outer + within * ss_inner)[:, None] + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = x * inv[:, None] * w[None, :]
    tl.store(
        y_ptr + (outer * sy_outer + within * sy_inner)[:, None] + cols[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


def _layout(name: str, t: torch.Tensor) -> tuple[int, int, int]:
    """(rows per outer index, outer stride, inner stride) addressing the rows of t[..., H]."""
    check_inner_contiguous(OP, name, t)
    merged: list[tuple[int, int]] = []  # (size, stride), dimensions laid out back to back merged
    for size, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True):
        if size == 1:
            continue
        if merged and merged[-1][1] == size * stride:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    while len(merged) < 2:
        merged.insert(0, (1, 0))
    if len(merged) > 2:
        raise ValueError(
            f"{OP}: {name} strides {t.stride()} do not fit two row strides; pass a contiguous tensor"
        )
    (_, outer_stride), (inner, inner_stride) = merged
    return inner, outer_stride, inner_stride


def _strides_like(name: str, t: torch.Tensor | None, x: torch.Tensor, inner: int) -> tuple[int, int]:
    """Row strides of t under x's (outer, inner) split: t is laid out like x, or contiguous."""
    if t is None:
        return 0, 0
    check_inner_contiguous(OP, name, t)
    if t.stride() == x.stride():
        return _layout(name, t)[1:]
    if t.is_contiguous():
        return inner * t.shape[-1], t.shape[-1]
    raise ValueError(f"{OP}: {name} must be contiguous or have the strides of x")


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    y: torch.Tensor | None,
    summed: torch.Tensor | None,
    config: configs.Config | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    tensors = {"x": x, "weight": weight} | ({"residual": residual} if residual is not None else {})
    device = check_launch(OP, **tensors)
    H = x.shape[-1]
    if H > MAX_HIDDEN:
        raise ValueError(f"{OP}: the last dimension must be at most {MAX_HIDDEN}; got {H}")
    if y is None:
        y = torch.empty(x.shape, dtype=x.dtype, device=device)
    else:
        check_out(OP, "out", y, x.shape, x.dtype, device)
    if residual is not None:
        if summed is None:
            summed = torch.empty(x.shape, dtype=x.dtype, device=device)
        else:
            check_out(OP, "out residual", summed, x.shape, x.dtype, device)
    n_rows = x.numel() // H if H else 0
    if n_rows == 0:
        return y, summed
    block_h = next_pow2(H)
    cfg = config or configs.lookup(OP, device, x.dtype, block_h)
    block_rows = cfg["BLOCK_ROWS"]
    check_block(OP, "BLOCK_ROWS", block_rows)
    inner, *x_strides = _layout("x", x)
    strides = [
        *x_strides,
        *_strides_like("residual", residual, x, inner),
        *_strides_like("out", y, x, inner),
        *_strides_like("out residual", summed, x, inner),
    ]
    _rmsnorm_kernel[(triton.cdiv(n_rows, block_rows),)](
        x, residual if residual is not None else x, weight, y, summed if summed is not None else y,
        n_rows, H, inner, float(eps), *strides,
        HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_H=block_h,
        num_warps=cfg.get("num_warps", 4),
    )  # fmt: skip
    return y, summed


def rmsnorm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    config: configs.Config | None = None,
) -> torch.Tensor:
    """Triton launcher; `out` to write into, `config` overrides the table."""
    _check_args(x, weight, eps)
    return _launch(x, None, weight, eps, out, None, config)[0]


def add_rmsnorm_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: configs.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher; `out` = (y, new_residual) to write into."""
    _check_args(x, weight, eps, residual)
    y, summed = _launch(x, residual, weight, eps, *(out or (None, None)), config)
    assert summed is not None
    return y, summed


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Dispatcher: RMSNorm over the last dimension, in the dtype of x."""
    if use_triton(x):
        return rmsnorm_triton(x, weight, eps)
    return rmsnorm_torch(x, weight, eps)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: (rmsnorm(x + residual), x + residual)."""
    if use_triton(x):
        return add_rmsnorm_triton(x, residual, weight, eps)
    return add_rmsnorm_torch(x, residual, weight, eps)
